"""The promotion gate on a real MLflow store and a real published snapshot.

The snapshot is the planted checkerboard (tests/conftest.py) committed in the published
layout (a commit pointer and one version), so the gate loads it with ``load_snapshot``
like in production. Models are
trained by ``run_training`` (a good model), or derived from it to break one contract
(a regression, posterior collapse, non-finite scores) and registered as challenger.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from piarec.registry import client as registry
from piarec.evaluate.beyond import beyond_accuracy, coverage, describe, novelty, popularity_bias
from piarec.evaluate.protocol import model_topk, popularity_topk
from piarec.models.baselines import train_popularity
from piarec.models.bundle import save_bundle
from piarec.config import load_config
from piarec.registry.gate import CHALLENGER, CHAMPION, promote
from piarec.data.commit import PartitionCommit, read_pointer
from piarec.data.snapshot import SCHEMA_VERSION, Snapshot, load_snapshot
from piarec.train.job import _log_pyfunc, run_training
from piarec.data import layout

pytestmark = pytest.mark.filterwarnings("ignore")


def write_snapshot(snap: Snapshot, uri: Path) -> str:
    """Write an in-memory snapshot in the published layout of pipelines/build_matrix.py:
    one commit of the partition (:class:`~piarec.data.commit.PartitionCommit`), the files
    under its version and the manifest in the commit pointer ``_SUCCESS``."""
    n_items = snap.n_items
    users, inter = [], []
    for split, ids, parts in (("train", snap.train_user_ids, {"train": snap.train}),
                              ("val", snap.val.user_ids, {"fold_in": snap.val.fold_in, "held_out": snap.val.held_out}),
                              ("test", snap.test.user_ids, {"fold_in": snap.test.fold_in, "held_out": snap.test.held_out})):
        base = len(users)
        users += [(base + i, str(u), split) for i, u in enumerate(ids)]
        for part, csr in parts.items():
            for r in range(csr.n_rows):
                inter += [(base + r, int(i), part) for i in csr.row(r)]
    counts = {}
    for split, ids, parts in (("train", snap.train_user_ids, {"train": snap.train.nnz}),
                              ("val", snap.val.user_ids, {"fold_in": snap.val.fold_in.nnz, "held_out": snap.val.held_out.nnz}),
                              ("test", snap.test.user_ids, {"fold_in": snap.test.fold_in.nnz, "held_out": snap.test.held_out.nnz})):
        counts[split] = {"users": len(ids), "train": 0, "fold_in": 0, "held_out": 0, **parts}
    with PartitionCommit(str(uri), what="snapshot") as run:
        data = Path(run.data_uri)
        for name, table in (
            ("items", pa.table({"item_idx": pa.array(np.arange(n_items), pa.int32()),
                                "item_id": pa.array(list(map(str, snap.item_ids))),
                                "n_users": pa.array(snap.item_popularity.astype(np.int32))})),
            ("users", pa.table({"user_idx": pa.array([u[0] for u in users], pa.int32()),
                                "user_id": [u[1] for u in users], "split": [u[2] for u in users]})),
            ("interactions", pa.table({"user_idx": pa.array([r[0] for r in inter], pa.int32()),
                                       "item_idx": pa.array([r[1] for r in inter], pa.int32()),
                                       "part": [r[2] for r in inter]})),
        ):
            (data / name).mkdir(parents=True)
            pq.write_table(table, data / name / "part-0.parquet")
        manifest = {"schema_version": SCHEMA_VERSION, "window": snap.manifest["window"],
                    "counts": {"after_user_filter": {"items": n_items}, "splits": counts}}
        run.commit(manifest)
    return str(uri)


def planted(n_train: int = 800) -> Snapshot:
    """The planted checkerboard of tests/conftest.py as a Snapshot (users of 8 blocks)."""
    from conftest import planted_split

    from piarec.data.snapshot import Split

    train, _, _ = planted_split(n_train, seed=0)
    _, vf, vh = planted_split(64, seed=1)
    _, tf, th = planted_split(64, seed=2)
    ids = lambda prefix, n: np.array([f"{prefix}{i}" for i in range(n)], dtype=object)  # noqa: E731
    return Snapshot(uri="memory://planted", manifest={"window": {"start": "2026-01-01", "end": "2026-04-01"}},
                    item_ids=ids("t", train.n_cols),
                    item_popularity=np.bincount(train.indices, minlength=train.n_cols).astype(np.int64),
                    train=train, train_user_ids=ids("u", train.n_rows),
                    val=Split(ids("v", 64), vf, vh), test=Split(ids("w", 64), tf, th))


def small_cfg(root: Path, **gate):
    return load_config(environ={}, overrides={
        "storage": {"root": str(root)},
        "model": {"hidden_dim": 64, "latent_dim": 16},
        "training": {"epochs": 15, "batch_size": 100, "lr": 3e-3, "anneal_steps": 2000, "device": "cpu"},
        "scoring": {"k": 20},
        "gate": {"min_active_units": 3, **gate},
    })


def register_challenger(cfg, snapshot_uri: str, model, item_ids, popularity) -> str:
    """Register ``model`` the way `piarec train` does and point ``challenger`` at it."""
    with mlflow.start_run(experiment_id=registry.ensure_experiment(cfg)) as run, \
            tempfile.TemporaryDirectory() as tmp:
        save_bundle(Path(tmp, "bundle"), model, item_ids, popularity)
        info = _log_pyfunc(cfg, Path(tmp, "bundle"))
        version = registry.register_version(cfg, run.info.run_id, model_id=info.model_id,
                                            tags={"snapshot_uri": snapshot_uri})
    registry.set_alias(cfg, CHALLENGER, version)
    return version


def train_planted(root: Path):
    """The planted snapshot published under ``root`` and a first model trained on it by
    ``run_training`` (version 1, challenger): ``(cfg, snap, snapshot uri, training summary)``."""
    snap = planted()
    uri = write_snapshot(snap, root / "snapshots" / "window_end=2026-04-01")
    cfg = small_cfg(root)
    return cfg, snap, uri, run_training(cfg, uri)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A published planted snapshot and a first model trained on it (version 1, challenger)."""
    cfg, _, uri, out = train_planted(tmp_path_factory.mktemp("gate"))
    return cfg, uri, out


