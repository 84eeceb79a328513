import pytest

from piarec.config import load_config
from piarec.errors import ConfigError
from piarec.data import layout


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
