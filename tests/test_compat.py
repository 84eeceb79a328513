"""Artefacts written by piarec 0.1.0 still load and score: a model bundle, an MLflow pyfunc
model (its logged code imports the 0.1.0 module paths), the same model registered in an
MLflow store and scored by the daily job's loader, and a training checkpoint that resumes
to the weights 0.1.0 reached. The artefacts were made once by
``tests/fixtures/legacy_0_1_0/make_fixture.py`` with the 0.1.0 tree; ``expected.json``
holds what 0.1.0 answered."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from piarec.config import load_config

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_0_1_0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())

pytestmark = pytest.mark.filterwarnings("ignore")


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + b"\0" + state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _assert_predictions(out: pd.DataFrame) -> None:
    want = EXPECTED["predictions"]
    assert out["user_id"].tolist() == want["user_id"]
    assert [list(map(str, x)) for x in out["item_ids"]] == want["item_ids"]
    np.testing.assert_allclose(np.array([list(x) for x in out["scores"]], np.float64),
                               np.array(want["scores"], np.float64), rtol=1e-6)
    assert out["source"].tolist() == want["source"]


def test_bundle_of_0_1_0_loads_and_scores_like_0_1_0():
    from piarec.models.bundle import load_bundle
    from piarec.models.multivae import MultiVAE
    from piarec.scoring.arrow import map_histories
    from piarec.scoring.scorer import TopKScorer

    bundle = load_bundle(FIXTURE / "bundle")
    assert isinstance(bundle.model, MultiVAE) and bundle.n_items == 200
    assert bundle.model.config.latent_dim == EXPECTED["config"]["model"]["latent_dim"]
    inputs = EXPECTED["inputs"]
    history = inputs["history"]
    seen = [h + s for h, s in zip(history, inputs["seen"])]
    hist, _ = map_histories(history, bundle.item_index(), bundle.n_items)
    seen_csr, _ = map_histories(seen, bundle.item_index(), bundle.n_items)
    scored = TopKScorer(bundle, EXPECTED["k"]).score(hist, seen_csr)
    got = [[str(bundle.item_ids[i]) for i in row] for row in scored.item_idx]
    assert got == EXPECTED["predictions"]["item_ids"]
    assert scored.source.tolist() == EXPECTED["predictions"]["source"]


def test_pyfunc_model_logged_by_0_1_0_predicts_as_it_did():
    import mlflow

    model = mlflow.pyfunc.load_model(str(FIXTURE / "pyfunc"))
    out = model.predict(pd.DataFrame(EXPECTED["inputs"]), params={"k": EXPECTED["k"]})
    _assert_predictions(out)


def test_registered_0_1_0_model_is_served_by_the_daily_loader(tmp_path):
    import mlflow

    from piarec.data import layout
    from piarec.registry import client as registry

    cfg = load_config(environ={}, overrides={"storage": {"root": str(tmp_path)}})
    mlflow.set_tracking_uri(layout.tracking_uri(cfg.mlflow, cfg.storage))
    experiment = registry.ensure_experiment(cfg)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(FIXTURE / "pyfunc"), "model")
    mlflow.register_model(f"runs:/{run.info.run_id}/model", cfg.mlflow.registered_model)
    registry.set_alias(cfg, "champion", "1")

    bundle, ref = registry.load_model(cfg, "models:/piarec@champion")
    assert ref.version == "1" and bundle.n_items == 200
    reference = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}@champion")
    _assert_predictions(reference.predict(pd.DataFrame(EXPECTED["inputs"]), params={"k": EXPECTED["k"]}))


def test_checkpoint_of_0_1_0_resumes_to_the_weights_0_1_0_reached(tmp_path):
    from test_gate import planted

    from piarec.train.checkpoint import load_checkpoint
    from piarec.train.trainer import train

    ck = tmp_path / "checkpoint.pt"
    shutil.copy(FIXTURE / "checkpoint-epoch2.pt", ck)
    restored = load_checkpoint(str(ck), torch.device("cpu"))
    assert restored.epoch == 2 and len(restored.history) == 2

    cfg = load_config(environ={}, overrides=EXPECTED["config"])
    epochs = []
    result = train(cfg, planted(400), checkpoint_path=str(ck), on_epoch=lambda row: epochs.append(row["epoch"]))
    assert epochs == [1, 2, 3]  # two replayed from the checkpoint, one trained
    final = load_checkpoint(str(ck), torch.device("cpu"))
    assert final.epoch == 3
    assert _digest(final.model) == EXPECTED["final_weights_sha256"]
    assert result.best_epoch == EXPECTED["best_epoch"]
    assert _digest(result.model.state_dict()) == EXPECTED["best_weights_sha256"]
