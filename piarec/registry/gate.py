"""`piarec promote`: the promotion gate between the ``challenger`` and ``champion`` aliases.

The gate loads both registered bundles and the validation split of the snapshot the
challenger was trained on, and evaluates them itself on the same validation users
(stored tags are never trusted for the comparison). The challenger is promoted when
every check passes:

1. **beats popularity**: validation ``gate.metric`` above popularity's by
   ``gate.min_uplift_over_popularity`` (relative) -- the only comparison for a first model;
2. **no regression** (when a champion exists): NDCG@100 and Recall@20 at least
   ``(1 - gate.tolerance)`` times the champion's;
3. **no posterior collapse**: at least ``gate.min_active_units`` active latent units
   (:func:`piarec.evaluate.diagnostics.active_units` on the validation users); the other collapse
   diagnostics of that module (KL, mutual information, self-consistency, IMA contrast,
   mask stability) are recorded beside it as ``challenger_collapse_*`` metrics when
   ``diagnostics.enabled``, for the record only;
4. **healthy scores**: every score of every validation user finite, and at most
   ``gate.max_popularity_share`` of the users given exactly the popularity top-K;
5. **vocabulary**: at least ``gate.min_vocabulary_overlap`` of the snapshot's titles are
   in the challenger's vocabulary (a model of another catalogue, or one tagged with the
   wrong snapshot, is refused by name instead of by its metrics on unknown titles).

The decision and its reasons are recorded in MLflow (a ``gate`` run with metrics and
``gate_decision.json``, plus a ``gate_decision`` tag on the version and its training
run); ``champion`` moves only when the challenger passes. A person may still move the
alias in the MLflow UI: scoring resolves ``@champion`` at run time.

Beside the checks, for the record only, the report gives the beyond-accuracy figures
(:mod:`piarec.evaluate.beyond`) of the challenger's, the champion's and popularity's
top-100 lists on the same users: coverage, novelty, head share and intra-list similarity,
the last in the challenger's item vectors for all three so that they are comparable.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from piarec.config import GateConfig, PipelineConfig
from piarec.data.snapshot import Snapshot, load_snapshot
from piarec.errors import InputDataError, ModelNotFoundError
from piarec.evaluate.beyond import as_metrics, beyond_accuracy, describe, item_vectors
from piarec.evaluate.bundle import bundle_rows, bundle_topk, health, item_mapping
from piarec.evaluate.diagnostics import collapse_metrics, diagnosable
from piarec.evaluate.metrics import EVAL_K, summarize
from piarec.evaluate.protocol import popularity_topk
from piarec.models.baselines import train_popularity
from piarec.models.bundle import ModelBundle
from piarec.registry import client as registry
from piarec.registry.client import CHALLENGER, CHAMPION, SNAPSHOT_TAG

log = logging.getLogger(__name__)
COMPARED = ("ndcg_at_100", "recall_at_20")


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"  [{'pass' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


@dataclass
class GateDecision:
    promoted: bool
    challenger: str
    champion_before: str | None
    reasons: list[str] = field(default_factory=list)  # one line per check
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    snapshot: str | None = None
    # challenger / champion / popularity -> beyond_accuracy() of its top-EVAL_K (no check)
    beyond: dict[str, dict[str, float | None]] = field(default_factory=dict)
    item_vectors: str | None = None  # what the intra-list similarity was measured in

    def summary(self) -> str:
        """A readable multi-line report; its first line is the verdict."""
        if self.promoted:
            verdict = f"version {self.challenger} promoted to {CHAMPION}"
            if self.champion_before and self.champion_before != self.challenger:
                verdict += f" (was version {self.champion_before})"
        else:
            kept = f"version {self.champion_before}" if self.champion_before else "none"
            verdict = f"version {self.challenger} refused; {CHAMPION} stays {kept}"
        head = f"gate: {verdict} — validation users of {self.snapshot}"
        beyond = [f"  beyond-accuracy@{EVAL_K} {who}: {describe(figures)}" for who, figures in self.beyond.items()]
        return "\n".join([head, *[c.line() for c in self.checks], *beyond, *self._notes()])

    def _notes(self) -> list[str]:
        return [f"  note: {r}" for r in self.reasons if not any(r == c.line() for c in self.checks)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- the gate
def _snapshot_of(cfg: PipelineConfig, version: str) -> str:
    uri = registry.training_snapshot(cfg, cfg.mlflow.registered_model, version)
    if not uri:
        raise ModelNotFoundError(
            f"model version {version} names no training snapshot (tag {SNAPSHOT_TAG!r}); "
            "was it registered by `piarec train`?"
        )
    return uri


def promote(cfg: PipelineConfig, snapshot: str | None = None) -> GateDecision:
    """Run the gate on the current ``challenger``; move ``champion`` when it passes.

    ``snapshot`` (a snapshot URI) defaults to the one the challenger was trained on.
    """
    name = cfg.mlflow.registered_model
    challenger = registry.alias_version(cfg, CHALLENGER)
    if challenger is None:
        raise ModelNotFoundError(f"registered model {name!r} has no {CHALLENGER!r} alias; run `piarec train` first")
    champion = registry.alias_version(cfg, CHAMPION)
    snapshot = snapshot or _snapshot_of(cfg, challenger)
    snap = load_snapshot(snapshot)
    if snap.val.n_users == 0:
        raise InputDataError(f"snapshot {snapshot!r} has no validation users; the gate cannot compare models")

    cand, cand_ref = registry.load_model(cfg, f"models:/{name}/{challenger}")
    decision = GateDecision(promoted=False, challenger=challenger, champion_before=champion, snapshot=snap.uri)
    batch = cfg.training.eval_batch_size
    popularity = train_popularity(snap.train)
    # Each top-EVAL_K is ranked once: the checks and the beyond-accuracy figures share it.
    lists = {"challenger": bundle_topk(cand, snap, snap.val, batch),
             "popularity": popularity_topk(popularity, snap.val.fold_in, EVAL_K)}
    _check_vocabulary(cfg.gate, decision, cand, snap)  # first: it explains every other figure
    ours = _check_popularity(cfg.gate, decision, lists, snap.val.held_out)
    if champion is not None and champion != challenger:
        champ, _ = registry.load_model(cfg, f"models:/{name}/{champion}")
        lists["champion"] = bundle_topk(champ, snap, snap.val, batch)
        _check_champion(cfg.gate, decision, ours, summarize(lists["champion"], snap.val.held_out), champion)
    elif champion == challenger:
        decision.reasons.append("the challenger is already champion; nothing to compare against")
    else:
        decision.reasons.append("no champion yet: a first model is promoted when it beats popularity")
    _check_health(cfg, decision, cand, snap)
    _beyond(decision, lists, popularity, snap, cand, _anchors_trained(cand_ref.local_dir))

    decision.promoted = all(c.passed for c in decision.checks)
    decision.reasons[:0] = [c.line() for c in decision.checks]
    _record(cfg, decision)
    if decision.promoted and champion != challenger:
        registry.set_alias(cfg, CHAMPION, challenger)
    log.debug("%s", decision.summary())  # the CLI and the demo print it
    return decision


def _check_vocabulary(g: GateConfig, decision: GateDecision, cand: ModelBundle, snap: Snapshot) -> None:
    """5. The challenger knows the snapshot's titles."""
    overlap = float(np.mean(item_mapping(snap.item_ids, cand.item_ids) >= 0)) if snap.n_items else 0.0
    decision.metrics["challenger_vocabulary_overlap"] = overlap
    decision.checks.append(Check(
        "vocabulary", overlap >= g.min_vocabulary_overlap,
        f"{overlap:.1%} of the snapshot's {snap.n_items} titles are in the model's vocabulary "
        f"of {cand.n_items} (at least {g.min_vocabulary_overlap:.0%})"))


