"""`piarec train`: snapshot -> trained model -> MLflow run -> registered version @challenger.

The training loop itself (:mod:`piarec.train.trainer`) knows nothing of MLflow; this module
does the wiring: parameters, per-epoch metrics, the evaluation report and a validation
curve (PNG), the bundle logged as a pyfunc model defined from code
(:mod:`piarec.registry.pyfunc`, with a signature, an input example, the piarec package and
pinned third-party requirements), registration with a description and tags (data window,
snapshot manifest digest, metrics) and the ``challenger`` alias.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from piarec.registry import client as registry
from piarec.models.bundle import ITEMS_FILE, save_bundle
from piarec.registry.client import BUNDLE_ARTIFACT
from piarec.config import PipelineConfig
from piarec.evaluate.beyond import as_metrics, beyond_accuracy, describe, item_vectors
from piarec.evaluate.metrics import EVAL_K, summarize
from piarec.evaluate.protocol import evaluate_model, evaluate_popularity, model_topk, popularity_topk
from piarec.errors import TrainingError
from piarec.data.snapshot import Snapshot, load_snapshot
from piarec.data.storage import child_uri, exists, read_json, remove, resolve, write_json
from piarec.train.distributed import ranks_from_env, stop
from piarec.train.trainer import TrainResult, train
from piarec.data import layout

log = logging.getLogger(__name__)
MODEL_ARTIFACT = "model"
from piarec.registry.client import CHALLENGER
_BACKBONES = {"multivae": "Multi-VAE", "recvae": "RecVAE"}


def _params(cfg: PipelineConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section in ("model", "pia", "training"):
        for key, value in getattr(cfg, section).model_dump().items():
            flat[f"{section}.{key}"] = value
    flat["window_days"] = cfg.window_days
    return flat


def checkpoint_dir(cfg: PipelineConfig, manifest_digest: str) -> str:
    """``<storage.root>/checkpoints/<key>``: one folder per (snapshot, model/PIA/training
    config), so a rerun of the same training resumes and a different one starts afresh."""
    identity = json.dumps({"snapshot": manifest_digest, **_params(cfg)}, sort_keys=True, default=str)
    return layout.checkpoint_uri(cfg.storage, hashlib.sha256(identity.encode()).hexdigest()[:16])


def _close_interrupted_run(client, attempt_loc) -> str | None:
    """Mark the MLflow run of a killed earlier attempt FAILED; returns its id."""
    if not exists(attempt_loc):
        return None
    run_id = read_json(attempt_loc).get("run_id")
    try:
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # noqa: BLE001 - bookkeeping only; resuming matters more
        log.warning("could not close the interrupted run %s: %s", run_id, exc)
    return run_id


def _validation_curve(history: list[dict[str, float]]):
    """A matplotlib figure of loss and validation metrics per epoch, or None without matplotlib."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no plots logged")
        return None
    epochs = [int(r["epoch"]) for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["loss"] for r in history], marker="o")
    left.set(title="training loss", xlabel="epoch", ylabel="loss")
    for key, label in (("val_ndcg_at_100", "NDCG@100"), ("val_recall_at_20", "Recall@20")):
        if key in history[0]:
            right.plot(epochs, [r[key] for r in history], marker="o", label=label)
    right.set(title="validation", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


# The distributions the pyfunc model imports when MLflow loads it and it predicts: its own file
# (mlflow, pandas, pyyaml), piarec.models.bundle and piarec.scoring.* (torch, numpy, pyarrow) and
# piarec.config (pydantic, pyyaml). mlflow-skinny is the part of MLflow that loads and serves a pyfunc
# model (tracking client, artifact download, `mlflow models serve`'s uvicorn server). The model's
# requirements.txt is exactly these, pinned to this environment; piarec itself travels in the model
# (code_paths). tests/test_model_env.py loads a registered model in a virtualenv holding only them.
PYFUNC_DISTRIBUTIONS = ("mlflow-skinny", "torch", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml")


def pyfunc_requirements() -> list[str]:
    """``name==version`` of every :data:`PYFUNC_DISTRIBUTIONS` as installed here (local version
    labels such as torch's ``+cpu`` dropped: pip matches ``torch==2.13.0`` to either build)."""
    from importlib.metadata import version

    import mlflow

    pins = {"mlflow-skinny": mlflow.__version__}  # mlflow or mlflow-skinny, whichever provides it here
    return [f"{name}=={pins.get(name) or version(name).split('+')[0]}" for name in PYFUNC_DISTRIBUTIONS]


def _signature(k: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id", required=False), ColSpec(Array("string"), "history"),
                       ColSpec(Array("string"), "seen", required=False)]),
        outputs=Schema([ColSpec("string", "user_id"), ColSpec(Array("string"), "item_ids"),
                        ColSpec(Array("float"), "scores"), ColSpec("string", "source"),
                        ColSpec("string", "model_version")]),
        params=ParamSchema([ParamSpec("k", "long", k)]),
    )


