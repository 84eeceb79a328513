"""The registered version as an MLflow pyfunc model defined from code.

Loads ``models:/piarec@champion`` with ``mlflow.pyfunc.load_model`` (as a person would in a
notebook) and checks its recommendations against the scorer on the same bundle, the
planted structure, the seen-title rule, the ``model_version`` label, the signature, the
input example, the code and requirements the model carries and the absence of pickles.
(tests/test_model_env.py loads it in a virtualenv holding only those requirements.)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

import piarec
from piarec.daily.arms import plan_models
from piarec.registry import client as registry
from piarec.scoring.scorer import TopKScorer
from piarec.scoring.arrow import map_histories
from piarec.train.job import pyfunc_requirements
from test_gate import train_planted

COLUMNS = ["user_id", "item_ids", "scores", "source", "model_version"]

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    cfg, snap, _, out = train_planted(tmp_path_factory.mktemp("pyfunc"))
    registry.set_alias(cfg, "champion", out["version"])
    return cfg, snap, out


def _histories(snap, n=16):
    fold = snap.val.fold_in
    return [[str(snap.item_ids[i]) for i in fold.row(u)] for u in range(n)]


def test_champion_loads_from_the_registry_and_recommends(champion):
    cfg, snap, out = champion
    registry.client(cfg)  # points mlflow at the store, as a notebook would with set_tracking_uri
    model = mlflow.pyfunc.load_model("models:/piarec@champion")
    histories = _histories(snap)
    seen_extra = [[h[0]] + ["not-a-title"] for h in histories]
    frame = pd.DataFrame({"user_id": [f"v{u}" for u in range(len(histories))], "history": histories,
                          "seen": seen_extra})
    recs = model.predict(frame, params={"k": 20})

    assert list(recs.columns) == COLUMNS
    assert list(recs.user_id) == list(frame.user_id)
    assert (recs.item_ids.map(len) == 20).all() and (recs.source == "model").all()
    assert (recs.model_version == out["version"]).all()  # the version the alias points at
    for history, items, scores in zip(histories, recs.item_ids, recs.scores):
        assert not set(history) & set(items)  # history titles count as seen
        assert np.all(np.diff(np.asarray(scores)) <= 0)

    # Exactly what the scorer gives on the same bundle (one scoring implementation).
    bundle, _ = registry.load_model(cfg, "models:/piarec@champion")
    index = bundle.item_index()
    hist, _ = map_histories(histories, index, bundle.n_items)
    seen, _ = map_histories([h + s for h, s in zip(histories, seen_extra)], index, bundle.n_items)
    expected = TopKScorer(bundle, 20).score(hist, seen)
    got = np.array([[index[i] for i in items] for items in recs.item_ids])
    np.testing.assert_array_equal(got, expected.item_idx)

    # The planted answer: a user's block has 25 titles, 6 of them seen, so a top-20 that
    # learned the blocks holds the user's 2 held-out titles.
    held = snap.val.held_out
    hits = [len({str(snap.item_ids[i]) for i in held.row(u)} & set(recs.item_ids[u])) / len(held.row(u))
            for u in range(len(histories))]
    assert np.mean(hits) >= 0.8


def test_unknown_history_gets_popularity_and_default_k(champion):
    cfg, _, _ = champion
    registry.client(cfg)
    model = mlflow.pyfunc.load_model("models:/piarec@champion")
    recs = model.predict(pd.DataFrame({"history": [["nobody-knows-this"], []]}))
    assert list(recs.source) == ["popularity", "popularity"]
    assert list(recs.user_id) == ["0", "1"]
    # k defaults to the signature's default: scoring.k of the training config.
    assert (recs.item_ids.map(len) == cfg.scoring.k).all()


def test_model_version_is_the_version_the_uri_resolves_to(champion):
    cfg, snap, out = champion
    c = registry.client(cfg)
    frame = pd.DataFrame({"history": _histories(snap, 2)})
    # The same logged model registered a second time: each URI labels rows with its own version.
    model_id = mlflow.models.get_model_info("models:/piarec@champion").model_id
    again = registry.register_version(cfg, out["run_id"], model_id=model_id)
    assert again != out["version"]
    for uri, version in ((f"models:/piarec/{again}", again), ("models:/piarec@champion", out["version"]),
                         (f"models:/piarec/{out['version']}", out["version"])):
        assert set(mlflow.pyfunc.load_model(uri).predict(frame).model_version) == {version}, uri
    # An explicit label (model_config) wins.
    pinned = mlflow.pyfunc.load_model("models:/piarec@champion", model_config={"model_version": "given"})
    assert set(pinned.predict(frame).model_version) == {"given"}
    # Not loaded as a registered version (the logged model's own URI): the label the daily job
    # writes for the same bundle when it is given as a folder, local-<digest of its files>.
    unregistered = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(frame).model_version
    mv = c.get_model_version("piarec", out["version"])
    folder = registry.bundle_dir(mlflow.artifacts.download_artifacts(artifact_uri=mv.source))
    daily = plan_models(cfg, folder).arms[0].version
    assert daily.startswith("local-") and set(unregistered) == {daily}


def test_input_example_is_valid_and_predicts(champion):
    cfg, snap, out = champion
    registry.client(cfg)
    info = mlflow.models.get_model_info("models:/piarec@champion")
    model = mlflow.pyfunc.load_model("models:/piarec@champion")
    example = model.input_example
    assert list(example.columns) == ["user_id", "history", "seen"]
    titles = set(map(str, snap.item_ids))
    assert all(h and set(h) <= titles for h in example.history)  # made of the model's own titles
    mlflow.models.validate_schema(example, info.signature.inputs)
    local = Path(mlflow.artifacts.download_artifacts("models:/piarec@champion"))
    params = mlflow.models.Model.load(local).load_input_example_params(str(local))
    assert params == {"k": 10}
    recs = model.predict(example, params=params)
    assert list(recs.columns) == COLUMNS and list(recs.user_id) == list(example.user_id)
    assert (recs.item_ids.map(len) == 10).all() and (recs.model_version == out["version"]).all()
    for history, seen, items in zip(example.history, example.seen, recs.item_ids):
        assert not set(items) & (set(history) | set(seen))
    # The serving form of the same example (what `mlflow models serve` documents).
    assert "dataframe_split" in json.loads((local / "serving_input_example.json").read_text())


def test_model_carries_its_code_and_declares_its_requirements(champion):
    cfg, _, out = champion
    c = registry.client(cfg)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=c.get_model_version("piarec", out["version"]).source))
    for module in ("__init__.py", "models/bundle.py", "scoring/scorer.py", "scoring/arrow.py", "config/schema.py"):
        assert (local / "code" / "piarec" / module).is_file(), module
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == pyfunc_requirements()
    assert not [r for r in requirements if r.lower().startswith("piarec")]
    assert mlflow.models.Model.load(local).metadata["piarec_version"] == piarec.__version__


def test_version_carries_signature_description_tags_and_no_pickle(champion):
    cfg, _, out = champion
    c = registry.client(cfg)
    mv = c.get_model_version("piarec", out["version"])
    assert "trained on window [2026-01-01, 2026-04-01)" in mv.description
    assert {"window_start", "window_end", "snapshot_manifest_sha256", "val_ndcg_at_100",
            "val_recall_at_20", "snapshot_uri"} <= set(mv.tags)
    assert len(mv.tags["snapshot_manifest_sha256"]) == 64
    info = mlflow.models.get_model_info("models:/piarec@champion")
    assert info.signature is not None
    assert [s.name for s in info.signature.inputs.inputs] == ["user_id", "history", "seen"]
    assert [s.name for s in info.signature.outputs.inputs] == COLUMNS
    assert info.signature.params.params[0].name == "k"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source))
    assert not list(local.rglob("*.pkl")), "models-from-code: nothing is pickled"
    assert (local / "artifacts" / "bundle" / "weights.pt").is_file()
    # The training run: per-epoch metrics, the evaluation report and the validation curve.
    run = c.get_run(out["run_id"])
    assert len(c.get_metric_history(run.info.run_id, "val_ndcg_at_100")) == cfg.training.epochs
    names = {a.path for a in c.list_artifacts(run.info.run_id)} | {
        a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {"evaluation.json", "history.json", "plots/validation_curve.png"} <= names
