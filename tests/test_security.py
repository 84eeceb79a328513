"""Nothing the pipeline loads executes pickled code; paths cannot leave their roots."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from piarec.bundle import WEIGHTS_FILE, load_bundle, save_bundle
from piarec.config import ModelConfig
from piarec.errors import PathEscapeError
from piarec.model import MultiVAE
from piarec.storage import child_uri


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
