"""Artefacts written by piarec 0.1.0 still load and score: a model bundle, an MLflow pyfunc
model (its logged code imports the 0.1.0 module paths), the same model registered in an
MLflow store and scored by the daily job's loader, and a training checkpoint that resumes
to the weights 0.1.0 reached. The artefacts were made once by
``tests/fixtures/legacy_0_1_0/make_fixture.py`` with the 0.1.0 tree; ``expected.json``
holds what 0.1.0 answered."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from piarec.config import load_config

REPO = Path(__file__).resolve().parents[1]
REVISION = "9d02e87646b2abed1e7ea2b2c53cc89ce4dc1339"  # piarec 0.1.0: the last flat layout
MAKE_FIXTURE = Path(__file__).parent / "fixtures" / "legacy_0_1_0" / "make_fixture.py"

pytestmark = pytest.mark.filterwarnings("ignore")


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + b"\0" + state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> tuple[Path, dict]:
    """(folder of the 0.1.0 artefacts, what 0.1.0 answered), made by the 0.1.0 tree."""
    has_revision = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{REVISION}^{{commit}}"],
                                  capture_output=True).returncode == 0 if shutil.which("git") else False
    if not has_revision:
        pytest.skip(f"the 0.1.0 revision {REVISION[:7]} is not in this clone's history (a shallow clone?)")
    root = tmp_path_factory.mktemp("legacy")
    tree, out = root / "tree", root / "artefacts"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", REVISION, "piarec", "tests/conftest.py",
                              "tests/test_gate.py"], capture_output=True, check=True).stdout
    (root / "tree.tar").write_bytes(archive)
    with tarfile.open(root / "tree.tar") as tar:
        tar.extractall(tree, filter="data")
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'tests'}"}
    subprocess.run([sys.executable, str(MAKE_FIXTURE), str(out)], env=env, cwd=root, check=True,
                   capture_output=True, timeout=600)
    return out, json.loads((out / "expected.json").read_text())


def _assert_predictions(out: pd.DataFrame, expected: dict) -> None:
    want = expected["predictions"]
    assert out["user_id"].tolist() == want["user_id"]
    assert [list(map(str, x)) for x in out["item_ids"]] == want["item_ids"]
    np.testing.assert_allclose(np.array([list(x) for x in out["scores"]], np.float64),
                               np.array(want["scores"], np.float64), rtol=1e-6)
    assert out["source"].tolist() == want["source"]


def test_bundle_of_0_1_0_loads_and_scores_like_0_1_0(legacy):
    fixture, expected = legacy
    from piarec.models.bundle import load_bundle
    from piarec.models.multivae import MultiVAE
    from piarec.scoring.arrow import map_histories
    from piarec.scoring.scorer import TopKScorer

    bundle = load_bundle(fixture / "bundle")
    assert isinstance(bundle.model, MultiVAE) and bundle.n_items == 200
    assert bundle.model.config.latent_dim == expected["config"]["model"]["latent_dim"]
    inputs = expected["inputs"]
    history = inputs["history"]
    seen = [h + s for h, s in zip(history, inputs["seen"])]
    hist, _ = map_histories(history, bundle.item_index(), bundle.n_items)
    seen_csr, _ = map_histories(seen, bundle.item_index(), bundle.n_items)
    scored = TopKScorer(bundle, expected["k"]).score(hist, seen_csr)
    got = [[str(bundle.item_ids[i]) for i in row] for row in scored.item_idx]
    assert got == expected["predictions"]["item_ids"]
    assert scored.source.tolist() == expected["predictions"]["source"]


def test_pyfunc_model_logged_by_0_1_0_predicts_as_it_did(legacy):
    import mlflow

    fixture, expected = legacy
    model = mlflow.pyfunc.load_model(str(fixture / "pyfunc"))
    out = model.predict(pd.DataFrame(expected["inputs"]), params={"k": expected["k"]})
    _assert_predictions(out, expected)


def test_registered_0_1_0_model_is_served_by_the_daily_loader(legacy, tmp_path):
    import mlflow

    fixture, expected = legacy
    from piarec.data import layout
    from piarec.registry import client as registry

    cfg = load_config(environ={}, overrides={"storage": {"root": str(tmp_path)}})
    mlflow.set_tracking_uri(layout.tracking_uri(cfg.mlflow, cfg.storage))
    experiment = registry.ensure_experiment(cfg)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(fixture / "pyfunc"), "model")
    mlflow.register_model(f"runs:/{run.info.run_id}/model", cfg.mlflow.registered_model)
    registry.set_alias(cfg, "champion", "1")

    bundle, ref = registry.load_model(cfg, "models:/piarec@champion")
    assert ref.version == "1" and bundle.n_items == 200
    reference = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}@champion")
    _assert_predictions(reference.predict(pd.DataFrame(expected["inputs"]), params={"k": expected["k"]}), expected)


def test_checkpoint_of_0_1_0_resumes_to_the_weights_0_1_0_reached(legacy, tmp_path):
    fixture, expected = legacy
    from test_gate import planted

    from piarec.train.checkpoint import load_checkpoint
    from piarec.train.trainer import train

    ck = tmp_path / "checkpoint.pt"
    shutil.copy(fixture / "checkpoint-epoch2.pt", ck)
    restored = load_checkpoint(str(ck), torch.device("cpu"))
    assert restored.epoch == 2 and len(restored.history) == 2

    cfg = load_config(environ={}, overrides=expected["config"])
    epochs = []
    result = train(cfg, planted(400), checkpoint_path=str(ck), on_epoch=lambda row: epochs.append(row["epoch"]))
    assert epochs == [1, 2, 3]  # two replayed from the checkpoint, one trained
    final = load_checkpoint(str(ck), torch.device("cpu"))
    assert final.epoch == 3
    assert _digest(final.model) == expected["final_weights_sha256"]
    assert result.best_epoch == expected["best_epoch"]
    assert _digest(result.model.state_dict()) == expected["best_weights_sha256"]
