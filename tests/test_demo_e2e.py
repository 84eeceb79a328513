"""End to end: `piarec demo` at small size, every outcome checked against the raw events.

Runs the real command in a subprocess (local Spark, a SQLite MLflow store, a local
folder standing in for S3) and recomputes what each stage should produce with pandas.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

pytestmark = pytest.mark.slow

USERS, ITEMS, DAYS, EPOCHS = 6000, 400, 120, 10
START = dt.date(2026, 1, 1)
# Planted in the environment the way real credentials arrive; must never be written out.
SECRET = "planted-secret-7f3c9a1e5b"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    env.update(AWS_SECRET_ACCESS_KEY=SECRET, MLFLOW_TRACKING_PASSWORD=SECRET)
    proc = subprocess.run(
        [sys.executable, "-m", "piarec", "demo", "--workdir", str(work), "--users", str(USERS),
         "--items", str(ITEMS), "--days", str(DAYS), "--epochs", str(EPOCHS)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((work / "demo-summary.json").read_text())
    events = ds.dataset(str(work / "events"), format="parquet", partitioning="hive").to_table().to_pandas()
    return work, summary, proc.stdout + proc.stderr, events


def _utc(d: dt.date) -> pd.Timestamp:
    return pd.Timestamp(d, tz="UTC")


def test_summary_is_printed(demo):
    _, summary, stdout, _ = demo
    assert "piarec demo — summary" in stdout
    assert f"version {summary['training']['version']}" in stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout


def test_secrets_never_reach_logs_manifests_or_mlflow(demo):
    work, _, output, _ = demo
    assert SECRET not in output
    leaks = [p for p in work.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert (work / "mlflow.db").exists()  # the MLflow store (params, tags) was scanned too


def test_snapshot_counts_match_a_direct_count_of_the_events(demo):
    _, summary, _, ev = demo
    counts = summary["snapshot"]["counts"]
    end = START + dt.timedelta(days=DAYS)
    start = end - dt.timedelta(days=90)
    window = ev[(ev.ts >= _utc(start)) & (ev.ts < _utc(end))]
    assert counts["events_in_window"] == len(window)
    pos = window[window.event_type.isin(["play", "complete"]) & (window.watch_seconds >= 60)]
    pairs = pos[["user_id", "item_id"]].drop_duplicates()
    assert counts["positive"]["pairs"] == len(pairs)
    assert counts["positive"]["users"] == pairs.user_id.nunique()
    per_user = pairs.groupby("user_id").size()
    kept = pairs[pairs.user_id.isin(per_user[per_user >= 5].index)]
    assert counts["after_user_filter"]["users"] == kept.user_id.nunique()
    assert counts["after_user_filter"]["pairs"] == len(kept)
    splits = counts["splits"]
    assert sum(s["users"] for s in splits.values()) == kept.user_id.nunique()
    assert sum(s["nnz"] for s in splits.values()) == len(kept)


def test_model_beats_popularity_on_held_out_users(demo):
    _, summary, _, _ = demo
    test = summary["training"]["test"]
    assert test["model"]["recall_at_20"] >= 1.3 * test["popularity"]["recall_at_20"]
    assert test["model"]["ndcg_at_100"] > test["popularity"]["ndcg_at_100"]


def test_every_active_user_gets_k_unseen_recommendations(demo):
    work, summary, _, ev = demo
    from piarec.daily.publish import arm_manifests
    from piarec.data import reader
    from piarec.data.commit import read_pointer

    day = START + dt.timedelta(days=DAYS - 1)
    part = work / "recommendations" / f"dt={day}"
    pointer = read_pointer(str(part))  # the day's _SUCCESS: its commit pointer
    assert pointer is not None and list(pointer.manifest["arms"]) == ["champion"]
    assert pointer.version == summary["recommendations"]["manifest"]["version"]
    assert sorted(p.name for p in part.iterdir()) == ["_SUCCESS", "_versions"]
    assert [p.name for p in (part / "_versions").iterdir()] == [pointer.version]
    recs = reader.read_arm(str(part), "champion").to_pandas()
    assert arm_manifests(pointer.manifest)["champion"]["counts"]["users"] == len(recs)

    window = ev[(ev.ts >= _utc(day - dt.timedelta(days=90))) & (ev.ts < _utc(day + dt.timedelta(days=1)))]
    active = set(window.user_id)
    assert set(recs.user_id) == active
    assert recs.user_id.is_unique
    assert (recs.item_ids.map(len) == 100).all()
    assert (recs.scores.map(len) == 100).all()

    seen = window[window.event_type.isin(["play", "complete"])].groupby("user_id").item_id.agg(set)
    overlap = sum(len(seen.get(u, set()) & set(items)) for u, items in zip(recs.user_id, recs.item_ids))
    assert overlap == 0
    # scores are in rank order
    assert all(np.all(np.diff(np.asarray(s)) <= 0) for s in recs.scores)
    version = summary["training"]["version"]
    assert set(recs.model_version) == {version}
    assert set(recs.source) <= {"model", "popularity"} and (recs.source == "model").mean() > 0.9


def test_mlflow_holds_run_version_and_champion(demo):
    work, summary, _, _ = demo
    from mlflow import MlflowClient

    uri = f"sqlite:///{work}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(summary["training"]["run_id"])
    assert run.data.params["pia.enabled"] == "True"
    history = client.get_metric_history(run.info.run_id, "val_ndcg_at_100")
    assert len(history) == EPOCHS
    champion = client.get_model_version_by_alias("piarec", "champion")
    assert str(champion.version) == summary["training"]["version"]
    assert champion.run_id == run.info.run_id
    assert client.get_model_version_by_alias("piarec", "challenger").version == champion.version
