"""The arms of a daily scoring run: any number of named arms, each a registered model or a
built-in baseline with a share of the users, split by a salted hash of user_id (stable
from day to day for a fixed salt). Each arm's model travels to executors as the bytes of
its bundle files.

Where the arms come from (:func:`arm_specs`): ``--arms`` on the command line, else
``scoring.arms``, else ``scoring.model_uri`` as arm ``scoring.arm`` plus, when set, the
challenger (``scoring.challenger_uri``, ``challenger_share`` of the users).

Baselines (:data:`piarec.config.BASELINES`) are fitted when the run starts, on
``scoring.baseline_snapshot`` or else the snapshot the run's first model arm was trained on:
``popularity`` ranks titles by training users, ``ease`` is EASE with its lambda picked on
the snapshot's validation users (:func:`piarec.evaluate.protocol.fit_ease_on_validation`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from piarec.config import BASELINES, ArmConfig, PipelineConfig, check_arms
from piarec.errors import ConfigError
from piarec.models.bundle import (BUNDLE_FILES, ModelBundle, files_digest, load_bundle, local_version,
                                  read_bundle_files, save_bundle)
from piarec.registry.client import ModelRef, load_model
from piarec.scoring.arrow import user_hash

log = logging.getLogger(__name__)

ASSIGNMENT = ("h = fmix64(fnv1a64(salt + \"\\0\" + user_id)); arms[1:] take consecutive ranges "
              "[c_(i-1), c_i) * 2^64 of h in order (c_i: their cumulative shares), arms[0] the rest")
MODEL = "model"  # the kind of an arm scored by a model from the registry or a bundle folder


@dataclass(frozen=True)
class Assignment:
    """Which arm each user is in: picklable, so Spark tasks carry it (no models inside)."""

    salt: str
    shares: tuple[float, ...]  # arms in order; arms[0] takes what the others leave

    def assign(self, user_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int8 [B]: the index of each user's arm."""
        if len(self.shares) == 1:
            return np.zeros(len(user_ids), np.int8)
        ends = np.cumsum(self.shares[1:])
        bounds = np.array([min(int(e * 2.0**64), 2**64 - 1) for e in ends], np.uint64)
        pos = np.searchsorted(bounds, user_hash(user_ids, self.salt), side="right")
        return np.where(pos == len(bounds), 0, pos + 1).astype(np.int8)


@dataclass(frozen=True)
class Arm:
    """One arm of a run: its name, its model and the bytes executors load it from."""

    name: str
    bundle: ModelBundle = field(repr=False)
    ref: ModelRef
    files: dict[str, bytes] = field(repr=False)  # the bundle's files; weights load weights-only
    digest: str  # sha256 over the files
    share: float = 1.0
    kind: str = MODEL  # MODEL, or the baseline's name
    fitted: dict[str, Any] = field(default_factory=dict)  # a baseline's snapshot and parameters

    @property
    def version(self) -> str:
        """What the rows' ``model_version`` says: the registry version, ``<baseline>-<digest>``
        for a baseline, else ``local-<digest>``."""
        if self.kind != MODEL:
            return f"{self.kind}-{self.digest[:12]}"
        return self.ref.version or local_version(self.digest)

    def model_info(self) -> dict[str, Any]:
        return {**self.ref.info(), "kind": self.kind, "version": self.version, "digest": self.digest,
                "n_items": self.bundle.n_items, **({"fitted": self.fitted} if self.fitted else {})}


