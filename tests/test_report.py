"""`piarec report` on a real published snapshot and a real MLflow run (SQLite store)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from piarec.registry import client as registry
from piarec.cli import main
from piarec.evaluate.report import activity_cohorts, cohort_silhouette
from piarec.registry.runs import REPORT_ARTIFACT_DIR, report_run
from piarec.train.job import run_training
from piarec.data.snapshot import Split
from piarec.data.csr import CSR
from test_gate import planted, small_cfg, write_snapshot

pytestmark = pytest.mark.filterwarnings("ignore")


def _mixed_activity_split(prefix: str, seed: int) -> Split:
    """Held-out users of the planted blocks with 4, 10 or 20 items each (three cohorts)."""
    from conftest import planted_split

    parts = [planted_split(24, per_user=n, fold_in=n - 2, seed=seed + n) for n in (4, 10, 20)]
    stack = lambda csrs: CSR.from_lists([c.row(u) for c in csrs for u in range(c.n_rows)], csrs[0].n_cols)  # noqa: E731
    return Split(np.array([f"{prefix}{i}" for i in range(72)], dtype=object),
                 stack([p[1] for p in parts]), stack([p[2] for p in parts]))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    snap = dataclasses.replace(planted(), val=_mixed_activity_split("v", 1), test=_mixed_activity_split("w", 2))
    uri = write_snapshot(snap, root / "snapshots" / "window_end=2026-04-01")
    cfg = small_cfg(root)
    cfg.training.epochs = 6
    out = run_training(cfg, uri)
    return cfg, snap, out["run_id"], root


def test_report_writes_and_logs_sane_artifacts(trained_run):
    cfg, snap, run_id, root = trained_run
    out_dir = root / "out"
    report = report_run(cfg, run_id, out_dir)
    for name in ("tsne.png", "report.json", "report.md"):
        assert (out_dir / name).stat().st_size > 0
    assert (out_dir / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {f.path for f in registry.client(cfg).list_artifacts(run_id, REPORT_ARTIFACT_DIR)}
    assert {f"{REPORT_ARTIFACT_DIR}/{n}" for n in ("tsne.png", "report.json", "report.md")} <= logged

    t = report["tsne"]
    assert -1.0 <= t["silhouette"] <= 1.0
    assert t["users"] == snap.val.n_users + snap.test.n_users
    assert sum(t["cohort_sizes"]) == t["users"]
    assert sum(row["users"] for row in report["groups"]) == snap.test.n_users
    assert len(t["cohorts"]) >= 2
    c = report["collapse"]
    assert 0 <= c["active_units"] <= c["latent_dim"] == 16
    assert 0 <= c["mutual_info"] <= c["mutual_info_bound"] + 1e-9
    assert len(report["kl_per_dim"]) == 16
    assert sum(report["kl_per_dim"]) == pytest.approx(c["kl_mean"], rel=1e-6)
    # A trained model ranks the planted blocks: far above chance on the held-out items.
    assert report["test_metrics"]["ndcg_at_100"] > 0.3
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["tsne"]["silhouette"] == pytest.approx(t["silhouette"])


def test_report_command_prints_one_json(trained_run, capsys, monkeypatch, tmp_path):
    cfg, _, run_id, root = trained_run
    monkeypatch.setenv("PIAREC__STORAGE__ROOT", str(root))
    for key, value in (("MODEL__HIDDEN_DIM", "64"), ("MODEL__LATENT_DIM", "16")):
        monkeypatch.setenv(f"PIAREC__{key}", value)
    assert main(["report", "--run", run_id, "--out", str(tmp_path / "r")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out_dir"] == str(tmp_path / "r") and (tmp_path / "r" / "tsne.png").exists()
    assert main(["report", "--run", "no-such-run", "--out", str(tmp_path / "x")]) == 2


def test_cohorts_and_silhouette_on_a_known_layout():
    counts = np.array([6] * 12 + [30] * 12 + [70] * 12 + [200] * 12)
    labels, names = activity_cohorts(counts)
    assert names == ["[5-10]", "[11-50]", "[51-100]", "[100+]"]
    np.testing.assert_array_equal(np.bincount(labels), [12, 12, 12, 12])
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    rng = np.random.default_rng(0)
    tight = centres[labels] + rng.normal(scale=0.1, size=(48, 2))
    assert cohort_silhouette(tight, labels) > 0.9
    mixed = rng.normal(size=(48, 2))
    assert abs(cohort_silhouette(mixed, labels)) < 0.2
    assert math.isnan(cohort_silhouette(tight, np.zeros(48, dtype=np.int64)))