def _input_example(item_ids, k: int):
    """Two users made of the model's own titles, and ``k``: what ``mlflow models serve`` shows as
    the example request (``serving_input_example.json``), checked against the signature at logging."""
    import pandas as pd

    ids = [str(x) for x in item_ids[:6]]
    frame = pd.DataFrame({"user_id": ["example-1", "example-2"], "history": [ids[:3], ids[3:5]],
                          "seen": [ids[5:6], []]})
    return frame, {"k": min(k, 10)}


def _log_pyfunc(cfg: PipelineConfig, bundle_dir: Path):
    """Log the bundle as an MLflow pyfunc model defined from code (piarec/registry/pyfunc.py),
    carrying the piarec package and exactly the third-party requirements it needs."""
    import mlflow
    import pyarrow.parquet as pq

    import piarec

    item_ids = pq.read_table(Path(bundle_dir, ITEMS_FILE), columns=["item_id"]).column("item_id").to_pylist()
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=str(Path(__file__).parents[1] / "registry" / "pyfunc.py"),
        artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        code_paths=[str(Path(piarec.__file__).parent)],  # -> code/piarec/, on sys.path at load
        signature=_signature(cfg.scoring.k),
        input_example=_input_example(item_ids, cfg.scoring.k),
        pip_requirements=pyfunc_requirements(),  # explicit: no inference (slow, needs the network)
        # The keys a loader may set (MLflow drops model_config keys not logged): None = the
        # pyfunc's own (model_version: the registered version it was loaded as; batch_size: 4096).
        model_config={"model_version": None, "batch_size": None},
        metadata={"piarec_version": piarec.__version__},
    )