@dataclass(frozen=True)
class ArmPlan:
    """The arms of a run (``arms[0]`` takes the users the others leave) and their split."""

    arms: list[Arm]
    salt: str

    @property
    def assignment(self) -> Assignment:
        return Assignment(self.salt, tuple(a.share for a in self.arms))

    def assign(self, user_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int8 [B]: the index in :attr:`arms` of each user's arm."""
        return self.assignment.assign(user_ids)

    def shares(self) -> dict[str, float]:
        return {a.name: a.share for a in self.arms}

    def assignment_info(self) -> dict[str, Any]:
        return {"method": ASSIGNMENT, "salt": self.salt, "shares": self.shares()}


def bundle_files(ref: ModelRef) -> tuple[dict[str, bytes], str]:
    """The bytes of a resolved model's bundle files and their sha256 digest."""
    files = read_bundle_files(ref.local_dir)
    return files, files_digest(files)


def bundle_from_files(files: dict[str, bytes], info: dict[str, Any] | None = None) -> ModelBundle:
    """Load a bundle from its files' bytes through :func:`piarec.models.bundle.load_bundle` (the one
    loader: validation and a weights-only load), via a private temporary folder."""
    with tempfile.TemporaryDirectory(prefix="piarec-bundle-") as tmp:
        for name in BUNDLE_FILES:
            Path(tmp, name).write_bytes(files[name])
        return load_bundle(tmp, info)


def arm_specs(
    cfg: PipelineConfig,
    *,
    arms: list[ArmConfig] | None = None,
    model_uri: str | None = None,
    arm: str | None = None,
    challenger_uri: str | None = None,
    challenger_share: float | None = None,
) -> list[ArmConfig]:
    """The arms of a run: ``arms`` when given (``--arms``), else ``scoring.arms`` when set,
    else the control model (``model_uri`` or ``scoring.model_uri``, named ``arm`` or
    ``scoring.arm``) and the challenger when one is given or configured."""
    s = cfg.scoring
    single = model_uri or challenger_uri or arm or challenger_share is not None
    if arms or s.arms:
        if single:
            raise ConfigError(f"{'--arms' if arms else 'scoring.arms'} names the arms: leave out "
                              "--model, --arm, --challenger and --challenger-share")
        return list(arms or s.arms)
    challenger_uri = challenger_uri or s.challenger_uri
    share = s.challenger_share if challenger_share is None else challenger_share
    if challenger_uri and not 0.0 < share < 1.0:
        raise ConfigError(f"the challenger share must be in (0, 1), got {share}")
    control = _arm(arm or s.arm, model_uri or s.model_uri, 1.0 - share if challenger_uri else 1.0)
    if not challenger_uri:
        return [control]
    if control.name == s.challenger_arm:
        raise ConfigError(f"the control arm and scoring.challenger_arm are both {control.name!r}; name them apart")
    return [control, _arm(s.challenger_arm, challenger_uri, share)]


def _arm(name: str, model: str, share: float, entry: str | None = None) -> ArmConfig:
    """An arm config; a bad name, model or share is a :class:`ConfigError` naming it."""
    try:
        return ArmConfig(name=name, model=model, share=share)
    except ValidationError as exc:  # the first problem, by field
        e = exc.errors()[0]
        field = ".".join(map(str, e["loc"]))
        raise ConfigError(f"arm {entry or name!r}: {field} {e['input']!r}: {e['msg']}") from None


def parse_arms(text: str) -> list[ArmConfig]:
    """``NAME=MODEL:SHARE[,NAME=MODEL:SHARE...]`` (``--arms``; the daily DAG's ``arms``
    param) -> arm configs, checked like ``scoring.arms``; :class:`ConfigError` names the
    entry that is wrong."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, eq, rest = entry.partition("=")
        model, colon, share = rest.rpartition(":")
        if not (eq and colon and name and model):
            raise ConfigError(f"arm {entry!r} must read NAME=MODEL:SHARE (e.g. control=popularity:0.1)")
        try:
            value = float(share)
        except ValueError:
            raise ConfigError(f"arm {entry!r} must read NAME=MODEL:SHARE: {share!r} is not a number") from None
        out.append(_arm(name, model, value, entry))
    if not out:
        raise ConfigError("--arms names no arm")
    try:
        check_arms(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return out


def plan_arms(cfg: PipelineConfig, specs: list[ArmConfig]) -> ArmPlan:
    """Resolve and load every arm's model; fit the baselines (see the module docstring)."""
    try:
        check_arms(specs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    loaded: dict[str, Arm] = {}
    for spec in specs:  # models first: the baselines' default snapshot is the first model's
        if spec.model not in BASELINES:
            bundle, ref = load_model(cfg, spec.model)
            files, digest = bundle_files(ref)
            loaded[spec.name] = Arm(spec.name, bundle, ref, files, digest, spec.share)
    baselines = [s for s in specs if s.model in BASELINES]
    if baselines:
        snapshot = cfg.scoring.baseline_snapshot or _first_model_snapshot(cfg, [loaded[s.name] for s in specs
                                                                                 if s.name in loaded])
        fits = _BaselineFits(snapshot)
        for spec in baselines:
            loaded[spec.name] = fits.arm(spec)
    return ArmPlan([loaded[s.name] for s in specs], cfg.scoring.ab_salt)


def plan_models(cfg: PipelineConfig, model_uri: str, challenger_uri: str | None = None,
                challenger_share: float | None = None, arm: str | None = None) -> ArmPlan:
    """Shorthand for a control model and an optional challenger given by URI."""
    return plan_arms(cfg, arm_specs(cfg, model_uri=model_uri, arm=arm, challenger_uri=challenger_uri,
                                    challenger_share=challenger_share))


def _first_model_snapshot(cfg: PipelineConfig, models: list[Arm]) -> str:
    from piarec.registry.client import training_snapshot

    first = models[0].ref if models else None  # the first model arm only: its snapshot is the run's
    if first is not None and (first.name is not None or first.run_id is not None):
        uri = training_snapshot(cfg, first.name, first.version, first.run_id)
        if uri:
            return uri
    raise ConfigError("a baseline arm needs a snapshot to fit on: set scoring.baseline_snapshot, or put a registered "
                      "model (trained by `piarec train`) first among the model arms")


class _BaselineFits:
    """The baselines of one run, fitted on one snapshot (loaded once)."""

    def __init__(self, snapshot_uri: str):
        from piarec.data.snapshot import load_snapshot

        self.snap = load_snapshot(snapshot_uri)
        self.fitted = {"snapshot_uri": self.snap.uri, "snapshot_manifest_sha256": self.snap.manifest_digest()}

    def arm(self, spec: ArmConfig) -> Arm:
        from piarec.models.baselines import ease_ranker, popularity_ranker, train_popularity

        popularity = train_popularity(self.snap.train)
        fitted = dict(self.fitted)
        if spec.model == "popularity":
            model = popularity_ranker(popularity, **fitted)
        else:
            from piarec.evaluate.protocol import fit_ease_on_validation

            if self.snap.val.n_users == 0:
                raise ConfigError(f"snapshot {self.snap.uri!r} has no validation users to pick EASE's lambda on")
            ease = fit_ease_on_validation(self.snap.train, self.snap.val)
            fitted.update({"lambda": ease.lam, "val_ndcg_at_100": {str(k): v for k, v in ease.val_ndcg.items()}})
            model = ease_ranker(ease, **self.fitted)  # (ease_ranker records the lambda)
            log.info("arm %s: EASE lambda %g fitted on %s", spec.name, ease.lam, self.snap.uri)
        with tempfile.TemporaryDirectory(prefix="piarec-baseline-") as tmp:
            save_bundle(tmp, model, self.snap.item_ids, popularity)
            files, digest = bundle_files(ModelRef(tmp, None, None, None, spec.model))
        ref = ModelRef("", None, None, None, spec.model)  # fitted in memory: no folder stays
        bundle = bundle_from_files(files, ref.info())
        return Arm(spec.name, bundle, ref, files, digest, spec.share, kind=spec.model, fitted=fitted)
