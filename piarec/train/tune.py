"""`piarec tune`: a hyperparameter search on the snapshot's validation users.

Optuna drives it: a TPE sampler over ``tune.space`` (dotted keys of model / pia / training,
each a range or a list of choices), a median pruner fed by every epoch's validation
NDCG@100, and a budget of trials and/or seconds. The objective is the trainer's own
selection metric: validation NDCG@100 of a trial's best epoch. Trial 0 is the configuration
as given (where the space holds its values), so the search reports what it gained over it.

A trial counts as feasible when its best model keeps at least ``gate.min_active_units``
active latent units (a collapsed configuration the promotion gate would refuse) and, with
``tune.max_cost_ratio``, when its training took at most that many times as long as trial
0's (wall seconds of the training). An infeasible trial is recorded but never chosen, and
the sampler is told (an Optuna constraint).

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
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from piarec.config import PipelineConfig, SearchParam, deep_merge, integer_field, space_field
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
def suggest(trial, key: str, spec: SearchParam) -> Any:
    """The trial's value of ``key``: one of its choices, or a draw from its range (an integer
    for an integer field)."""
    if spec.choices is not None:
        return trial.suggest_categorical(key, spec.choices)
    if integer_field(space_field(key)):
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


def _value(cfg: PipelineConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def effective_values(cfg: PipelineConfig) -> dict[str, Any]:
    """The value of every searched key in ``cfg``: what a trial trained with (and what the tuned
    YAML writes, so applying it over another base config reproduces the trial)."""
    return {key: _value(cfg, key) for key in cfg.tune.space}


def current_values(cfg: PipelineConfig) -> dict[str, Any]:
    """The configuration's own value of every searched key the space holds (enqueued as trial 0;
    the other keys keep the configuration's value in that trial)."""
    out: dict[str, Any] = {}
    for key, spec in cfg.tune.space.items():
        value = _value(cfg, key)
        if (value in spec.choices) if spec.choices is not None else (
                isinstance(value, (int, float)) and spec.low <= value <= spec.high):
            out[key] = value
    return out


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one


# -- one trial -----------------------------------------------------------------------------------
@dataclass
class _Search:
    cfg: PipelineConfig
    snap: Snapshot
    progress: Callable[[str], None]
    experiment_id: str
    started: float = field(default_factory=time.perf_counter)
    cpu_seconds: float = 0.0
    study: Any = None


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
        # Trial 0 takes the given configuration's values: the enqueued keys, and the config's own
        # for keys whose value the space does not hold (nothing is drawn for it).
        given = trial.user_attrs.get("given")
        space = {k: v for k, v in cfg.tune.space.items() if not given or k in trial.user_attrs["given_keys"]}
        values = {key: suggest(trial, key, spec) for key, spec in space.items()}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with mlflow.start_run(experiment_id=search.experiment_id, nested=True, run_name=f"trial {trial.number}") as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(values)
            mlflow.set_tag("trial", str(trial.number))
            state = "FAILED"
            try:
                trial_cfg = apply(cfg, values)
                effective = effective_values(trial_cfg)
                trial.set_user_attr("values", effective)
                mlflow.log_params({k: v for k, v in effective.items() if k not in values})  # the given ones

                def on_epoch(row: dict[str, float]) -> None:
                    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
                    trial.report(row[OBJECTIVE], int(row["epoch"]))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"validation NDCG@100 {row[OBJECTIVE]:.4f} at epoch "
                                                 f"{int(row['epoch'])} is below the median of earlier trials")

                result = train(trial_cfg, snap, on_epoch=on_epoch)
                train_seconds = time.perf_counter() - wall0
                trial.set_user_attr("train_seconds", train_seconds)
                if cfg.tune.max_cost_ratio is not None:
                    given_seconds = train_seconds if given else _given_train_seconds(search.study)
                    trial.set_constraint("train_cost_excess",
                                         _cost_excess(train_seconds, given_seconds, cfg.tune.max_cost_ratio))
                value = float(result.best_metrics[SELECTION_METRIC])
                active = _active_units(result.model, snap, trial_cfg)
                trial.set_user_attr("active_units", active)
                trial.set_constraint("active_unit_shortfall", _shortfall(active, trial_cfg.gate.min_active_units))
                trial.set_user_attr("best_epoch", result.best_epoch)
                trial.set_user_attr("stop_reason", result.stop_reason)
                test = evaluate_model(result.model, snap.test) if snap.test.fold_in.n_rows else {}
                trial.set_user_attr("test", test)
                mlflow.log_metrics({f"best_{OBJECTIVE}": value, "best_epoch": result.best_epoch,
                                    "epochs_trained": len(result.history), "active_units": active,
                                    "train_seconds": train_seconds,
                                    **{f"test_{k}": v for k, v in test.items()}})
                mlflow.set_tag("stop_reason", result.stop_reason)
                state = "COMPLETE"
                return value
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            except Exception as exc:  # a failed trial, not a failed search (KeyboardInterrupt still stops it)
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
                mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:500])
                log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
                _free_device_memory()
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


