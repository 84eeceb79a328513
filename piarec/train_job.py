"""`piarec train`: snapshot -> trained model -> MLflow run -> registered version @challenger.

The training loop itself (:mod:`piarec.trainer`) knows nothing of MLflow; this module
does the wiring: parameters, per-epoch metrics, the evaluation report, the bundle as
artifacts, registration and the ``challenger`` alias.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from piarec import registry
from piarec.bundle import save_bundle
from piarec.config import PipelineConfig
from piarec.evaluation import evaluate_model, evaluate_popularity, train_popularity
from piarec.snapshot import load_snapshot
from piarec.trainer import train

log = logging.getLogger(__name__)
MODEL_ARTIFACT = "model"
CHALLENGER, CHAMPION = "challenger", "champion"


def _params(cfg: PipelineConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section in ("model", "pia", "training"):
        for key, value in getattr(cfg, section).model_dump().items():
            flat[f"{section}.{key}"] = value
    flat["window_days"] = cfg.window_days
    return flat


def run_training(cfg: PipelineConfig, snapshot_uri: str) -> dict[str, Any]:
    """Train on the snapshot at ``snapshot_uri`` and register the result as challenger.

    Returns a summary: run id, registered version, validation and test metrics of the
    model and of the popularity baseline.
    """
    import mlflow

    snap = load_snapshot(snapshot_uri)
    popularity = train_popularity(snap.train)
    experiment_id = registry.ensure_experiment(cfg)
    window = snap.manifest.get("window", {})

    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags({"snapshot": snapshot_uri, "window_end": str(window.get("end", ""))})
        mlflow.log_params(_params(cfg))
        mlflow.log_params({"n_items": snap.train.n_cols, "n_train_users": snap.train.n_rows,
                           "n_val_users": snap.val.fold_in.n_rows, "train_nnz": snap.train.nnz})

        def on_epoch(row: dict[str, float]) -> None:
            log.info("epoch %d  loss %.2f  val ndcg@100 %.4f  recall@20 %.4f  lambda_a %.3g  (%.1fs)",
                     row["epoch"], row["loss"], row["val_ndcg_at_100"], row["val_recall_at_20"],
                     row["lambda_a"], row["train_seconds"])
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        with tempfile.TemporaryDirectory() as tmp:
            result = train(cfg, snap, on_epoch=on_epoch, checkpoint_path=str(Path(tmp, "checkpoint.pt")))

        report = {
            "best_epoch": result.best_epoch,
            "lambda_a_final": result.lambda_a,
            "val": {"model": evaluate_model(result.model, snap.val), "popularity": evaluate_popularity(popularity, snap.val)},
            "test": {"model": evaluate_model(result.model, snap.test), "popularity": evaluate_popularity(popularity, snap.test)}
            if snap.test.fold_in.n_rows else {},
            "snapshot": {"uri": snapshot_uri, "window": window, "counts": snap.manifest.get("counts", {})},
        }
        for split in ("val", "test"):
            for who, metrics in report[split].items():
                mlflow.log_metrics({f"final_{split}_{who}_{k}": v for k, v in metrics.items()})
        mlflow.log_dict(report, "evaluation.json")

        with tempfile.TemporaryDirectory() as tmp:
            save_bundle(tmp, result.model, snap.item_ids, popularity)
            Path(tmp, "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
            mlflow.log_artifacts(tmp, artifact_path=MODEL_ARTIFACT)

        # The gate reads these tags; the whole report is in evaluation.json.
        tags = {"window_end": str(window.get("end", ""))}
        for who, prefix in (("model", "val_"), ("popularity", "popularity_val_")):
            tags.update({f"{prefix}{k}": f"{v:.6f}" for k, v in report["val"][who].items()})
        version = registry.register_version(
            cfg, run.info.run_id, MODEL_ARTIFACT, tags=tags,
            description=f"Multi-VAE{' + PIA' if cfg.pia.enabled else ''} on snapshot {snapshot_uri}",
        )
        registry.set_alias(cfg, CHALLENGER, version)
        mlflow.set_tag("registered_version", version)

    return {"run_id": run.info.run_id, "version": version, "best_epoch": result.best_epoch, **report}