def test_the_planted_snapshot_is_committed_and_loads(trained):
    _, uri, _ = trained
    pointer = read_pointer(uri)
    assert pointer is not None and pointer.manifest["schema_version"] == SCHEMA_VERSION
    assert sorted(p.name for p in Path(uri).iterdir()) == ["_SUCCESS", "_versions"]
    assert [p.name for p in (Path(uri) / "_versions").iterdir()] == [pointer.version]
    assert sorted(f["path"] for f in pointer.files) == [
        f"_versions/{pointer.version}/{name}/part-0.parquet" for name in ("interactions", "items", "users")]
    snap, want = load_snapshot(uri), planted()
    assert list(snap.item_ids) == list(want.item_ids) and list(snap.train_user_ids) == list(want.train_user_ids)
    for got, exp in ((snap.train, want.train), (snap.val.fold_in, want.val.fold_in),
                     (snap.test.held_out, want.test.held_out)):
        assert np.array_equal(got.indptr, exp.indptr) and np.array_equal(got.indices, exp.indices)


def _bundle(cfg, version):
    bundle, _ = registry.load_model(cfg, f"models:/{cfg.mlflow.registered_model}/{version}")
    return bundle


def _failed(decision) -> set[str]:
    return {re.sub(r" v\d+$", "", c.name) for c in decision.checks if not c.passed}


