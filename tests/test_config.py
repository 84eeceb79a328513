import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import yaml

from piarec.config import (
    GateConfig,
    ModelConfig,
    PipelineConfig,
    RegularizerConfig,
    ScoringConfig,
    SparkConfig,
    StorageConfig,
    TrainingConfig,
    env_overrides,
    load_config,
)
from piarec.errors import ConfigError
from piarec.data import layout

# Today's contract: the packaged piarec/defaults/local.yaml as it stood before the defaults
# moved into the typed model (git show <before>:piarec/defaults/local.yaml). load_config()
# with no file and no environment must still give exactly these values.
LOCAL_YAML_BEFORE = {
    "storage": {"root": "piarec-work"},
    "events": {"user_col": "user_id", "item_col": "item_id", "type_col": "event_type", "ts_col": "ts",
               "watch_col": "watch_seconds"},
    "window_days": 90,
    "positive": {"event_types": ["play", "complete"], "min_watch_seconds": 60},
    "filters": {"min_user_positives": 5, "min_item_users": 1, "max_user_positives": None},
    "quality": {"max_dirty_fraction": 0.01, "known_event_types": ["impression", "click", "play", "complete"]},
    "split": {"salt": "piarec-split-v1", "val_fraction": 0.05, "test_fraction": 0.05, "fold_in_fraction": 0.8},
    "model": {"backbone": "multivae", "encoder": "shallow", "hidden_dim": 600, "latent_dim": 200,
              "decoder_hidden": [], "keep_prob": 0.5, "flow_steps": 2, "flow_hidden": 400,
              "recvae_gamma": 0.005, "recvae_encoder_passes": 3, "recvae_decoder_passes": 1,
              "recvae_prior_weights": [0.15, 0.75, 0.1],
              "regularizers": {"latent_recon": False, "latent_recon_weight": 1.0, "latent_recon_warmup": 10000,
                               "noise_contrastive": False, "nc_weight": 0.1, "nc_prior_scale": 5.0,
                               "nc_noise": "swap", "nc_swap_fraction": 0.5}},
    "pia": {"enabled": True, "lambda_a": 0.1, "lambda_scale": 2.0, "patience": 5, "lambda_max": 8.0},
    "diagnostics": {"enabled": True, "every": 1, "users": 1000, "self_consistency_users": 256,
                    "jacobian_users": 16, "mask_users": 64, "mask_repeats": 8, "mask_keep_prob": None},
    "training": {"batch_size": 500, "epochs": 200, "lr": 0.001, "beta_cap": 0.2, "anneal_steps": 200000,
                 "early_stop_patience": None, "seed": 0, "device": "auto"},
    "scoring": {"k": 100, "history_days": 90, "seen_types": ["play", "complete"], "batch_size": 4096,
                "model_uri": "models:/piarec@champion", "arm": "champion", "challenger_uri": None,
                "challenger_arm": "challenger", "challenger_share": 0.1, "ab_salt": "piarec-ab-v1",
                "engine": "spark", "device": "auto", "precision": "auto", "threads": None,
                "rows_per_file": 1000000},
    "mlflow": {"tracking_uri": None, "artifact_location": None, "experiment": "piarec",
               "registered_model": "piarec", "log_plots": True},
    "spark": {"master": "local[*]", "app_name": "piarec", "shuffle_partitions": 8, "driver_memory": "4g",
              "conf": {}},
    "gate": {"metric": "ndcg_at_100", "min_uplift_over_popularity": 0.0, "tolerance": 0.02,
             "min_active_units": 5, "max_popularity_share": 0.2, "min_vocabulary_overlap": 0.95},
}
# The three typed defaults the old YAML did not repeat.
NOT_IN_LOCAL_YAML_BEFORE = {"storage.events": None, "training.weight_decay": 0.0, "training.eval_batch_size": 2000}


