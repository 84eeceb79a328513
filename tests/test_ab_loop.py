"""The closed loop: `piarec demo --ab` scores days with the champion against a popularity
control, simulates each next day's card events from what users were served and their
planted tastes, and reports. The tastes are planted, so the direction is known: the
champion must be ahead with intervals that exclude zero. One figure is recomputed from the
raw events and the committed lists with pandas, by the attribution rule of
docs/ab-logging.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow.dataset as ds
import pytest

from piarec.data import reader

pytestmark = pytest.mark.slow

USERS, ITEMS, DAYS, EPOCHS, AB_DAYS = 3000, 300, 100, 8, 4
START = dt.date(2026, 1, 1)
FIRST = START + dt.timedelta(days=DAYS)  # the first simulated day


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    work = tmp_path_factory.mktemp("ab-loop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    proc = subprocess.run(
        [sys.executable, "-m", "piarec", "demo", "--workdir", str(work), "--users", str(USERS), "--items", str(ITEMS),
         "--days", str(DAYS), "--epochs", str(EPOCHS), "--ab", "--ab-days", str(AB_DAYS)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((work / "demo-summary.json").read_text())
    return work, summary, proc.stdout, env


def period(report_uri: str) -> dict[tuple[str, str], dict]:
    got = reader.open_committed(report_uri)
    rows = ds.dataset(f"{got.base}/report.parquet").to_table().to_pylist()
    return {(r["arm"], r["metric"]): r for r in rows if r["scope"] == "period"}


def test_the_champion_beats_the_popularity_control_with_intervals_above_zero(loop):
    work, summary, stdout, _ = loop
    report = summary["ab"]["report"]
    assert (report["from"], report["to"]) == (str(FIRST), str(FIRST + dt.timedelta(days=AB_DAYS - 1)))
    assert report["control"] == "control" and report["models"]["control"]["kind"] == "popularity"
    assert report["srm"]["mismatch"] is False
    rows = period(report["uri"])
    for metric in ("click_rate_per_view", "click_rate_per_user_view", "playtime_per_user_view", "rec_plays_per_user"):
        champion = rows[("champion", metric)]
        assert champion["control"] == "control" and champion["uplift_low"] > 0, (metric, champion)
    assert "A/B " in stdout and "click rate per view: control" in stdout


def test_a_figure_recomputed_from_the_events_and_the_served_lists(loop):
    work, summary, _, _ = loop
    rows = period(summary["ab"]["report"]["uri"])
    days = [str(work / "events" / f"dt={FIRST + dt.timedelta(days=i)}" / "part-00000.parquet") for i in range(AB_DAYS)]
    events = ds.dataset(days, format="parquet").to_table(
        columns=["user_id", "item_id", "event_type", "ts", "surface"]).to_pandas()
    events = events[events.surface.notna()]
    events["day"] = events.ts.dt.tz_convert("UTC").dt.date
    served = []
    for i in range(AB_DAYS):
        day = FIRST + dt.timedelta(days=i)
        lists = reader.read_table(str(work / "recommendations" / f"dt={day - dt.timedelta(days=1)}"),
                                  columns=["user_id", "item_ids", "arm"]).to_pandas()
        lists["day"] = day
        served.append(lists)
    served = pd.concat(served)
    rec = served.explode("item_ids").rename(columns={"item_ids": "item_id"})
    ev = events.merge(served[["day", "user_id", "arm"]], on=["day", "user_id"])
    ev = ev.merge(rec.assign(rec=True)[["day", "user_id", "item_id", "rec"]], on=["day", "user_id", "item_id"], how="left")
    for arm in ("champion", "control"):
        mine = ev[ev.arm == arm]
        views = mine[mine.event_type == "impression"].drop_duplicates(["user_id", "surface", "ts"]).shape[0]
        clicks = int(((mine.event_type == "click") & mine.rec.fillna(False).astype(bool)).sum())
        assert rows[(arm, "views")]["value"] == views
        assert rows[(arm, "click_rate_per_view")]["value"] == pytest.approx(clicks / views, rel=1e-12)


def test_the_report_is_in_mlflow_and_the_cli_reruns_it(loop):
    from mlflow import MlflowClient

    work, summary, _, env = loop
    report = summary["ab"]["report"]
    c = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    run = c.get_run(report["run_id"])
    experiment = c.get_experiment(run.info.experiment_id)  # beside the training runs' artifacts, not in the cwd
    assert experiment.name == "piarec-ab" and experiment.artifact_location == f"file://{work}/mlartifacts"
    assert run.data.tags["model_version.champion"] == "1" and run.data.tags["srm"] == "ok"
    assert run.data.tags["mlflow.note.content"].split("\n\n") == report["lines"]  # the description in the UI
    assert run.data.metrics["champion.click_rate_per_view.uplift"] > 0
    assert {a.path for a in c.list_artifacts(run.info.run_id, "ab_report")} >= {"ab_report/report.html"}
    before = reader.open_committed(report["uri"]).version
    proc = subprocess.run([sys.executable, "-m", "piarec", "ab-report", "--from", report["from"], "--to", report["to"],
                           "--no-mlflow"], capture_output=True, text=True, timeout=600,
                          env={**env, "PIAREC__STORAGE__ROOT": str(work)}, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[:len(report["lines"])] == report["lines"]  # the same figures
    assert reader.open_committed(report["uri"]).version != before  # committed again, in one step
