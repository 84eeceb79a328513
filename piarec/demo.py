"""`piarec demo`: the whole pipeline end to end on the embedded local default.

generate events -> weekly snapshot (Spark) -> train + register (MLflow) -> gate ->
daily scoring (Spark) -> summary. Everything lands under one work folder.
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


def run_demo(
    workdir: str,
    *,
    users: int = 50_000,
    items: int = 2_000,
    days: int = 120,
    epochs: int | None = None,
    seed: int = 0,
    config_path: str | None = None,
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
        "seconds": timings,
        "mlflow_ui": f"mlflow ui --backend-store-uri {layout.tracking_uri(cfg.mlflow, cfg.storage)} --port 5000",
    }
    Path(root, "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(render(summary))
    if not decision.promoted:
        from piarec.errors import GateRefused

        raise GateRefused(f"the demo model did not pass the gate: {decision.summary()}")
    return summary


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
    return "\n".join(lines)