def _check_popularity(g: GateConfig, decision: GateDecision, lists: dict[str, np.ndarray],
                      held_out) -> dict[str, float]:
    """1. Against popularity, on the same validation users (``lists``: the challenger's and
    popularity's top-K of them; ``held_out``: their held-out titles). Returns the
    challenger's metrics."""
    ours, pop = summarize(lists["challenger"], held_out), summarize(lists["popularity"], held_out)
    decision.metrics.update({f"challenger_{k}": v for k, v in ours.items()})
    decision.metrics.update({f"popularity_{k}": v for k, v in pop.items()})
    m = g.metric
    needed = pop[m] * (1.0 + g.min_uplift_over_popularity)
    decision.checks.append(Check(
        f"{m} vs popularity", ours[m] > needed,
        f"{ours[m]:.4f} {'>' if ours[m] > needed else '<='} {needed:.4f} "
        f"(popularity {pop[m]:.4f}, uplift {g.min_uplift_over_popularity:+.1%})"))
    return ours


def _check_champion(g: GateConfig, decision: GateDecision, ours: dict[str, float], theirs: dict[str, float],
                    champion: str) -> None:
    """2. Against the champion, on the same validation users."""
    decision.metrics.update({f"champion_{k}": v for k, v in theirs.items()})
    for key in COMPARED:
        floor = theirs[key] * (1.0 - g.tolerance)
        ok = ours[key] >= floor
        decision.checks.append(Check(
            f"{key} vs champion v{champion}", ok,
            f"{ours[key]:.4f} {'>=' if ok else '<'} {floor:.4f} (champion {theirs[key]:.4f}, tolerance {g.tolerance:.1%})"))