def _log_epoch(row: dict[str, float]) -> None:
    import mlflow

    log.info("epoch %d  loss %.2f  val ndcg@100 %.4f  recall@20 %.4f  lambda_a %.3g  (%.1fs)",
             row["epoch"], row["loss"], row["val_ndcg_at_100"], row["val_recall_at_20"],
             row["lambda_a"], row["train_seconds"])
    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def _log_search_epoch(row: dict[str, float]) -> None:
    """An epoch of training.beta_search's search run, as ``beta_search_*`` metrics."""
    import mlflow

    log.info("beta search: epoch %d  beta %.4f  val ndcg@100 %.4f", row["epoch"], row["beta"], row["val_ndcg_at_100"])
    mlflow.log_metrics({f"beta_search_{k}": float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def _evaluation(result: TrainResult, snap: Snapshot, popularity, snapshot_uri: str) -> dict[str, Any]:
    """``evaluation.json``: the best epoch's model and popularity on validation and test users,
    and ``beyond``: the beyond-accuracy figures of both top-EVAL_K lists on validation users
    (:func:`piarec.evaluate.beyond.beyond_accuracy`; intra-list similarity in the model's item
    vectors for both, named in ``item_vectors``; None when the model has none)."""
    def both(split):
        return {"model": evaluate_model(result.model, split), "popularity": evaluate_popularity(popularity, split)}

    lists = {"model": model_topk(result.model, snap.val.fold_in, EVAL_K),
             "popularity": popularity_topk(popularity, snap.val.fold_in, EVAL_K)}
    # lambda_A never falls to 0 once above it: 0 at the end means PIA never trained the anchors.
    vectors, source = item_vectors(result.model, anchors_trained=result.lambda_a > 0)
    head_share = 0.1
    return {
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "epochs_trained": len(result.history),
        "lambda_a_final": result.lambda_a,
        "val": {who: summarize(topk, snap.val.held_out) for who, topk in lists.items()},
        "test": both(snap.test) if snap.test.fold_in.n_rows else {},
        "beyond": {"k": EVAL_K, "head_share": head_share, "item_vectors": source, "val": {
            who: beyond_accuracy(topk, popularity, snap.n_train_users, vectors, head_share)
            for who, topk in lists.items()}},
        "snapshot": {"uri": snapshot_uri, "window": snap.manifest.get("window", {}),
                     "counts": snap.manifest.get("counts", {})},
    }


def _version_tags(report: dict[str, Any], snapshot_uri: str, digest: str) -> dict[str, str]:
    """The registered version's tags: its snapshot, its validation and test figures and its
    validation beyond-accuracy figures (``val_coverage_at_100``, ...)."""
    window = report["snapshot"]["window"]
    tags = {
        "window_start": str(window.get("start", "")), "window_end": str(window.get("end", "")),
        "snapshot_uri": snapshot_uri, "snapshot_manifest_sha256": digest,
        "best_epoch": str(report["best_epoch"]),
    }
    for who, prefix in (("model", "val_"), ("popularity", "popularity_val_")):
        tags.update({f"{prefix}{k}": f"{v:.6f}" for k, v in report["val"][who].items()})
    for k, v in report["test"].get("model", {}).items():
        tags[f"test_{k}"] = f"{v:.6f}"
    beyond = report["beyond"]
    tags.update({k: f"{v:.6f}" for k, v in as_metrics(beyond["val"]["model"], beyond["k"], "val_").items()})
    return tags


def _description(cfg: PipelineConfig, report: dict[str, Any], tags: dict[str, str], digest: str) -> str:
    """The registered version's description, as a person reads it in the MLflow UI."""
    val, pop = report["val"]["model"], report["val"]["popularity"]
    beyond = report["beyond"]["val"]
    return (
        f"{_BACKBONES.get(cfg.model.backbone, 'Multi-VAE')}{' + PIA' if cfg.pia.enabled else ''} trained on window "
        f"[{tags['window_start']}, {tags['window_end']}) (snapshot {tags['snapshot_uri']}, manifest sha256 "
        f"{digest[:12]}); best epoch {report['best_epoch']}; validation NDCG@100 {val['ndcg_at_100']:.4f}, "
        f"Recall@20 {val['recall_at_20']:.4f} (popularity {pop['ndcg_at_100']:.4f} / {pop['recall_at_20']:.4f}); "
        f"beyond-accuracy@{report['beyond']['k']} {describe(beyond['model'])} "
        f"(popularity coverage {beyond['popularity']['coverage']:.3f}). "
        f"Load with mlflow.pyfunc.load_model('models:/{cfg.mlflow.registered_model}/<version>')."
    )


def _train_and_leave(cfg: PipelineConfig, snap, **kwargs):
    """:func:`train`, then this rank leaves the process group, whether training ended or failed.
    A rank that exits with gloo's threads still running can abort at exit ("terminate called
    without an active exception", SIGABRT), and torchrun then fails the whole run."""
    try:
        return train(cfg, snap, **kwargs)
    finally:
        stop()


def run_training(cfg: PipelineConfig, snapshot_uri: str, *, tuned_config: str | None = None) -> dict[str, Any]:
    """Train on the snapshot at ``snapshot_uri`` and register the result as challenger
    (``tuned_config``: the URI of the tuned configuration already applied to ``cfg``, for the record).

    Returns a summary: run id, registered version, validation and test metrics of the
    model and of the popularity baseline.

    Under torchrun every rank calls this: all of them train (data-parallel,
    :mod:`piarec.train.distributed`) and rank 0 alone talks to MLflow and registers; the
    other ranks return ``{"rank": r}``.
    """
    import mlflow

    ranks = ranks_from_env()
    # Each process of a data-parallel run loads only its shard of the training users.
    snap = load_snapshot(snapshot_uri, shard=(ranks.rank, ranks.world) if ranks.parallel else None)
    digest = snap.manifest_digest()
    ck_dir = checkpoint_dir(cfg, digest)
    ck_uri, attempt = child_uri(ck_dir, "checkpoint.pt"), resolve(child_uri(ck_dir, "attempt.json"))
    if not ranks.main:
        _train_and_leave(cfg, snap, checkpoint_path=ck_uri, ranks=ranks)
        return {"rank": ranks.rank}
    popularity = snap.train_popularity()
    experiment_id = registry.ensure_experiment(cfg)
    window = snap.manifest.get("window", {})
    interrupted = _close_interrupted_run(registry.client(cfg), attempt)

    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags({"snapshot": snapshot_uri, "window_end": str(window.get("end", "")),
                         "checkpoint": ck_uri, **({"tuned_config": tuned_config} if tuned_config else {})})
        if interrupted:
            mlflow.set_tag("resumed_from_run", interrupted)
            log.info("resuming the training of run %s from %s", interrupted, ck_uri)
        write_json(attempt, {"run_id": run.info.run_id, "snapshot": snapshot_uri})
        mlflow.log_params(_params(cfg))
        mlflow.log_params({"n_items": snap.n_items, "n_train_users": snap.n_train_users,
                           "n_val_users": snap.val.fold_in.n_rows, "train_nnz": snap.train_nnz,
                           "processes": ranks.world})
        try:
            result = _train_and_leave(cfg, snap, on_epoch=_log_epoch, checkpoint_path=ck_uri, ranks=ranks,
                                      on_search_epoch=_log_search_epoch)
        except TrainingError as exc:
            kept = f"the last good checkpoint is kept at {ck_uri}" if exists(resolve(ck_uri)) else "no epoch completed"
            raise TrainingError(f"{exc}; {kept}") from exc

        mlflow.set_tags({"stop_reason": result.stop_reason, "epochs_trained": str(len(result.history))})
        if result.beta_search:
            picked = result.beta_search
            mlflow.log_params({"beta_search_picked_beta": picked["beta"], "beta_search_best_epoch": picked["epoch"],
                               "beta_search_epochs": picked["search_epochs"]})
            log.info("beta search: beta %.4g at its best epoch %d of %d; trained again at that cap",
                     picked["beta"], picked["epoch"], picked["search_epochs"])
        log.info("training stopped (%s) after %d epochs; best epoch %d", result.stop_reason, len(result.history),
                 result.best_epoch)
        report = _evaluation(result, snap, popularity, snapshot_uri)
        for split in ("val", "test"):
            for who, metrics in report[split].items():
                mlflow.log_metrics({f"final_{split}_{who}_{k}": v for k, v in metrics.items()})
        mlflow.log_metrics(as_metrics(report["beyond"]["val"]["model"], report["beyond"]["k"], "val_"))
        mlflow.log_dict(report, "evaluation.json")
        mlflow.log_dict({"epochs": result.history}, "history.json")

        curve = _validation_curve(result.history) if cfg.mlflow.log_plots else None
        if curve is not None:
            mlflow.log_figure(curve, "plots/validation_curve.png")
        tags = _version_tags(report, snapshot_uri, digest)
        mlflow.set_tags({"snapshot_manifest_sha256": digest, "window_start": tags["window_start"]})

        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp, "bundle")
            save_bundle(bundle, result.model, snap.item_ids, popularity)
            Path(bundle, "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
            info = _log_pyfunc(cfg, bundle)

        version = registry.register_version(cfg, run.info.run_id, model_id=info.model_id, tags=tags,
                                            description=_description(cfg, report, tags, digest))
        registry.set_alias(cfg, CHALLENGER, version)
        mlflow.set_tag("registered_version", version)
    remove(resolve(ck_dir))  # registered: a rerun trains afresh

    return {"run_id": run.info.run_id, "version": version, "best_epoch": result.best_epoch, **report}
