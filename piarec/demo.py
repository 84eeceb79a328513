"""`piarec demo`: the whole pipeline end to end on the embedded local default.

generate events -> weekly snapshot (Spark) -> train + register (MLflow) -> gate ->
daily scoring (Spark) -> summary. Everything lands under one work folder.

With ``ab_days`` (``piarec demo --ab``) a closed-loop A/B test follows: for each of those
days the day is scored with the arms ``ab_arms`` (default: the champion against a
popularity control, half the users each), and the next day's card events are simulated
from the lists each user was served and their planted tastes
(:mod:`piarec.data.closed_loop`); then ``piarec ab-report`` over the simulated days. The
tastes are planted, so the champion must come out ahead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from piarec.config import load_config
from piarec.data import layout

log = logging.getLogger(__name__)

DEMO_EPOCHS = 20  # enough for the demo's synthetic data to converge on 2 CPU cores
START = dt.date(2026, 1, 1)
AB_ARMS = "champion=models:/piarec@champion:0.5,control=popularity:0.5"
AB_DAYS = 7


def run_demo(
    workdir: str,
    *,
    users: int = 50_000,
    items: int = 2_000,
    days: int = 120,
    epochs: int | None = None,
    seed: int = 0,
    config_path: str | None = None,
    ab_days: int = 0,
    ab_arms: str = AB_ARMS,
) -> dict[str, Any]:
    """Run every stage and return (and write to ``<workdir>/demo-summary.json``) a summary."""
    from pipelines import build_matrix, score_users
    from piarec.daily.arms import arm_specs, plan_arms
    from pipelines.spark import get_spark
    from piarec.registry.gate import promote
    from piarec.data.synthetic import generate_events
    from piarec.train.job import run_training

    root = os.path.abspath(workdir)
    cfg = load_config(config_path, overrides={
        "storage": {"root": root, "events": None},
        "training": {"epochs": epochs or DEMO_EPOCHS, "seed": seed},
    })
    window_end = START + dt.timedelta(days=days)  # the day after the last day of events
    score_date = window_end - dt.timedelta(days=1)
    timings: dict[str, float] = {}

    def stage(name: str):
        log.info("== %s", name)
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - timings[name], 1)

    stage("generate-events")
    events = generate_events(layout.events_root(cfg.storage), users=users, items=items, days=days,
                             seed=seed, start=START, progress=log.info)
    done("generate-events")

    spark = get_spark(cfg.spark)
    try:
        stage("build-matrix")
        manifest = build_matrix.run(spark, cfg, layout.events_root(cfg.storage), window_end, layout.snapshots_root(cfg.storage))
        done("build-matrix")
        snap_uri = layout.snapshot_uri(layout.snapshots_root(cfg.storage), window_end)

        stage("train")
        trained = run_training(cfg, snap_uri)
        done("train")

        stage("promote")
        decision = promote(cfg)
        log.info(decision.summary())
        done("promote")

        stage("score")
        scored = None
        if decision.promoted:
            plan = plan_arms(cfg, arm_specs(cfg))
            scored = score_users.run(spark, cfg, layout.events_root(cfg.storage), score_date,
                                     layout.recommendations_root(cfg.storage), plan, cfg.scoring.k)[plan.arms[0].name]
        done("score")
        ab = None
        if ab_days and decision.promoted:
            stage("ab-week")
            ab = ab_week(spark, cfg, score_date, ab_days, ab_arms, (users, items, days, seed))
            done("ab-week")
    finally:
        spark.stop()

    recs_uri = layout.day_uri(layout.recommendations_root(cfg.storage), score_date)  # read with piarec.data.reader
    summary = {
        "workdir": root,
        "events": events,
        "snapshot": {"uri": snap_uri, "counts": manifest.get("counts", {})},
        "training": {"run_id": trained["run_id"], "version": trained["version"],
                     "best_epoch": trained["best_epoch"], "val": trained["val"], "test": trained["test"]},
        "gate": decision.summary(),
        "recommendations": {"uri": recs_uri, "manifest": scored},
        "ab": ab,
        "seconds": timings,
        "mlflow_ui": f"mlflow ui --backend-store-uri {layout.tracking_uri(cfg.mlflow, cfg.storage)} --port 5000",
    }
    Path(root, "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(render(summary))
    if not decision.promoted:
        from piarec.errors import GateRefused

        raise GateRefused(f"the demo model did not pass the gate: {decision.summary()}")
    return summary


def ab_week(spark, cfg, first_day: dt.date, n_days: int, arms: str, world: tuple[int, int, int, int]) -> dict[str, Any]:
    """Score ``first_day`` .. ``first_day + n_days - 1`` with ``arms``, simulating after each
    scoring the next day's card events; then the A/B report of the simulated days (none for
    a single arm). Returns the days simulated, their counts and the report's summary."""
    from piarec.daily.arms import parse_arms, plan_arms
    from piarec.data import reader
    from piarec.data.closed_loop import PlantedTastes, simulate_card_day
    from pipelines import ab_report, score_users

    users, items, days, seed = world
    tastes = PlantedTastes.of(users, items, days, seed)
    plan = plan_arms(cfg, parse_arms(arms))  # @champion and the baselines, resolved once for the week
    recs, events = layout.recommendations_root(cfg.storage), layout.events_root(cfg.storage)
    simulated = {}
    for i in range(n_days):
        day = first_day + dt.timedelta(days=i)
        score_users.run(spark, cfg, events, day, recs, plan, cfg.scoring.k)
        served = reader.read_table(layout.day_uri(recs, day), columns=["user_id", "item_ids"])
        simulated[str(day + dt.timedelta(days=1))] = simulate_card_day(events, day + dt.timedelta(days=1), served,
                                                                       tastes, seed=seed)
        log.info("A/B day %s: %s", day + dt.timedelta(days=1), simulated[str(day + dt.timedelta(days=1))])
    start, end = first_day + dt.timedelta(days=1), first_day + dt.timedelta(days=n_days)
    report = ab_report.run(spark, cfg, start, end) if len(plan.arms) > 1 else None
    return {"from": str(start), "to": str(end), "days": simulated, "report": report}


