"""`piarec tune`: a hyperparameter search on the snapshot's validation users.

Optuna drives it: a TPE sampler over ``tune.space`` (dotted keys of model / pia / training,
each a range or a list of choices), a median pruner fed by every epoch's validation
NDCG@100, and a budget of trials and/or seconds. The objective is the trainer's own
selection metric: validation NDCG@100 of a trial's best epoch. Trial 0 is the configuration
as given (where the space holds its values), so the search reports what it gained over it.

A trial counts as feasible when its best model keeps at least ``gate.min_active_units``
active latent units: a collapsed configuration the promotion gate would refuse is recorded
but never chosen.

MLflow: one run per invocation in ``tune.experiment`` (the space, the budget, the best
trial, ``best_config.yaml`` and the study's plots: optimisation history, intermediate values,
parameter importances) and one nested run per trial (its values, per-epoch metrics, state,
CPU and wall seconds, active units and test figures of its best epoch -- test is reported,
never used to choose). The best configuration is written as YAML holding only the tuned keys
(:func:`piarec.config.parse_tuned` reads it; ``piarec train --tuned-config`` and the weekly DAG's
``tuned_config`` param apply it). With ``tune.study_storage`` (an Optuna database URL) a killed
search resumes with its finished trials.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, get_args

import yaml
from pydantic import BaseModel, ValidationError

from piarec.config import PipelineConfig, SearchParam, deep_merge
from piarec.data import layout
from piarec.data.snapshot import Snapshot, load_snapshot
from piarec.data.storage import replace_bytes, resolve
from piarec.errors import ConfigError, TrainingError
from piarec.evaluate.diagnostics import collapse_metrics, diagnosable
from piarec.evaluate.metrics import SELECTION_METRIC
from piarec.evaluate.protocol import evaluate_model
from piarec.registry import client as registry
from piarec.train.trainer import train

log = logging.getLogger(__name__)

OBJECTIVE = f"val_{SELECTION_METRIC}"
BEST_CONFIG = "best_config.yaml"


# -- the space -----------------------------------------------------------------------------------
def _field(key: str):
    """The pydantic field a dotted key names (``tune.space`` keys are checked at config load)."""
    owner: type[BaseModel] = PipelineConfig
    *sections, name = key.split(".")
    for section in sections:
        owner = owner.model_fields[section].annotation
    return owner.model_fields[name]


def _is_int(key: str) -> bool:
    ann = _field(key).annotation
    kinds = set(get_args(ann)) or {ann}
    return int in kinds and float not in kinds


def suggest(trial, key: str, spec: SearchParam) -> Any:
    """The trial's value of ``key``: one of its choices, or a draw from its range (an integer
    for an integer field)."""
    if spec.choices is not None:
        return trial.suggest_categorical(key, spec.choices)
    if _is_int(key):
        return trial.suggest_int(key, math.ceil(spec.low), math.floor(spec.high), log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, log=spec.log)


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"training.lr": 1e-3}`` -> ``{"training": {"lr": 1e-3}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return out


def apply(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """``cfg`` with the trial's values set; :class:`ConfigError` when they make an invalid
    configuration (a combination the schema refuses)."""
    try:
        return PipelineConfig.model_validate(deep_merge(cfg.model_dump(), nested(values)))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"the trial's values {values} make an invalid configuration: {problems}") from None


def current_values(cfg: PipelineConfig) -> dict[str, Any]:
    """The configuration's own value of every searched key the space holds (trial 0)."""
    out: dict[str, Any] = {}
    for key, spec in cfg.tune.space.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if (value in spec.choices) if spec.choices is not None else (
                isinstance(value, (int, float)) and spec.low <= value <= spec.high):
            out[key] = value
    return out


# -- one trial -----------------------------------------------------------------------------------
@dataclass
class _Search:
    cfg: PipelineConfig
    snap: Snapshot
    progress: Callable[[str], None]
    experiment_id: str
    started: float = field(default_factory=time.perf_counter)
    cpu_seconds: float = 0.0


def _min_active(cfg: PipelineConfig) -> int:
    return cfg.gate.min_active_units


def _active_units(model, snap: Snapshot, cfg: PipelineConfig) -> float:
    if not diagnosable(snap.val.fold_in):
        return float("nan")
    light = cfg.diagnostics.model_copy(update={"jacobian_users": 0, "mask_users": 0})
    return collapse_metrics(model, snap.val.fold_in, light, seed=cfg.training.seed)["active_units"]