def _shortfall(active: float | None, floor: int) -> float:
    """Active latent units a model lacks for the gate's floor: Optuna's constraint (<= 0 is
    feasible; 0 when they could not be measured)."""
    return 0.0 if active is None or not math.isfinite(active) else float(floor - active)


def _given_train_seconds(study) -> float | None:
    """Training seconds of the study's trial 0 (the configuration as given); None until it has
    completed."""
    given = next((t for t in study.trials if t.user_attrs.get("given")), None)
    return None if given is None else given.user_attrs.get("train_seconds")


def _cost_excess(seconds: float | None, given_seconds: float | None, max_ratio: float | None) -> float:
    """How far a trial's training time is above ``max_ratio`` times trial 0's, as a ratio:
    Optuna's constraint (<= 0 is feasible; 0 without a limit or either time)."""
    if max_ratio is None or seconds is None or not given_seconds:
        return 0.0
    return seconds / given_seconds - max_ratio


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
    """The complete trial with the highest validation NDCG@100 among the feasible ones: at least
    ``gate.min_active_units`` active units and, with ``tune.max_cost_ratio``, training within
    that many times trial 0's CPU seconds; None when there is none."""
    import optuna

    given_seconds = _given_train_seconds(study)
    ok = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
          and _shortfall(t.user_attrs.get("active_units"), cfg.gate.min_active_units) <= 0
          and _cost_excess(t.user_attrs.get("train_seconds"), given_seconds, cfg.tune.max_cost_ratio) <= 0]
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


def tuned_yaml(best, study_name: str, source: str, n_finished: int, given_seconds: float | None = None) -> str:
    seconds = best.user_attrs.get("train_seconds")
    cost = (f"# training: {seconds:.0f} s{f', {seconds / given_seconds:.2f}x trial 0' if given_seconds else ''}\n"
            if seconds is not None else "")
    header = (f"# piarec tune: study {study_name}, trial {best.number} of {n_finished} finished, "
              f"validation NDCG@100 {best.value:.4f}\n{cost}# snapshot: {source}\n"
              f"# apply with: piarec train --tuned-config <this file>\n")
    return header + yaml.safe_dump(nested(best.user_attrs.get("values", best.params)), sort_keys=True)


def _redacted(url: str | None) -> str | None:
    """A database URL without its password (it goes into MLflow params)."""
    if not url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _close_killed_runs(study, client) -> None:
    """MLflow runs of an earlier, killed invocation (its search run and the trial it was running)
    are left RUNNING; mark them KILLED."""
    import optuna

    ids = [study.user_attrs.get("mlflow_run_id")] + [
        t.user_attrs.get("mlflow_run_id") for t in study.trials
        if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)]
    for run_id in filter(None, ids):
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - bookkeeping only; the search matters more
            log.warning("could not close the interrupted run %s: %s", run_id, exc)


