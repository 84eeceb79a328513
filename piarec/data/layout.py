"""Where every dataset lives: the one place a storage location is spelled out.

Everything the pipeline writes sits under ``storage.root`` (a local folder or
``s3://bucket/prefix``)::

    <root>/events/dt=YYYY-MM-DD/                     raw events (default; storage.events)
    <root>/snapshots/window_end=YYYY-MM-DD/          weekly snapshot
    <root>/histories/dt=YYYY-MM-DD/                  daily histories
    <root>/recommendations/dt=YYYY-MM-DD/            daily top-K, every arm (arm=<arm>/ inside)
    <root>/checkpoints/<key>/                        training checkpoints (resume after a kill)
    <root>/tuning/<study>/best_config.yaml           a search's best configuration (piarec tune)
    <root>/mlflow.db, <root>/mlartifacts/            the embedded MLflow store (local root)

Each of those partitions is committed as a whole (:mod:`piarec.data.commit`):
``_SUCCESS`` is the pointer to its committed version ``_versions/<version>/`` and holds its
manifest; :mod:`piarec.data.reader` is how to read one. Segments built from values (dates, arms, keys) go through
:func:`piarec.data.storage.child_uri`, so they cannot leave the root. Files and folders
whose names start with ``_`` are skipped by Parquet readers (Spark, pyarrow).
"""

from __future__ import annotations

from datetime import date

import os
from pathlib import Path

from piarec.config import MlflowConfig, StorageConfig
from piarec.data.storage import SUCCESS, child_uri, is_s3, join_uri
from piarec.errors import ConfigError

__all__ = [
    "SUCCESS", "MANIFEST", "SNAPSHOT_MANIFEST", "ARM_PREFIX", "day_dir", "arm_dir",
    "events_root", "snapshots_root", "histories_root", "recommendations_root", "checkpoints_root",
    "snapshot_uri", "histories_uri", "day_uri", "arm_uri", "checkpoint_uri", "tuned_config_uri",
    "tracking_uri", "artifact_location",
]

# The manifest files of the unversioned layout (read for partitions written before
# versioned commits; a commit keeps the manifest in its pointer).
MANIFEST = "_manifest.json"  # histories and recommendations
SNAPSHOT_MANIFEST = "manifest.json"  # snapshots


# -- roots -------------------------------------------------------------------------------------
def events_root(storage: StorageConfig) -> str:
    """The raw events dataset: ``storage.events``, else ``<root>/events``."""
    return storage.events or join_uri(storage.root, "events")


def snapshots_root(storage: StorageConfig) -> str:
    return join_uri(storage.root, "snapshots")


def histories_root(storage: StorageConfig) -> str:
    """Daily user histories (``user_id, history, seen``), one ``dt=`` partition a day."""
    return join_uri(storage.root, "histories")


def recommendations_root(storage: StorageConfig) -> str:
    """The daily recommendations: ``storage.recommendations``, else ``<root>/recommendations``."""
    return storage.recommendations or join_uri(storage.root, "recommendations")


def checkpoints_root(storage: StorageConfig) -> str:
    """Training checkpoints, one folder per (snapshot, training config): a killed
    ``piarec train`` resumes from here; removed once the model is registered."""
    return join_uri(storage.root, "checkpoints")


def ab_reports_root(storage: StorageConfig) -> str:
    """The A/B reports (``piarec ab-report``), one folder per period."""
    return join_uri(storage.root, "ab-reports")


def ab_report_uri(storage: StorageConfig, start: date, end: date) -> str:
    """``<root>/ab-reports/from=D1_to=D2``: the report of event days [D1, D2]."""
    return child_uri(ab_reports_root(storage), f"from={start.isoformat()}_to={end.isoformat()}")


# -- partitions ----------------------------------------------------------------------------------
ARM_PREFIX = "arm="


def day_dir(day: date) -> str:
    """``dt=YYYY-MM-DD``: the folder name of a day's partition (events, histories, recommendations)."""
    return f"dt={day.isoformat()}"


def arm_dir(arm: str) -> str:
    """``arm=<arm>``: the folder name of one arm of a recommendations day (or of a run's staging)."""
    return f"{ARM_PREFIX}{arm}"


def snapshot_uri(snapshots: str, window_end: date) -> str:
    """``<snapshots>/window_end=YYYY-MM-DD``: the snapshot of the window ending there."""
    return child_uri(snapshots, f"window_end={window_end.isoformat()}")


def histories_uri(histories: str, day: date) -> str:
    """``<histories>/dt=YYYY-MM-DD``: the histories of scoring day ``day``."""
    return child_uri(histories, day_dir(day))


def day_uri(recommendations: str, day: date) -> str:
    """``<recommendations>/dt=YYYY-MM-DD``: one scoring day, every arm."""
    return child_uri(recommendations, day_dir(day))


def arm_uri(recommendations: str, day: date, arm: str) -> str:
    """``<recommendations>/dt=D/arm=<arm>``: an arm's name in messages and Hive paths (its
    files live under the day's committed version); an arm that is not a safe segment is refused."""
    return child_uri(recommendations, day_dir(day), arm_dir(arm))


def checkpoint_uri(storage: StorageConfig, key: str) -> str:
    """``<root>/checkpoints/<key>``: the checkpoint folder of one training identity."""
    return child_uri(checkpoints_root(storage), key)


def tuned_config_uri(storage: StorageConfig, study: str) -> str:
    """``<root>/tuning/<study>/best_config.yaml``: what ``piarec tune`` writes by default and
    ``piarec train --tuned-config`` (the weekly DAG's ``tuned_config`` param) reads."""
    return child_uri(join_uri(storage.root, "tuning"), study, "best_config.yaml")


# -- the embedded MLflow store ----------------------------------------------------------------------
def tracking_uri(mlflow: MlflowConfig, storage: StorageConfig) -> str:
    """``mlflow.tracking_uri``, else a SQLite store at ``<root>/mlflow.db`` (local root only)."""
    if mlflow.tracking_uri:
        return mlflow.tracking_uri
    return f"sqlite:///{_local_root(storage)}/mlflow.db"


def artifact_location(mlflow: MlflowConfig, storage: StorageConfig) -> str:
    """``mlflow.artifact_location``, else ``<root>/mlartifacts`` (a ``file://`` URI locally)."""
    if mlflow.artifact_location:
        return mlflow.artifact_location
    if is_s3(storage.root):
        return join_uri(storage.root, "mlartifacts")
    return Path(_local_root(storage), "mlartifacts").as_uri()


def _local_root(storage: StorageConfig) -> str:
    if is_s3(storage.root):
        raise ConfigError(f"mlflow.tracking_uri must be set when storage.root is on S3 ({storage.root!r})")
    return os.path.abspath(storage.root)