def _objective(search: _Search):
    import mlflow
    import optuna

    cfg, snap = search.cfg, search.snap

    def objective(trial: optuna.Trial) -> float:
        values = {key: suggest(trial, key, spec) for key, spec in cfg.tune.space.items()}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with mlflow.start_run(experiment_id=search.experiment_id, nested=True, run_name=f"trial {trial.number}") as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(values)
            mlflow.set_tag("trial", str(trial.number))
            state = "FAILED"
            try:
                trial_cfg = apply(cfg, values)

                def on_epoch(row: dict[str, float]) -> None:
                    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
                    trial.report(row[OBJECTIVE], int(row["epoch"]))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"validation NDCG@100 {row[OBJECTIVE]:.4f} at epoch "
                                                 f"{int(row['epoch'])} is below the median of earlier trials")

                result = train(trial_cfg, snap, on_epoch=on_epoch)
                value = float(result.best_metrics[SELECTION_METRIC])
                active = _active_units(result.model, snap, trial_cfg)
                trial.set_user_attr("active_units", active)
                trial.set_user_attr("best_epoch", result.best_epoch)
                trial.set_user_attr("stop_reason", result.stop_reason)
                test = evaluate_model(result.model, snap.test) if snap.test.fold_in.n_rows else {}
                trial.set_user_attr("test", test)
                mlflow.log_metrics({f"best_{OBJECTIVE}": value, "best_epoch": result.best_epoch,
                                    "epochs_trained": len(result.history), "active_units": active,
                                    **{f"test_{k}": v for k, v in test.items()}})
                mlflow.set_tag("stop_reason", result.stop_reason)
                state = "COMPLETE"
                return value
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            finally:
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                search.cpu_seconds += cpu
                trial.set_user_attr("cpu_seconds", cpu)
                mlflow.log_metrics({"cpu_seconds": cpu, "wall_seconds": wall})
                mlflow.set_tag("trial_state", state)
                if state == "PRUNED":
                    mlflow.end_run("KILLED")  # FINISHED would read as a completed trial
    return objective


def _feasible(cfg: PipelineConfig):
    """Optuna's constraint (<= 0 is feasible): enough active latent units for the gate."""
    floor = _min_active(cfg)

    def constraints(trial) -> list[float]:
        active = trial.user_attrs.get("active_units")
        return [0.0 if active is None or not math.isfinite(active) else float(floor - active)]
    return constraints


def _report_trial(search: _Search, study, trial) -> None:
    import optuna

    finished = [t for t in study.trials if t.state.is_finished()]
    state = trial.state.name.lower()
    value = f"val NDCG@100 {trial.value:.4f}" if trial.state == optuna.trial.TrialState.COMPLETE else state
    best = best_trial(study, search.cfg)
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no feasible trial yet"
    search.progress(f"trial {trial.number} ({len(finished)}/{search.cfg.tune.trials} finished) {value}; "
                    f"{best_text}; {trial.user_attrs.get('cpu_seconds', 0.0):.0f} CPU s; "
                    f"{time.perf_counter() - search.started:.0f} s so far")


# -- the study -------------------------------------------------------------------------------------
def best_trial(study, cfg: PipelineConfig):
    """The complete trial with the highest validation NDCG@100 among those with at least
    ``gate.min_active_units`` active units; None when there is none."""
    import optuna

    floor = _min_active(cfg)
    ok = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
          and not (math.isfinite(t.user_attrs.get("active_units", math.inf))
                   and t.user_attrs.get("active_units", math.inf) < floor)]
    return max(ok, key=lambda t: (t.value, -t.number)) if ok else None


def _storage(url: str | None):
    import optuna

    if url is None:
        return None
    # Heartbeats let a resumed study see a killed process's trial as failed (after the grace period).
    return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)