def _sampler(cfg: PipelineConfig, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.tune.startup_trials)


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
        sampler=_sampler(cfg, tc.seed),
        pruner=(optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=tc.prune_warmup_epochs)
                if tc.pruner == "median" else optuna.pruners.NopPruner()))
    if study.trials:
        # A resumed study: trials a killed process left RUNNING past the heartbeat's grace period
        # become FAIL, and the sampler gets a new seed so it does not redraw the startup trials.
        optuna.storages.fail_stale_trials(study)
        study.sampler = _sampler(cfg, tc.seed + len(study.trials))
    else:
        given = current_values(cfg)
        study.enqueue_trial(given, user_attrs={"given": True, "given_keys": sorted(given)})
    earlier = [t for t in study.trials if t.state.is_finished()]
    remaining = tc.trials - len(earlier)

    experiment_id = registry.ensure_experiment(cfg, tc.experiment)  # binds mlflow to the tracking URI
    _close_killed_runs(study, registry.client(cfg))
    search = _Search(cfg, snap, progress, experiment_id, study=study)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune {study_name}") as run:
        study.set_user_attr("mlflow_run_id", run.info.run_id)
        mlflow.set_tags({"snapshot": source, "study": study_name, "resumed_trials": str(len(earlier))})
        mlflow.log_params({f"tune.{k}": v for k, v in tc.model_dump(exclude={"space"}).items()}
                          | {"tune.study_storage": _redacted(tc.study_storage)})
        mlflow.log_params({"n_train_users": snap.train.n_rows, "n_val_users": snap.val.fold_in.n_rows,
                           "n_items": snap.train.n_cols})
        mlflow.log_dict({k: v.model_dump(exclude_none=True) for k, v in tc.space.items()}, "space.json")
        progress(f"study {study_name}: {len(earlier)} trials finished earlier, {max(remaining, 0)} to run"
                 f"{f' within {tc.timeout_s:.0f} s' if tc.timeout_s else ''}; {len(tc.space)} parameters")
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        if remaining > 0:
            study.optimize(_objective(search), n_trials=None, timeout=tc.timeout_s, catch=(Exception,),
                           callbacks=[lambda s, t: _report_trial(search, s, t),
                                      optuna.study.MaxTrialsCallback(tc.trials, states=finished)])

        states = {s.name.lower(): sum(t.state == s for t in study.trials) for s in finished}
        mlflow.log_metrics({f"trials_{k}": v for k, v in states.items()} | {"cpu_seconds": search.cpu_seconds,
                           "wall_seconds": time.perf_counter() - search.started})
        best = best_trial(study, cfg)
        if best is None:
            errors = sorted({t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs})
            cost = (f" within {tc.max_cost_ratio:g}x trial 0's training time"
                    if tc.max_cost_ratio is not None else "")
            raise TrainingError(f"no trial of study {study_name} completed with at least {cfg.gate.min_active_units} active "
                                f"units{cost} ({states}){'; errors: ' + ' | '.join(errors[:3]) if errors else ''}; "
                                "nothing written")
        given = next((t for t in study.trials if t.user_attrs.get("given")), None)
        given_seconds = _given_train_seconds(study)
        text = tuned_yaml(best, study_name, source, sum(t.state.is_finished() for t in study.trials), given_seconds)
        replace_bytes(resolve(output), text.encode())
        mlflow.log_text(text, BEST_CONFIG)
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.log_metrics({f"best_{OBJECTIVE}": best.value, "best_trial": best.number,
                            **({"best_train_cost_ratio": best.user_attrs["train_seconds"] / given_seconds}
                               if given_seconds and "train_seconds" in best.user_attrs else {}),
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
                 "test": best.user_attrs.get("test", {}), "cpu_seconds": best.user_attrs.get("cpu_seconds"),
                 "train_seconds": best.user_attrs.get("train_seconds")},
        "given": None if given is None else {"trial": given.number, OBJECTIVE: given.value,
                                             "params": given.params, "state": given.state.name.lower(),
                                             "train_seconds": given_seconds},
        "cpu_seconds": {"this_run": search.cpu_seconds, "study": cpu_all},
    }


def run_tuning(cfg: PipelineConfig, snapshot_uri: str, output: str | None = None) -> dict[str, Any]:
    """:func:`tune` on the snapshot at ``snapshot_uri``."""
    return tune(cfg, load_snapshot(snapshot_uri), source=snapshot_uri, output=output)
