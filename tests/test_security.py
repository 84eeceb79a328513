"""Nothing the pipeline loads executes pickled code; paths cannot leave their roots."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from piarec.models.bundle import WEIGHTS_FILE, load_bundle, save_bundle
from piarec.config import ModelConfig
from piarec.errors import PathEscapeError
from piarec.models.multivae import MultiVAE
from piarec.data.storage import child_uri


class _Exploit:
    """Unpickling this runs a shell command (the classic pickle payload)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_place_of_weights_is_refused(tmp_path):
    bundle_dir = tmp_path / "model"
    model = MultiVAE(5, ModelConfig(hidden_dim=4, latent_dim=2))
    save_bundle(bundle_dir, model, np.array(list("abcde"), dtype=object), np.ones(5, np.float32))
    assert load_bundle(bundle_dir).n_items == 5  # the genuine bundle loads

    marker = tmp_path / "pwned"
    state = dict(model.state_dict())
    state["payload"] = _Exploit(str(marker))
    torch.save(state, bundle_dir / WEIGHTS_FILE)  # a weights file that carries code
    # Sanity: an unrestricted unpickler would run it.
    with open(bundle_dir / WEIGHTS_FILE, "rb") as f:
        assert b"system" in f.read()

    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        load_bundle(bundle_dir)
    assert not marker.exists()


@pytest.mark.parametrize("segment", ["..", "../../etc", "/etc/passwd", "dt=2026-04-30/../../x",
                                     "arm=a/b", "", ".", "..hidden", "a b", "a\\b"])
def test_path_segments_cannot_escape_their_root(segment):
    with pytest.raises(PathEscapeError, match="not a safe path segment"):
        child_uri("s3://bucket/recs", segment)


def test_safe_segments_stay_under_the_root():
    assert child_uri("s3://bucket/recs/", "dt=2026-04-30", "arm=champion") == "s3://bucket/recs/dt=2026-04-30/arm=champion"
    assert child_uri("/data/snapshots", "window_end=2026-05-01") == "/data/snapshots/window_end=2026-05-01"


def test_arm_names_from_configuration_cannot_escape(monkeypatch):
    from piarec.config import load_config
    from piarec.errors import ConfigError

    monkeypatch.setenv("PIAREC__SCORING__ARM", "../../etc")
    with pytest.raises(ConfigError, match="scoring.arm"):
        load_config()
    monkeypatch.delenv("PIAREC__SCORING__ARM")
    with pytest.raises(ConfigError, match="scoring.challenger_arm"):
        load_config(overrides={"scoring": {"challenger_arm": "/abs"}})


def test_output_paths_are_built_from_checked_segments(tmp_path):
    import datetime as dt

    from piarec.data.layout import arm_uri as output_uri, histories_uri, snapshot_uri

    day = dt.date(2026, 4, 30)
    root = str(tmp_path / "recs")
    assert output_uri(root, day, "champion") == f"{root}/dt=2026-04-30/arm=champion"
    assert snapshot_uri(root, day) == f"{root}/window_end=2026-04-30"
    assert histories_uri(root, day) == f"{root}/dt=2026-04-30"
    for arm in ("../../x", "a/b", "/etc"):  # "arm=.." would be a plain folder name
        with pytest.raises(PathEscapeError):
            output_uri(root, day, arm)


def test_cli_refuses_an_escaping_arm_in_one_line(tmp_path, capsys):
    from piarec.cli import main

    out = tmp_path / "recs"
    rc = main(["score", "--date", "2026-04-30", "--engine", "local", "--histories", str(tmp_path / "h"),
               "--out", str(out), "--model", str(tmp_path / "no-model"), "--arm", "../../escaped"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "../../escaped" in err[0] and "Traceback" not in err[0]
    assert not out.exists() and not (tmp_path / "escaped").exists()