def test_training_reports_beyond_accuracy_on_validation_users(trained):
    """evaluation.json's ``beyond`` block, the run's metrics and the version's tags hold the
    beyond-accuracy figures of the model's and popularity's validation top-100."""
    cfg, uri, out = trained
    snap, bundle = load_snapshot(uri), _bundle(cfg, "1")
    beyond = out["beyond"]
    assert beyond["k"] == 100 and beyond["item_vectors"] == "pia_anchors"  # PIA on: lambda_A > 0
    popularity = train_popularity(snap.train)
    lists = {"model": model_topk(bundle.model, snap.val.fold_in), "popularity": popularity_topk(popularity, snap.val.fold_in)}
    anchors = bundle.model.item_anchors().detach().numpy()
    for who, topk in lists.items():
        assert beyond["val"][who] == pytest.approx(beyond_accuracy(topk, popularity, snap.train.n_rows, anchors))
    pop, model = beyond["val"]["popularity"], beyond["val"]["model"]
    # Popularity's lists are its top 100 less each user's 6 fold-in titles, refilled from
    # ranks 101-106: at least 100 and at most 106 of the 200 titles; 14-20 head titles
    # (the top 20) in every list. The model spreads over the planted blocks.
    assert 100 / 200 <= pop["coverage"] <= 106 / 200 < model["coverage"]
    assert 0.14 <= pop["popularity_bias"] <= 0.20
    # Popularity picks each user's least surprising unseen titles: nothing is less novel.
    assert model["novelty_bits"] > pop["novelty_bits"]
    c = registry.client(cfg)
    mv = c.get_model_version("piarec", "1")
    metrics = c.get_run(mv.run_id).data.metrics
    for key, name in (("coverage", "coverage"), ("novelty_bits", "novelty"), ("popularity_bias", "popularity_bias"),
                      ("intra_list_similarity", "ils")):
        assert mv.tags[f"val_{name}_at_100"] == f"{model[key]:.6f}"
        assert metrics[f"val_{name}_at_100"] == pytest.approx(model[key])
    assert describe(model) in mv.description


def test_first_model_is_promoted_when_it_beats_popularity(trained):
    cfg, uri, out = trained
    decision = promote(cfg)
    assert decision.promoted, decision.summary()
    assert decision.champion_before is None and decision.challenger == out["version"] == "1"
    assert registry.alias_version(cfg, CHAMPION) == "1"
    assert decision.metrics["challenger_ndcg_at_100"] > decision.metrics["popularity_ndcg_at_100"]
    assert decision.metrics["challenger_active_units"] >= 3
    assert "promoted to champion" in decision.summary().splitlines()[0]
    # Beyond accuracy, for the record: the gate ranks the same model on the same users as
    # training did, so its figures are training's; popularity's are beyond.py's on its lists.
    snap = load_snapshot(uri)
    popularity = train_popularity(snap.train)
    pop_topk = popularity_topk(popularity, snap.val.fold_in)
    assert list(decision.beyond) == ["challenger", "popularity"]
    assert decision.item_vectors == "challenger's pia_anchors"
    assert decision.beyond["challenger"] == pytest.approx(out["beyond"]["val"]["model"])
    assert decision.beyond["popularity"] == pytest.approx(out["beyond"]["val"]["popularity"])
    assert decision.beyond["popularity"]["coverage"] == pytest.approx(coverage(pop_topk, snap.n_items))
    assert decision.beyond["popularity"]["novelty_bits"] == pytest.approx(novelty(pop_topk, popularity, snap.train.n_rows))
    assert decision.beyond["popularity"]["popularity_bias"] == pytest.approx(popularity_bias(pop_topk, popularity))
    lines = decision.summary().splitlines()
    for who in ("challenger", "popularity"):
        assert f"  beyond-accuracy@100 {who}: {describe(decision.beyond[who])}" in lines
    assert all(c.passed for c in decision.checks)  # informational: no check of its own
    # The decision is in MLflow: tags on the version and a gate run with its report.
    c = registry.client(cfg)
    mv = c.get_model_version("piarec", "1")
    assert mv.tags["gate_decision"].startswith("promoted")
    gate_run = c.get_run(mv.tags["gate_run_id"])
    assert gate_run.data.tags["decision"] == "promoted"
    assert gate_run.data.metrics["challenger_ndcg_at_100"] == pytest.approx(decision.metrics["challenger_ndcg_at_100"])
    assert gate_run.data.metrics["popularity_coverage_at_100"] == pytest.approx(decision.beyond["popularity"]["coverage"])
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=gate_run.info.run_id, artifact_path="gate_decision.json", tracking_uri=layout.tracking_uri(cfg.mlflow, cfg.storage))).read_text())
    assert report["promoted"] is True
    assert report["beyond"]["challenger"] == pytest.approx(decision.beyond["challenger"])