def _flat(tree, prefix=""):
    """{"a.b": leaf}; map fields (spark.conf) are leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "conf":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _packaged_yaml():
    return yaml.safe_load(resources.files("piarec").joinpath("defaults/local.yaml").read_text())


def test_packaged_default_is_the_local_embedded_setup():
    cfg = load_config(environ={})
    assert cfg.spark.master == "local[*]"
    assert cfg.window_days == 90
    assert cfg.positive.event_types == ["play", "complete"]
    assert layout.tracking_uri(cfg.mlflow, cfg.storage).startswith("sqlite:///") and layout.tracking_uri(cfg.mlflow, cfg.storage).endswith("piarec-work/mlflow.db")
    assert layout.artifact_location(cfg.mlflow, cfg.storage).startswith("file://")


def test_environment_overrides_are_typed_and_nested():
    cfg = load_config(environ={"PIAREC__TRAINING__EPOCHS": "7", "PIAREC__PIA__ENABLED": "false",
                               "PIAREC__STORAGE__ROOT": "s3://bucket/pre", "PIAREC__MLFLOW__TRACKING_URI": "http://127.0.0.1:5000"})
    assert cfg.training.epochs == 7
    assert cfg.pia.enabled is False
    assert layout.snapshots_root(cfg.storage) == "s3://bucket/pre/snapshots"
    assert layout.artifact_location(cfg.mlflow, cfg.storage) == "s3://bucket/pre/mlartifacts"


def test_yaml_file_then_env_then_explicit_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  epochs: 3\n  batch_size: 64\nscoring:\n  k: 10\n")
    cfg = load_config(f, environ={"PIAREC__TRAINING__EPOCHS": "4"}, overrides={"scoring": {"k": 5}})
    assert (cfg.training.epochs, cfg.training.batch_size, cfg.scoring.k) == (4, 64, 5)


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  epoks: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'training.epoks'"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match=r"unknown key 'scoring.top_k'"):
        load_config(environ={"PIAREC__SCORING__TOP_K": "3"})


def test_early_stopping_must_outlast_the_lambda_schedule():
    assert load_config(environ={}).training.early_stop_patience > load_config(environ={}).pia.patience
    with pytest.raises(ConfigError, match=r"early_stop_patience \(5\) must exceed pia.patience \(5\)"):
        load_config(environ={"PIAREC__TRAINING__EARLY_STOP_PATIENCE": "5"})
    # without PIA there is no schedule to outlast
    assert load_config(environ={"PIAREC__TRAINING__EARLY_STOP_PATIENCE": "5",
                                "PIAREC__PIA__ENABLED": "false"}).training.early_stop_patience == 5


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"training.epochs: .*'many'"):
        load_config(environ={"PIAREC__TRAINING__EPOCHS": "many"})
    with pytest.raises(ConfigError, match=r"split"):
        load_config(environ={"PIAREC__SPLIT__VAL_FRACTION": "0.45", "PIAREC__SPLIT__TEST_FRACTION": "0.45"})


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_s3_root_needs_an_explicit_tracking_uri():
    cfg = load_config(environ={"PIAREC__STORAGE__ROOT": "s3://b/p"})
    with pytest.raises(ConfigError, match="tracking_uri"):
        layout.tracking_uri(cfg.mlflow, cfg.storage)


# -- one source of defaults -------------------------------------------------------------------

def test_no_file_no_environment_gives_todays_values():
    got = _flat(load_config(environ={}).model_dump())
    want = {**_flat(LOCAL_YAML_BEFORE), **NOT_IN_LOCAL_YAML_BEFORE}
    added_since = {"events.done_marker": "_SUCCESS",  # keys added after the layout change
                   "storage.retain_versions_s": 3600.0, "storage.lease_ttl_s": 120.0}
    added_since["storage.recommendations"] = None  # defaults to <root>/recommendations
    added_since.update({"scoring.arms": [], "scoring.baseline_snapshot": None,  # arms as configuration
                        "scoring.availability": None, "scoring.availability_days": 2, "scoring.region": None,
                        "events.surface_col": "surface", "events.slot_col": "slot",  # A/B exposure columns
                        "pia.schedule": "patience", "pia.alignment": "sum", "training.anneal_epochs": None,
                        "training.noise": "auto", "training.precision": "fp32"})
    added_since.update({"tune.trials": 30, "tune.timeout_s": None, "tune.seed": 0, "tune.startup_trials": 8,
                        "tune.pruner": "median", "tune.prune_warmup_epochs": 10, "tune.study_storage": None,
                        "tune.study_name": None, "tune.experiment": "piarec-tune",  # piarec tune
                        "tune.max_cost_ratio": None})
    added_since.update({"diagnostics.posterior_samples": 32,  # z_T and RecVAE's composite prior
                        "training.beta_search": False})  # Liang et al.'s beta procedure
    space = {k for k in got if k.startswith("tune.space.")}
    assert {k.split(".")[2] for k in space} == {"training", "model", "pia"}  # tune.space.<section>.<key>.<part>
    got = {k: v for k, v in got.items() if k not in space}
    changed_since = {"training.early_stop_patience": 20}  # early stopping on by default (training scale)
    assert len(got) == 93 + len(added_since)
    assert got == {**want, **added_since, **changed_since}


def test_typed_model_is_the_one_source_of_defaults():
    packaged = _flat(_packaged_yaml())
    typed = _flat(PipelineConfig().model_dump())
    # The packaged local YAML repeats no default: every key it sets differs from the typed one.
    assert {k: v for k, v in packaged.items() if typed.get(k) == v} == {}
    assert packaged == {"spark.master": "local[*]"}
    loaded = _flat(load_config(environ={}).model_dump())
    assert {k for k in typed if typed[k] != loaded[k]} == {"spark.master"}
    # Typed default: the cluster's master (spark-submit / spark-defaults), not set in code.
    assert SparkConfig().master is None and StorageConfig().root == "piarec-work"


def test_packaged_yaml_explains_where_keys_are_documented():
    text = resources.files("piarec").joinpath("defaults/local.yaml").read_text()
    assert "piarec/config/schema.py" in text and "PIAREC__SECTION__KEY" in text and "PIAREC_CONFIG" in text


def test_a_file_can_hand_the_master_back_to_the_cluster(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("spark:\n  master: null\n")
    assert load_config(f, environ={}).spark.master is None
    assert load_config(environ={"PIAREC__SPARK__MASTER": ""}).spark.master is None


def test_get_spark_sets_no_master_when_none(monkeypatch):
    pytest.importorskip("pyspark")
    from pipelines import spark as spark_mod

    calls = []

    class FakeContext:
        def __init__(self, master):
            self.master = master

        def getConf(self):  # noqa: N802 - the PySpark name
            return {"spark.submit.pyFiles": ""}

        def addPyFile(self, path):  # noqa: N802
            calls.append(("addPyFile", path))

    class FakeSession:
        def __init__(self, master):
            self.sparkContext = FakeContext(master)

        class conf:  # noqa: N801
            @staticmethod
            def set(key, value):
                calls.append(("conf.set", key))

    class FakeBuilder:
        chosen = "spark://cluster:7077"  # the cluster's, from spark-defaults.conf

        def config(self, key, value):
            calls.append(("config", key))
            return self

        def master(self, m):
            calls.append(("master", m))
            self.chosen = m
            return self

        def appName(self, name):  # noqa: N802 - the PySpark name
            calls.append(("appName", name))
            return self

        def getOrCreate(self):  # noqa: N802
            return FakeSession(self.chosen)

    class FakeSparkSession:
        builder = FakeBuilder()

    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    monkeypatch.setattr(spark_mod, "SparkSession", FakeSparkSession)
    spark_mod.get_spark(SparkConfig())
    assert not [c for c in calls if c[0] == "master"]
    assert ("appName", "piarec") in calls and ("config", "spark.ui.enabled") not in calls
    # On a cluster the session ships this process's code to the executors.
    (shipped,) = [c[1] for c in calls if c[0] == "addPyFile"]
    assert shipped.endswith("piarec.zip") and Path(shipped).is_file()
    calls.clear()
    spark_mod.get_spark(SparkConfig(master="local[2]"))
    assert ("master", "local[2]") in calls and ("config", "spark.ui.enabled") in calls
    assert not [c for c in calls if c[0] == "addPyFile"]  # local executors share the driver's Python


# -- environment overrides --------------------------------------------------------------------

def test_env_spark_conf_keys_are_verbatim_and_values_raw_strings():
    cfg = load_config(environ={
        "PIAREC__SPARK__CONF__spark.sql.adaptive.enabled": "true",
        "PIAREC__SPARK__CONF__spark.sql.adaptive.coalescePartitions.enabled": "false",
    })
    assert cfg.spark.conf == {"spark.sql.adaptive.enabled": "true",
                              "spark.sql.adaptive.coalescePartitions.enabled": "false"}


def test_env_values_follow_the_field_type():
    cfg = load_config(environ={"PIAREC__TRAINING__EPOCHS": "30", "PIAREC__PIA__ENABLED": "false",
                               "PIAREC__POSITIVE__EVENT_TYPES": "[play]", "PIAREC__SPLIT__SALT": "123",
                               "PIAREC__SCORING__ARM": "null", "PIAREC__SCORING__THREADS": "",
                               "PIAREC__MLFLOW__TRACKING_URI": "", "PIAREC__TRAINING__LR": "0.0005"})
    assert cfg.training.epochs == 30 and isinstance(cfg.training.epochs, int)
    assert cfg.pia.enabled is False
    assert cfg.positive.event_types == ["play"]
    assert cfg.split.salt == "123" and cfg.scoring.arm == "null"  # str fields: the raw string
    assert cfg.scoring.threads is None and cfg.mlflow.tracking_uri is None  # empty = null
    assert cfg.training.lr == 0.0005


def test_env_field_names_are_case_insensitive():
    cfg = load_config(environ={"PIAREC__training__Epochs": "3", "PIAREC__Scoring__K": "7"})
    assert (cfg.training.epochs, cfg.scoring.k) == (3, 7)
    assert env_overrides({"PIAREC__TRAINING__EPOCHS": "3"}) == {"training": {"epochs": 3}}
    with pytest.raises(ConfigError, match="PIAREC__TRAINING__EPOCHS.*PIAREC__training__epochs"):
        load_config(environ={"PIAREC__TRAINING__EPOCHS": "3", "PIAREC__training__epochs": "4"})


def test_env_nested_section():
    cfg = load_config(environ={"PIAREC__MODEL__REGULARIZERS__NC_WEIGHT": "0.5",
                               "PIAREC__MODEL__REGULARIZERS__NC_NOISE": "decoder"})
    assert cfg.model.regularizers.nc_weight == 0.5 and cfg.model.regularizers.nc_noise == "decoder"


def test_env_unknown_field_names_the_variable():
    with pytest.raises(ConfigError, match=r"PIAREC__TRAINING__EPOCS.*unknown key 'training.epocs'"):
        load_config(environ={"PIAREC__TRAINING__EPOCS": "3"})
    with pytest.raises(ConfigError, match=r"PIAREC__NOPE"):
        load_config(environ={"PIAREC__NOPE": "1"})
    with pytest.raises(ConfigError, match=r"PIAREC__TRAINING__EPOCHS__X.*not a section"):
        load_config(environ={"PIAREC__TRAINING__EPOCHS__X": "1"})
    with pytest.raises(ConfigError, match=r"PIAREC__TRAINING__EPOCHS.*not a YAML value"):
        load_config(environ={"PIAREC__TRAINING__EPOCHS": "[1"})


# -- closed vocabularies ----------------------------------------------------------------------

def test_gate_metrics_are_the_names_summarize_returns():
    from piarec.data.csr import CSR
    from piarec.evaluate.metrics import summarize

    held_out = CSR.from_pairs(np.array([0]), np.array([1]), n_rows=1, n_cols=3)
    names = summarize(np.array([[1, 0, 2]]), held_out).keys()
    assert set(get_args(GateConfig.model_fields["metric"].annotation)) == set(names)


@pytest.mark.parametrize("model, field, allowed", [
    (GateConfig, "metric", {"ndcg_at_100", "recall_at_20", "recall_at_50"}),
    (ScoringConfig, "engine", {"spark", "local"}),
    (ScoringConfig, "device", {"auto", "cpu", "cuda"}),
    (ScoringConfig, "precision", {"auto", "fp32", "bf16"}),
    (TrainingConfig, "device", {"auto", "cpu", "cuda"}),
    (ModelConfig, "backbone", {"multivae", "recvae"}),
    (ModelConfig, "encoder", {"shallow", "deeper", "iaf"}),
    (RegularizerConfig, "nc_noise", {"swap", "decoder"}),
])
def test_closed_vocabularies_are_literals(model, field, allowed):
    assert set(get_args(model.model_fields[field].annotation)) == allowed


@pytest.mark.parametrize("var, key, allowed", [
    ("PIAREC__SCORING__ENGINE", "scoring.engine", ["spark", "local"]),
    ("PIAREC__GATE__METRIC", "gate.metric", ["ndcg_at_100", "recall_at_20", "recall_at_50"]),
    ("PIAREC__TRAINING__DEVICE", "training.device", ["auto", "cpu", "cuda"]),
    ("PIAREC__MODEL__REGULARIZERS__NC_NOISE", "model.regularizers.nc_noise", ["swap", "decoder"]),
])
def test_bad_vocabulary_value_names_the_key_and_the_allowed_values(var, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(environ={var: "gpu"})
    msg = str(err.value)
    assert f"{key}:" in msg and "'gpu'" in msg
    assert all(f"'{a}'" in msg for a in allowed)


def test_bad_gate_metric_in_a_file_is_rejected(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gate:\n  metric: recall_at_100\n")
    with pytest.raises(ConfigError, match=r"gate.metric: .*'ndcg_at_100'.*'recall_at_100'"):
        load_config(f, environ={})


def test_config_package_imports_no_other_piarec_module():
    code = ("import json, sys, piarec.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'piarec' or m.startswith('piarec.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(json.loads(out)) <= {"piarec", "piarec.config", "piarec.config.schema", "piarec.config.loader",
                              "piarec.errors"}


BENCHMARK_CONFIGS = sorted((Path(__file__).parents[1] / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=lambda p: p.stem)
def test_each_committed_tuned_config_applies_as_written(path):
    """Every configuration in benchmarks/configs is one `piarec train --tuned-config` accepts:
    only tunable sections, every key one the schema knows, and each value lands in the loaded
    configuration unchanged (a misspelled or moved key fails here, not in the weekly job)."""
    from piarec.config import parse_tuned

    tuned = parse_tuned(path.read_text(), str(path))
    assert tuned, f"{path.name} sets nothing"
    cfg = load_config(tuned=tuned, environ={})
    for section, values in tuned.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{path.name}: {section}.{key}"