def _check_health(cfg: PipelineConfig, decision: GateDecision, cand: ModelBundle, snap: Snapshot) -> None:
    """3. and 4. Collapse and score health of the challenger (plus the collapse diagnostics,
    for the record)."""
    g, metrics = cfg.gate, decision.metrics
    fold_in = bundle_rows(cand, snap.item_ids, snap.val.fold_in)
    h = health(cand, fold_in, cfg.scoring.k, cfg.training.eval_batch_size)
    metrics.update({"challenger_active_units": h["active_units"], "challenger_popularity_share": h["popularity_share"],
                    "challenger_scores_finite": h["finite"]})
    if cfg.diagnostics.enabled and h["finite"] and diagnosable(fold_in):
        collapse = collapse_metrics(cand.model, fold_in, cfg.diagnostics, seed=cfg.training.seed)
        metrics.update({f"challenger_collapse_{k}": v for k, v in collapse.items()})
    decision.checks.append(Check("active latent units", h["active_units"] >= g.min_active_units,
                                 f"{int(h['active_units'])} of {int(h['latent_dim'])} "
                                 f"(floor {g.min_active_units}; active = posterior-mean variance > 0.01)"))
    decision.checks.append(Check("scores finite", bool(h["finite"]),
                                 "every score of every validation user is finite" if h["finite"]
                                 else "non-finite posterior means or scores"))
    share_ok = bool(h["finite"]) and h["popularity_share"] <= g.max_popularity_share
    decision.checks.append(Check(f"top-{cfg.scoring.k} equal to popularity's", share_ok,
                                 f"{h['popularity_share']:.1%} of {snap.val.n_users} users "
                                 f"(at most {g.max_popularity_share:.0%})"))


def _anchors_trained(bundle_dir: str) -> bool:
    """Whether PIA trained a bundle's item anchors: the final lambda_A in the ``evaluation.json``
    that `piarec train` puts in the bundle is above 0 (assumed so for a bundle without one)."""
    path = Path(bundle_dir, "evaluation.json")
    if not path.is_file():
        return True
    try:
        return float(json.loads(path.read_text())["lambda_a_final"]) > 0
    except (KeyError, TypeError, ValueError):  # not the report `piarec train` writes
        return True


def _beyond(decision: GateDecision, lists: dict[str, np.ndarray], popularity: np.ndarray, snap: Snapshot,
            cand: ModelBundle, anchors_trained: bool) -> None:
    """The beyond-accuracy figures of every top-K in ``lists`` (snapshot item space), for the
    record: in ``decision.beyond`` and as ``<who>_coverage_at_100``-style metrics. The intra-list
    similarity of all of them is measured in the challenger's item vectors; snapshot titles
    the challenger does not know get a zero vector (similar to nothing)."""
    vectors, source = item_vectors(cand.model, anchors_trained)
    if vectors is not None:
        to_cand = item_mapping(snap.item_ids, cand.item_ids)
        vectors = np.where((to_cand >= 0)[:, None], vectors[np.clip(to_cand, 0, None)], 0.0)
    decision.item_vectors = f"challenger's {source}" if source else None
    for who in ("challenger", "champion", "popularity"):
        if who in lists:
            decision.beyond[who] = beyond_accuracy(lists[who], popularity, snap.train.n_rows, vectors)
            decision.metrics.update(as_metrics(decision.beyond[who], EVAL_K, f"{who}_"))


def _record(cfg: PipelineConfig, decision: GateDecision) -> None:
    """The decision in MLflow: a ``gate`` run (params, metrics, gate_decision.json) and a
    one-line ``gate_decision`` tag on the version and on its training run."""
    from mlflow.entities import Metric, Param, RunTag

    c = registry.client(cfg)
    name = cfg.mlflow.registered_model
    verdict = "promoted" if decision.promoted else "refused"
    line = f"{verdict}: " + "; ".join(f"{ch.name} {'ok' if ch.passed else 'FAILED'}" for ch in decision.checks)
    run = c.create_run(registry.ensure_experiment(cfg), run_name=f"gate v{decision.challenger}", tags={
        "piarec.stage": "gate", "challenger": decision.challenger,
        "champion_before": decision.champion_before or "", "decision": verdict,
    })
    rid = run.info.run_id
    finite = {k: float(v) for k, v in decision.metrics.items() if np.isfinite(v)}
    now = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in finite.items()],
                params=[Param(k, str(v)) for k, v in cfg.gate.model_dump().items()],
                tags=[RunTag("snapshot", decision.snapshot or "")])
    c.log_text(rid, json.dumps(decision.as_dict(), indent=2, default=str), "gate_decision.json")
    c.log_text(rid, decision.summary() + "\n", "gate_report.txt")
    c.set_terminated(rid)
    c.set_model_version_tag(name, decision.challenger, "gate_decision", line)
    c.set_model_version_tag(name, decision.challenger, "gate_run_id", rid)
    mv = c.get_model_version(name, decision.challenger)
    if mv.run_id:
        c.set_tag(mv.run_id, "gate_decision", line)
