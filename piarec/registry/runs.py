"""The training runs in MLflow: find a run's model and snapshot, and regenerate its report
(`piarec report --run RUN_ID`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from piarec.config import PipelineConfig
from piarec.data.snapshot import load_snapshot
from piarec.errors import ModelNotFoundError
from piarec.evaluate.report import build_report
from piarec.registry import client as registry

log = logging.getLogger(__name__)
REPORT_ARTIFACT_DIR = "report"
SNAPSHOT_TAGS = ("snapshot_uri", "snapshot")  # run tags naming the training snapshot, in order of preference


def _run_sources(cfg: PipelineConfig, run_id: str) -> tuple[str, str]:
    """(model URI, snapshot URI) of a training run: its registered version when there is
    one, else ``runs:/<id>/model``; the snapshot from the run's tags, else the version's."""
    from mlflow.exceptions import MlflowException


    c = registry.client(cfg)
    try:
        run = c.get_run(run_id)
    except MlflowException as exc:
        raise ModelNotFoundError(f"MLflow run {run_id!r} cannot be read: {exc.message}") from None
    versions = c.search_model_versions(f"run_id='{run_id}'")
    versions = sorted(versions, key=lambda v: int(v.version))
    model_uri = f"models:/{versions[-1].name}/{versions[-1].version}" if versions else f"runs:/{run_id}/model"
    snapshot = next((run.data.tags[t] for t in SNAPSHOT_TAGS if run.data.tags.get(t)), None)
    if snapshot is None and versions:
        snapshot = versions[-1].tags.get("snapshot_uri")
    if not snapshot:
        raise ModelNotFoundError(f"run {run_id} names no training snapshot (tags {', '.join(SNAPSHOT_TAGS)}); "
                                 "was it made by `piarec train`?")
    return model_uri, snapshot


def report_run(cfg: PipelineConfig, run_id: str, out_dir: str | Path | None = None, *, seed: int = 0,
               log_artifacts: bool = True) -> dict[str, Any]:
    """Regenerate the report of MLflow run ``run_id`` into ``out_dir`` (default
    ``./report-<run_id>``) and log the folder's files under ``report/`` of that run.
    Returns the report dict plus ``out_dir``."""
    model_uri, snapshot = _run_sources(cfg, run_id)
    bundle, _ = registry.load_model(cfg, model_uri)
    snap = load_snapshot(snapshot)
    out = Path(out_dir or f"report-{run_id}")
    report = build_report(bundle, snap, cfg, out, title=f"run {run_id[:8]} ({model_uri})", seed=seed)
    if log_artifacts:
        registry.client(cfg).log_artifacts(run_id, str(out), REPORT_ARTIFACT_DIR)
    log.info("report of run %s written to %s", run_id, out)
    return {**report, "out_dir": str(out)}