def render(s: dict[str, Any]) -> str:
    """A short human-readable summary of a demo run."""
    counts = s["snapshot"]["counts"]
    val = s["training"]["val"]
    recs = (s["recommendations"]["manifest"] or {}).get("counts", {})
    lines = [
        "",
        "piarec demo — summary",
        f"  events          {s['events']['events']:,} events, {s['events']['users']:,} users, "
        f"{s['events']['items']:,} titles over {s['events']['days']} days",
        f"  snapshot        {json.dumps(counts, default=str)}",
        f"  model           version {s['training']['version']} (best epoch {s['training']['best_epoch']}), gate: {s['gate']}",
        f"  validation      model      recall@20 {val['model']['recall_at_20']:.4f}  ndcg@100 {val['model']['ndcg_at_100']:.4f}",
        f"                  popularity recall@20 {val['popularity']['recall_at_20']:.4f}  ndcg@100 {val['popularity']['ndcg_at_100']:.4f}",
        f"  recommendations {json.dumps(recs, default=str)}",
        f"  outputs         snapshot {s['snapshot']['uri']}",
        f"                  recommendations {s['recommendations']['uri']}",
        f"  stage seconds   {json.dumps(s['seconds'])}",
        f"  MLflow UI       {s['mlflow_ui']}",
    ]
    report = (s.get("ab") or {}).get("report")
    if report:
        lines += [f"  A/B {report['from']} .. {report['to']} ({', '.join(report['arms'])}; control {report['control']})",
                  *[f"                  {line}" for line in report["lines"]], f"                  report {report['uri']}"]
    return "\n".join(lines)