def _plots(study) -> dict[str, Any]:
    """The study's figures (matplotlib; parameter importances need two finished trials that differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    figures = {}
    for name, plot in (("optimization_history", vis.plot_optimization_history),
                       ("intermediate_values", vis.plot_intermediate_values),
                       ("param_importances", vis.plot_param_importances)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna.exceptions.ExperimentalWarning
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                log.info("no %s plot: %s", name, exc)
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        figures[name] = fig
        plt.close(fig)
    return figures


def tuned_yaml(best, study_name: str, source: str, n_finished: int) -> str:
    header = (f"# piarec tune: study {study_name}, trial {best.number} of {n_finished} finished, "
              f"validation NDCG@100 {best.value:.4f}\n# snapshot: {source}\n"
              f"# apply with: piarec train --tuned-config <this file>\n")
    return header + yaml.safe_dump(nested(best.params), sort_keys=True)


def tune(cfg: PipelineConfig, snap: Snapshot, *, source: str, output: str | None = None,
         progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Search ``cfg.tune.space`` on ``snap``'s validation users; write the best configuration
    to ``output`` (default ``<root>/tuning/<study>/best_config.yaml``) and return a summary.

    Raises :class:`TrainingError` when no trial completes feasibly (nothing is written then).
    """
    import mlflow
    import optuna

    tc = cfg.tune
    if snap.val.fold_in.n_rows == 0:
        raise TrainingError("the snapshot has no validation users to tune on; raise split.val_fraction")
    study_name = tc.study_name or f"tune-{snap.manifest_digest()[:12]}"
    output = output or layout.tuned_config_uri(cfg.storage, study_name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=_storage(tc.study_storage), load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=tc.seed, n_startup_trials=tc.startup_trials,
                                           constraints_func=_feasible(cfg)),
        pruner=(optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=tc.prune_warmup_epochs)
                if tc.pruner == "median" else optuna.pruners.NopPruner()))
    earlier = [t for t in study.trials if t.state.is_finished()]
    if not study.trials:
        study.enqueue_trial(current_values(cfg), user_attrs={"given": True})
    remaining = tc.trials - len(earlier)

    experiment_id = registry.ensure_experiment(cfg, tc.experiment)  # binds mlflow to the tracking URI
    search = _Search(cfg, snap, progress, experiment_id)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune {study_name}") as run:
        mlflow.set_tags({"snapshot": source, "study": study_name, "resumed_trials": str(len(earlier))})
        mlflow.log_params({f"tune.{k}": v for k, v in tc.model_dump(exclude={"space"}).items()})
        mlflow.log_params({"n_train_users": snap.train.n_rows, "n_val_users": snap.val.fold_in.n_rows,
                           "n_items": snap.train.n_cols})
        mlflow.log_dict({k: v.model_dump(exclude_none=True) for k, v in tc.space.items()}, "space.json")
        progress(f"study {study_name}: {len(earlier)} trials finished earlier, {max(remaining, 0)} to run"
                 f"{f' within {tc.timeout_s:.0f} s' if tc.timeout_s else ''}; {len(tc.space)} parameters")
        if remaining > 0:
            study.optimize(_objective(search), n_trials=remaining, timeout=tc.timeout_s,
                           catch=(TrainingError, ConfigError),
                           callbacks=[lambda s, t: _report_trial(search, s, t)])

        states = {s.name.lower(): sum(t.state == s for t in study.trials)
                  for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                            optuna.trial.TrialState.FAIL)}
        mlflow.log_metrics({f"trials_{k}": v for k, v in states.items()} | {"cpu_seconds": search.cpu_seconds,
                           "wall_seconds": time.perf_counter() - search.started})
        best = best_trial(study, cfg)
        if best is None:
            raise TrainingError(f"no trial of study {study_name} completed with at least {_min_active(cfg)} active "
                                f"units ({states}); nothing written")
        given = next((t for t in study.trials if t.user_attrs.get("given")), None)
        text = tuned_yaml(best, study_name, source, sum(t.state.is_finished() for t in study.trials))
        replace_bytes(resolve(output), text.encode())
        mlflow.log_text(text, BEST_CONFIG)
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.log_metrics({f"best_{OBJECTIVE}": best.value, "best_trial": best.number,
                            **({f"given_{OBJECTIVE}": given.value} if given is not None and given.value is not None else {}),
                            **{f"best_test_{k}": v for k, v in best.user_attrs.get("test", {}).items()}})
        mlflow.set_tags({"best_config": output, "best_trial_run": best.user_attrs.get("mlflow_run_id", "")})
        if cfg.mlflow.log_plots:
            for name, fig in _plots(study).items():
                mlflow.log_figure(fig, f"plots/{name}.png")

    cpu_all = sum(t.user_attrs.get("cpu_seconds", 0.0) for t in study.trials)
    return {
        "study": study_name, "run_id": run.info.run_id, "output": output, "trials": states,
        "best": {"trial": best.number, OBJECTIVE: best.value, "params": best.params,
                 "active_units": best.user_attrs.get("active_units"), "best_epoch": best.user_attrs.get("best_epoch"),
                 "test": best.user_attrs.get("test", {}), "cpu_seconds": best.user_attrs.get("cpu_seconds")},
        "given": None if given is None else {"trial": given.number, OBJECTIVE: given.value,
                                             "params": given.params, "state": given.state.name.lower()},
        "cpu_seconds": {"this_run": search.cpu_seconds, "study": cpu_all},
    }


def run_tuning(cfg: PipelineConfig, snapshot_uri: str, output: str | None = None) -> dict[str, Any]:
    """:func:`tune` on the snapshot at ``snapshot_uri``."""
    return tune(cfg, load_snapshot(snapshot_uri), source=snapshot_uri, output=output)
