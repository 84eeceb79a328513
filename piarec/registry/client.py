"""MLflow wiring: tracking setup, model registration, aliases and model resolution.

Nothing here runs at import time; every function takes the pipeline config and sets
the tracking URI explicitly, so the same code talks to a local SQLite store or a server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from piarec.models.bundle import CONFIG_FILE, ModelBundle, load_bundle
from piarec.config import PipelineConfig
from piarec.errors import ModelNotFoundError
from piarec.data import layout

SNAPSHOT_TAG = "snapshot_uri"  # set on every version by `piarec train`: its training snapshot
BUNDLE_ARTIFACT = "bundle"  # the pyfunc model's artifact holding the bundle (piarec/registry/pyfunc.py)
CHALLENGER, CHAMPION = "challenger", "champion"  # the aliases: set by training / by the gate or a person


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where its bundle lies locally and what it is."""

    local_dir: str
    name: str | None
    version: str | None
    run_id: str | None
    uri: str

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "uri": self.uri}


def client(cfg: PipelineConfig):
    """An MlflowClient bound to the configured tracking URI (imports mlflow lazily)."""
    import mlflow
    from mlflow import MlflowClient

    uri = layout.tracking_uri(cfg.mlflow, cfg.storage)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(cfg: PipelineConfig, name: str | None = None) -> str:
    """The experiment id for ``name`` (default ``cfg.mlflow.experiment``), created with the
    configured artifact location."""
    c = client(cfg)
    name = name or cfg.mlflow.experiment
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=layout.artifact_location(cfg.mlflow, cfg.storage))


def register_version(
    cfg: PipelineConfig,
    run_id: str,
    artifact_path: str | None = None,
    *,
    model_id: str | None = None,
    description: str = "",
    tags: dict[str, str] | None = None,
) -> str:
    """Register a new version of ``cfg.mlflow.registered_model``; returns the version.

    The source is the logged model ``model_id`` (what ``mlflow.pyfunc.log_model``
    returns) or, without one, ``runs:/<run_id>/<artifact_path>``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = cfg.mlflow.registered_model
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="Multi-VAE + PIA recommendations")
    if model_id is not None:
        source = mlflow.get_logged_model(model_id).artifact_location
    elif artifact_path is not None:
        source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    else:
        raise ValueError("register_version needs a model_id or an artifact_path")
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags or {},
                                description=description, model_id=model_id)
    return str(mv.version)


def set_alias(cfg: PipelineConfig, alias: str, version: str) -> None:
    client(cfg).set_registered_model_alias(cfg.mlflow.registered_model, alias, str(version))


def alias_version(cfg: PipelineConfig, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(cfg).get_model_version_by_alias(cfg.mlflow.registered_model, alias).version)
    except MlflowException:
        return None


def bundle_dir(local: str) -> str:
    """The bundle folder inside a downloaded model: the folder itself for a plain bundle,
    ``<pyfunc model>/artifacts/bundle`` for a pyfunc model logged by ``piarec train``."""
    if os.path.isfile(os.path.join(local, CONFIG_FILE)):
        return local
    mlmodel = os.path.join(local, "MLmodel")
    if os.path.isfile(mlmodel):
        import yaml

        with open(mlmodel) as fh:
            flavor = (yaml.safe_load(fh) or {}).get("flavors", {}).get("python_function", {})
        path = (flavor.get("artifacts") or {}).get(BUNDLE_ARTIFACT, {}).get("path")
        if path and os.path.isfile(os.path.join(local, path, CONFIG_FILE)):
            return os.path.join(local, path)
    raise ModelNotFoundError(
        f"downloaded model {local!r} holds neither a bundle ({CONFIG_FILE}) nor a pyfunc model "
        f"with a {BUNDLE_ARTIFACT!r} artifact"
    )


def resolve_model(cfg: PipelineConfig, uri: str) -> ModelRef:
    """Resolve ``models:/name@alias``, ``models:/name/version``, ``runs:/id/path`` or a
    local bundle directory to a local copy of the bundle.

    Aliases are resolved now, at every call: a person moving ``champion`` in the MLflow
    UI changes what the next scoring run uses.
    """
    if not uri.startswith(("models:/", "runs:/")):
        if not os.path.isdir(uri):
            raise ModelNotFoundError(f"model {uri!r} is neither a models:/ or runs:/ URI nor a directory")
        return ModelRef(bundle_dir(os.path.abspath(uri)), None, None, None, uri)

    import mlflow
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = version = run_id = None
    try:
        if uri.startswith("models:/"):
            ref = uri[len("models:/"):]
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = c.get_model_version_by_alias(name, alias)
            else:
                name, _, ver = ref.partition("/")
                mv = c.get_model_version(name, ver)
            version, run_id, source = str(mv.version), mv.run_id, mv.source
        else:
            run_id = uri[len("runs:/"):].split("/", 1)[0]
            source = uri
        local = mlflow.artifacts.download_artifacts(artifact_uri=source)
    except MlflowException as exc:
        raise ModelNotFoundError(f"model {uri!r} cannot be resolved: {exc.message}") from None
    return ModelRef(bundle_dir(local), name, version, run_id, uri)


def load_model(cfg: PipelineConfig, uri: str) -> tuple[ModelBundle, ModelRef]:
    ref = resolve_model(cfg, uri)
    return load_bundle(ref.local_dir, ref.info()), ref


def training_snapshot(cfg: PipelineConfig, name: str, version: str | None, run_id: str | None = None) -> str | None:
    """The snapshot a model was trained on: version ``version`` of ``name``'s
    :data:`SNAPSHOT_TAG` tag, else its run's ``snapshot`` tag; None when neither names one
    (or neither exists: a bundle folder has no version and no run)."""
    c = client(cfg)
    if version is not None:
        mv = c.get_model_version(name, version)
        if mv.tags.get(SNAPSHOT_TAG):
            return mv.tags[SNAPSHOT_TAG]
        run_id = run_id or mv.run_id
    if run_id:
        return c.get_run(run_id).data.tags.get("snapshot") or None
    return None