def test_regression_is_refused_and_champion_stays(trained):
    cfg, uri, out = trained
    good = _bundle(cfg, "1")
    worse = good.model
    torch.manual_seed(1)
    with torch.no_grad():  # scramble the decoder: it no longer knows the planted blocks
        for layer in worse.decoder:
            layer.weight.copy_(layer.weight[torch.randperm(layer.weight.shape[0])])
    version = register_challenger(cfg, uri, worse, good.item_ids, good.popularity)
    decision = promote(cfg)
    assert not decision.promoted
    assert {"ndcg_at_100 vs champion", "recall_at_20 vs champion"} <= _failed(decision), decision.summary()
    # The champion (version 1) has the figures it was trained with: ILS is measured in the
    # challenger's anchors, which scrambling the decoder left as version 1's.
    assert list(decision.beyond) == ["challenger", "champion", "popularity"]
    assert decision.beyond["champion"] == pytest.approx(out["beyond"]["val"]["model"])
    # Version 1 ranks each user's planted block first, titles PIA placed together; the
    # scrambled decoder's lists are closer to arbitrary.
    ils = {who: f["intra_list_similarity"] for who, f in decision.beyond.items()}
    assert ils["champion"] > ils["challenger"]
    assert f"  beyond-accuracy@100 champion: {describe(decision.beyond['champion'])}" in decision.summary().splitlines()
    assert registry.alias_version(cfg, CHAMPION) == "1"
    assert registry.client(cfg).get_model_version("piarec", version).tags["gate_decision"].startswith("refused")


def test_posterior_collapse_is_refused(trained):
    cfg, uri, _ = trained
    good = _bundle(cfg, "1")
    collapsed = good.model
    with torch.no_grad():  # the encoder ignores its input: one posterior for every user
        collapsed.item_in.zero_()
    register_challenger(cfg, uri, collapsed, good.item_ids, good.popularity)
    decision = promote(cfg)
    assert not decision.promoted
    assert "active latent units" in _failed(decision), decision.summary()
    assert decision.metrics["challenger_active_units"] == 0
    assert registry.alias_version(cfg, CHAMPION) == "1"


def test_non_finite_scores_are_refused(trained):
    cfg, uri, _ = trained
    good = _bundle(cfg, "1")
    broken = good.model
    with torch.no_grad():
        broken.decoder[-1].bias[3] = float("nan")
    register_challenger(cfg, uri, broken, good.item_ids, good.popularity)
    decision = promote(cfg)
    assert not decision.promoted
    assert "scores finite" in _failed(decision), decision.summary()


def test_an_equal_challenger_is_promoted_and_a_manual_alias_move_is_honoured(trained):
    cfg, uri, _ = trained
    good = _bundle(cfg, "1")
    version = register_challenger(cfg, uri, good.model, good.item_ids, good.popularity)
    decision = promote(cfg)
    assert decision.promoted, decision.summary()
    assert decision.champion_before == "1" and registry.alias_version(cfg, CHAMPION) == version
    # A person moves the alias back in the MLflow UI: the next resolution follows it.
    registry.client(cfg).set_registered_model_alias("piarec", CHAMPION, "1")
    assert registry.resolve_model(cfg, "models:/piarec@champion").version == "1"


def test_a_model_of_another_catalogue_is_refused(trained, capsys):
    """A challenger whose vocabulary does not match the snapshot it is gated on (registered
    from another catalogue, or tagged with the wrong snapshot) is refused by name, before
    its metrics on mostly unknown titles can mislead anyone."""
    from piarec.cli import main

    cfg, uri, _ = trained
    champion = registry.alias_version(cfg, CHAMPION)
    good = _bundle(cfg, "1")
    foreign = np.array([f"other-{i}" for i in good.item_ids], dtype=object)
    quarter = len(foreign) // 4
    foreign[:quarter] = good.item_ids[:quarter]
    register_challenger(cfg, uri, good.model, foreign, good.popularity)
    decision = promote(cfg)
    assert not decision.promoted and "vocabulary" in _failed(decision), decision.summary()
    assert decision.metrics["challenger_vocabulary_overlap"] == pytest.approx(quarter / len(foreign))
    assert registry.alias_version(cfg, CHAMPION) == champion
    # The CLI says why, and exits 1 with --strict.
    (Path(cfg.storage.root) / "gate.yaml").write_text(
        f"storage: {{root: '{cfg.storage.root}'}}\nscoring: {{k: 20}}\ngate: {{min_active_units: 3}}\n")
    assert main(["--config", str(Path(cfg.storage.root) / "gate.yaml"), "promote", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] vocabulary" in out and f"{quarter / len(foreign):.1%}" in out
