"""`piarec tune`: the Optuna search, its MLflow runs, the tuned configuration and its use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import make_planted_snapshot
from piarec.config import ConfigError, load_config, parse_tuned
from piarec.errors import TrainingError
from piarec.train.tune import current_values, tune

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = {"training": {"epochs": 8, "device": "cpu", "lr": 1e-4}, "model": {"hidden_dim": 32, "latent_dim": 8},
         "diagnostics": {"enabled": False}, "mlflow": {"log_plots": True}}


def small_cfg(root: Path, tune_section: dict, **sections):
    return load_config(overrides={**SMALL, **sections, "storage": {"root": str(root)},
                                  "tune": {"startup_trials": 2, "prune_warmup_epochs": 2, **tune_section}})


def mlflow_runs(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return mlflow.search_runs(experiment_names=["piarec-tune"], output_format="list")


@pytest.fixture(scope="module")
def snap():
    return make_planted_snapshot()


def test_a_search_beats_the_given_config_and_writes_only_the_tuned_keys(snap, tmp_path):
    # The given lr (1e-4) barely trains in 8 epochs; the space holds it, so it is trial 0.
    cfg = small_cfg(tmp_path, {"trials": 6, "pruner": "none", "space": {
        "training.lr": {"low": 1e-4, "high": 3e-2, "log": True}, "model.latent_dim": {"choices": [4, 8, 16]},
        "training.anneal_epochs": {"low": 1, "high": 20}}})
    out = tune(cfg, snap, source="memory://planted")

    assert out["trials"] == {"complete": 6, "pruned": 0, "fail": 0}
    # trial 0 is the config as given: anneal_epochs (unset, outside the range) is not drawn for it
    assert out["given"]["trial"] == 0 and out["given"]["params"] == {"training.lr": 1e-4, "model.latent_dim": 8}
    assert out["best"]["val_ndcg_at_100"] > out["given"]["val_ndcg_at_100"] + 0.05
    assert out["best"]["test"]["ndcg_at_100"] > 0  # reported for the record, never used to choose
    assert out["cpu_seconds"]["this_run"] > 0

    text = Path(out["output"]).read_text()
    assert out["output"] == f"{tmp_path}/tuning/{out['study']}/best_config.yaml"
    tuned = parse_tuned(text, out["output"])
    assert set(tuned) <= {"model", "training"}
    assert {f"{s}.{k}" for s, keys in tuned.items() for k in keys} == {"training.lr", "model.latent_dim",
                                                                       "training.anneal_epochs"}
    applied = load_config(tuned=tuned)
    assert applied.training.lr == out["best"]["params"]["training.lr"]
    assert applied.model.latent_dim == out["best"]["params"]["model.latent_dim"]
    assert applied.model.hidden_dim == 600 and applied.training.epochs == 200  # the rest is the config's

    runs = mlflow_runs(tmp_path)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == out["run_id"]]
    assert len(parent) == 1 and parent[0].info.run_id == out["run_id"] and len(trials) == 6
    assert parent[0].data.metrics["best_val_ndcg_at_100"] == pytest.approx(out["best"]["val_ndcg_at_100"])
    assert {r.data.tags["trial_state"] for r in trials} == {"COMPLETE"}
    best_run = next(r for r in trials if r.data.tags["trial"] == str(out["best"]["trial"]))
    assert float(best_run.data.params["training.lr"]) == pytest.approx(out["best"]["params"]["training.lr"])

    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(out["run_id"])}
    plots = {a.path for a in MlflowClient().list_artifacts(out["run_id"], "plots")}
    assert {"best_config.yaml", "space.json"} <= artifacts
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= plots


def test_the_median_pruner_stops_trials_behind_the_earlier_ones(snap, tmp_path):
    # lr 1e-7 does not move the model: once a good trial has run, such a trial is stopped early.
    cfg = small_cfg(tmp_path, {"trials": 6, "startup_trials": 1, "prune_warmup_epochs": 1, "space": {
        "training.lr": {"choices": [3e-3, 1e-7]}}}, training={**SMALL["training"], "lr": 3e-3})
    out = tune(cfg, snap, source="memory://planted")

    assert out["trials"]["pruned"] >= 1 and out["best"]["params"] == {"training.lr": 3e-3}
    runs = mlflow_runs(tmp_path)
    pruned = [r for r in runs if r.data.tags.get("trial_state") == "PRUNED"]
    assert pruned and all(r.info.status == "KILLED" and r.data.params["training.lr"] == "1e-07" for r in pruned)
    from mlflow import MlflowClient

    epochs = [len(MlflowClient().get_metric_history(r.info.run_id, "val_ndcg_at_100")) for r in pruned]
    assert max(epochs) < 8  # stopped before its last epoch


def test_a_trial_that_raises_is_a_failed_trial_and_the_search_goes_on(snap, tmp_path, monkeypatch):
    import piarec.train.tune as tune_module

    real = tune_module.train

    def flaky(cfg, snap, **kw):  # e.g. a GPU out of memory at the space's largest corner
        if cfg.model.latent_dim == 16:
            raise RuntimeError("CUDA out of memory")
        return real(cfg, snap, **kw)
    monkeypatch.setattr(tune_module, "train", flaky)
    cfg = small_cfg(tmp_path, {"trials": 6, "pruner": "none", "space": {"model.latent_dim": {"choices": [8, 16]}}})
    out = tune(cfg, snap, source="memory://planted")
    assert out["trials"]["fail"] >= 1 and out["trials"]["complete"] >= 1
    assert sum(out["trials"].values()) == 6 and out["best"]["params"] == {"model.latent_dim": 8}
    failed = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("trial_state") == "FAILED"]
    assert failed and all(r.info.status == "FAILED" and "out of memory" in r.data.tags["error"] for r in failed)


def test_a_collapsed_configuration_is_never_chosen(snap, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path}/study.db"
    cfg = small_cfg(tmp_path, {"trials": 2, "study_storage": storage, "study_name": "s",
                               "space": {"training.lr": {"low": 1e-3, "high": 1e-2}}},
                    gate={"min_active_units": 9})  # more than the 8 latent units the model has
    with pytest.raises(TrainingError, match="no trial .* with at least 9 active units"):
        tune(cfg, snap, source="memory://planted")
    assert not list(tmp_path.glob("tuning/**/best_config.yaml"))  # nothing written
    # The sampler is told too: each trial carries its shortfall as an infeasible constraint.
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert len(trials) == 2
    for t in trials:
        assert t.constraints == {"active_unit_shortfall": pytest.approx(9 - t.user_attrs["active_units"])}
        assert t.constraints["active_unit_shortfall"] > 0


def test_a_trial_that_trains_past_the_cost_ratio_is_never_chosen(snap, tmp_path):
    import optuna

    # Trial 0 trains the given 2 epochs (outside the space's range, so kept as given); every
    # other trial draws 30-40 epochs: better on validation, and 15-20x the training time.
    storage = f"sqlite:///{tmp_path}/study.db"
    cfg = small_cfg(tmp_path, {"trials": 3, "pruner": "none", "max_cost_ratio": 2.0, "study_storage": storage,
                               "study_name": "s", "space": {"training.epochs": {"low": 30, "high": 40}}},
                    training={**SMALL["training"], "epochs": 2, "lr": 3e-3})
    out = tune(cfg, snap, source="memory://planted")

    trials = optuna.load_study(study_name="s", storage=storage).trials
    given, others = trials[0], trials[1:]
    assert given.user_attrs["given"] and given.constraints["train_cost_excess"] == pytest.approx(1.0 - 2.0)
    assert len(others) == 2 and all(t.params["training.epochs"] >= 30 for t in others)
    for t in others:  # the sampler sees each as infeasible, by how far its time ratio is above 2
        ratio = t.user_attrs["train_seconds"] / given.user_attrs["train_seconds"]
        assert ratio > 2.0 and t.constraints["train_cost_excess"] == pytest.approx(ratio - 2.0)
    assert max(t.value for t in others) > given.value  # chosen for its cost, not its value
    assert out["best"]["trial"] == 0 and out["given"]["train_seconds"] == out["best"]["train_seconds"]
    assert "# training: " in Path(out["output"]).read_text() and "1.00x trial 0" in Path(out["output"]).read_text()

    # A limit below trial 0's own cost leaves nothing to choose: a clear error, nothing written.
    strict = small_cfg(tmp_path / "strict", {"trials": 1, "max_cost_ratio": 0.5, "space": {
        "training.epochs": {"low": 30, "high": 40}}}, training={**SMALL["training"], "epochs": 2})
    with pytest.raises(TrainingError, match=r"within 0.5x trial 0's training time"):
        tune(strict, snap, source="memory://planted")
    assert not list((tmp_path / "strict").glob("tuning/**/best_config.yaml"))


def test_a_killed_search_resumes_with_its_finished_trials(snap, tmp_path):
    import optuna

    space = {"training.lr": {"low": 1e-3, "high": 3e-2, "log": True}}
    storage = f"sqlite:///{tmp_path}/study.db"
    first = tune(small_cfg(tmp_path, {"trials": 3, "study_storage": storage, "study_name": "s", "space": space}),
                 snap, source="memory://planted")
    # A kill leaves the trial it was running RUNNING in the study database.
    from mlflow import MlflowClient

    study = optuna.load_study(study_name="s", storage=storage)
    killed = MlflowClient().create_run(MlflowClient().get_experiment_by_name("piarec-tune").experiment_id)
    study.ask().set_user_attr("mlflow_run_id", killed.info.run_id)
    study.set_user_attr("mlflow_run_id", killed.info.run_id)
    again = tune(small_cfg(tmp_path, {"trials": 5, "study_storage": storage, "study_name": "s", "space": space}),
                 snap, source="memory://planted")

    assert sum(first["trials"].values()) == 3 and sum(again["trials"].values()) == 5  # 2 new, not 5
    assert again["best"]["val_ndcg_at_100"] >= first["best"]["val_ndcg_at_100"]
    children = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("mlflow.parentRunId") == again["run_id"]]
    assert sorted(int(r.data.tags["trial"]) for r in children) == [4, 5]  # 3 was the killed one
    assert MlflowClient().get_run(killed.info.run_id).info.status == "KILLED"  # closed, not left RUNNING
    lrs = [t.params["training.lr"] for t in optuna.load_study(study_name="s", storage=storage).trials if t.params]
    assert len(set(lrs)) == len(lrs)  # the resumed sampler is reseeded: no startup draw repeated
    assert again["cpu_seconds"]["study"] > again["cpu_seconds"]["this_run"]


def test_trial_zero_is_the_given_configuration_where_the_space_holds_it():
    cfg = load_config(overrides={"training": {"lr": 0.5}, "tune": {"space": {
        "training.lr": {"low": 1e-4, "high": 1e-2}, "model.keep_prob": {"low": 0.1, "high": 0.9},
        "pia.schedule": {"choices": ["paper", "patience"]}, "training.anneal_epochs": {"low": 1, "high": 5}}}})
    # lr 0.5 is outside its range and anneal_epochs is unset: those two are sampled
    assert current_values(cfg) == {"model.keep_prob": 0.5, "pia.schedule": "patience"}


@pytest.mark.parametrize("space, message", [
    ({"storage.root": {"choices": ["x"]}}, "must start with one of model, pia, training"),
    ({"training.nope": {"low": 1, "high": 2}}, "TrainingConfig has no field 'nope'"),
    ({"model.keep_prob.x": {"low": 1, "high": 2}}, "'keep_prob' is not a section"),
    ({"training.lr": {"low": 2, "high": 1}}, "low < high"),
    ({"training.lr": {"low": 0, "high": 1, "log": True}}, "low > 0"),
    ({"training.lr": {"low": 0.1, "high": 1, "choices": [1]}}, "either a range"),
    ({"model.regularizers": {"choices": [1]}}, "names a section, not a field"),
    ({"pia.schedule": {"low": 1, "high": 2}}, "a range needs a numeric field"),
    ({"pia.schedule": {"choices": ["paper", "bogus"]}}, "'patience' or 'paper'"),
    ({"model.latent_dim": {"choices": [8, "x"]}}, "valid integer"),
    ({"model.latent_dim": {"low": 10.2, "high": 10.8}}, "fractional part"),
    ({"model.keep_prob": {"low": 0.5, "high": 1.5}}, "less than or equal to 1"),
])
def test_a_bad_search_space_fails_at_load_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"tune": {"space": space}})


def test_a_tuned_config_sets_only_training_keys_and_sits_between_the_file_and_the_environment(tmp_path):
    with pytest.raises(ConfigError, match="may set only model, pia, training; it also sets storage"):
        parse_tuned("storage:\n  root: /elsewhere\ntraining:\n  lr: 0.01\n", "t.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_tuned("training: [", "t.yaml")
    base = tmp_path / "pipeline.yaml"
    base.write_text(yaml.safe_dump({"training": {"lr": 0.002, "batch_size": 64}}))
    tuned = parse_tuned("training:\n  lr: 0.01\n  batch_size: 128\n", "t.yaml")
    cfg = load_config(base, tuned=tuned, environ={"PIAREC__TRAINING__BATCH_SIZE": "256"})
    assert cfg.training.lr == 0.01 and cfg.training.batch_size == 256


def test_piarec_tune_then_train_with_the_tuned_config(snap, tmp_path, monkeypatch, capsys):
    """The CLI end to end: tune on a published snapshot, then `piarec train --tuned-config`
    trains and registers with the tuned values, and says which file it used."""
    from test_gate import write_snapshot

    from piarec.cli import main

    uri = write_snapshot(snap, tmp_path / "snapshots" / "window_end=2026-04-01")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "storage": {"root": str(tmp_path / "work")},
                                      "tune": {"startup_trials": 1, "space": {
                                          "training.lr": {"low": 1e-3, "high": 3e-2, "log": True},
                                          "model.keep_prob": {"low": 0.4, "high": 0.9}}}}))
    monkeypatch.delenv("PIAREC_CONFIG", raising=False)
    assert main(["--config", str(config), "tune", "--snapshot", uri, "--trials", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trials"]["complete"] == 3
    assert main(["--config", str(config), "train", "--snapshot", uri, "--tuned-config", out["output"]]) == 0
    trained = json.loads(capsys.readouterr().out)

    from mlflow import MlflowClient

    run = MlflowClient().get_run(trained["run_id"])
    assert run.data.tags["tuned_config"] == out["output"]
    assert float(run.data.params["training.lr"]) == pytest.approx(out["best"]["params"]["training.lr"])
    assert float(run.data.params["model.keep_prob"]) == pytest.approx(out["best"]["params"]["model.keep_prob"])
    assert run.data.params["training.epochs"] == "8"  # untouched keys keep the config file's value

    assert main(["--config", str(config), "train", "--snapshot", uri, "--tuned-config",
                 str(tmp_path / "missing.yaml")]) == 2
    assert "tuned config" in capsys.readouterr().err
