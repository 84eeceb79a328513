"""A registered model runs where only what it declares is installed.

A real MLflow tracking server on 127.0.0.1 (SQLite store, artifacts proxied to a folder);
``run_training`` logs and registers the planted model there. A fresh virtualenv gets
``torch==2.13.0`` (the CPU wheel on this machine) and then exactly the model's own
``requirements.txt``, read from the registry. In it, a script loads ``models:/piarec@champion``
and ``models:/piarec/2`` from the server and predicts, and ``mlflow models serve`` answers the
model's serving input example. The recommendations must be the project's scorer's on the same
bundle, ``model_version`` the registered version each URI resolves to, and ``piarec`` importable
there only from the code the model carries.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from piarec.config import load_config
from piarec.registry import client as registry
from piarec.scoring.arrow import map_histories
from piarec.scoring.scorer import TopKScorer
from piarec.train.job import PYFUNC_DISTRIBUTIONS, run_training
from test_gate import planted, write_snapshot

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

HOST = "127.0.0.1"
# Installed before the model's requirements: pip takes the CPU wheel on this machine's disk, and
# the model's torch==2.13.0 is then satisfied (an unpinned torch downloads gigabytes of CUDA).
TORCH = "torch==2.13.0"
K = 20

PREDICT = r"""
import json, sys

import torch

torch.set_num_threads(1)  # as the test process scores (tests/conftest.py)
import mlflow
import pandas as pd

request = json.load(open(sys.argv[1]))
frame = pd.DataFrame(request["frame"])
out = {}
for uri in request["uris"]:
    recs = mlflow.pyfunc.load_model(uri).predict(frame, params={"k": request["k"]})
    out[uri] = {"columns": list(recs.columns), "user_id": recs["user_id"].tolist(),
                "item_ids": [list(map(str, x)) for x in recs["item_ids"]],
                "scores": [list(map(float, x)) for x in recs["scores"]],
                "source": recs["source"].tolist(), "model_version": recs["model_version"].tolist()}
import piarec

json.dump({"models": out, "piarec": piarec.__file__}, open(sys.argv[2], "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started here in its own session, with the workers it forked."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would lead a child Python to the project."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free port of 127.0.0.1: its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port, log = _free_port(), root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", HOST, "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=root, env=_clean_env(), start_new_session=True)
    try:
        url = f"http://{HOST}:{port}"
        _wait_http(f"{url}/health", proc, log, timeout=180)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def registered(server, tmp_path_factory):
    """The planted model trained and registered on the server as version 1, the same logged
    model registered again as version 2, ``champion`` -> 1: ``(cfg, snap)``."""
    root = tmp_path_factory.mktemp("model-env")
    snap = planted()
    uri = write_snapshot(snap, root / "snapshots" / "window_end=2026-04-01")
    cfg = load_config(environ={}, overrides={
        "storage": {"root": str(root)},
        "mlflow": {"tracking_uri": server, "artifact_location": "mlflow-artifacts:/piarec"},
        "model": {"hidden_dim": 64, "latent_dim": 16},
        "training": {"epochs": 3, "batch_size": 100, "lr": 3e-3, "anneal_steps": 2000, "device": "cpu"},
        "scoring": {"k": K},
    })
    out = run_training(cfg, uri)
    assert out["version"] == "1"
    model_id = mlflow.models.get_model_info("models:/piarec/1").model_id
    assert registry.register_version(cfg, out["run_id"], model_id=model_id) == "2"
    registry.set_alias(cfg, "champion", "1")  # not the latest version: the label must follow the alias
    return cfg, snap


@pytest.fixture(scope="module")
def venv(registered, tmp_path_factory):
    """A fresh virtualenv with torch and the champion's own requirements.txt, nothing else:
    ``(python, the requirements installed)``."""
    cfg, _ = registered
    root = tmp_path_factory.mktemp("fresh-venv")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, cwd=root, env=_clean_env())
    python = root / "venv" / "bin" / "python"
    registry.client(cfg)
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/piarec@champion"))
    for args in ([TORCH], ["-r", str(requirements)]):  # torch first (see TORCH)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], cwd=root,
                              env=_clean_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    return python, requirements.read_text().split()


def _frame(snap, n=16):
    """Validation users' histories (their fold-in titles) and an extra seen title each."""
    fold = snap.val.fold_in
    history = [[str(snap.item_ids[i]) for i in fold.row(u)] for u in range(n)]
    return {"user_id": [f"v{u}" for u in range(n)], "history": history, "seen": [[h[0], "not-a-title"] for h in history]}


def test_the_model_declares_exactly_its_runtime_packages(venv, tmp_path):
    import torch

    python, requirements = venv
    names = [r.split("==")[0] for r in requirements]
    assert names == list(PYFUNC_DISTRIBUTIONS) and all("==" in r for r in requirements)
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert not any(r.lower().startswith(("piarec", "mlflow==")) for r in requirements)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], cwd=tmp_path,
                            env=_clean_env(), capture_output=True, text=True, check=True).stdout
    installed = {d["name"].lower() for d in json.loads(listed)}
    assert not installed & {"piarec", "mlflow", "pyspark", "scikit-learn", "matplotlib", "boto3", "scipy"}


def test_piarec_is_not_installed_in_the_fresh_venv(venv, tmp_path):
    python, _ = venv
    done = subprocess.run([str(python), "-c", "import piarec"], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True)
    assert done.returncode != 0 and "No module named 'piarec'" in done.stderr


def test_registered_model_predicts_in_its_own_environment(server, registered, venv, tmp_path):
    cfg, snap = registered
    python, _ = venv
    frame = _frame(snap)
    uris = ["models:/piarec@champion", "models:/piarec/2"]
    (tmp_path / "predict.py").write_text(PREDICT)
    (tmp_path / "request.json").write_text(json.dumps({"uris": uris, "frame": frame, "k": K}))
    done = subprocess.run([str(python), "predict.py", "request.json", "out.json"], cwd=tmp_path,
                          env=_clean_env(MLFLOW_TRACKING_URI=server), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())

    # piarec came from the model: the code/ folder MLflow downloaded with it.
    assert Path(got["piarec"]).parts[-3:] == ("code", "piarec", "__init__.py")

    # The project's scorer on the same bundle, in this process.
    bundle, ref = registry.load_model(cfg, "models:/piarec@champion")
    index = bundle.item_index()
    hist, _ = map_histories(frame["history"], index, bundle.n_items)
    seen, _ = map_histories([h + s for h, s in zip(frame["history"], frame["seen"])], index, bundle.n_items)
    expected = TopKScorer(bundle, K).score(hist, seen)
    want_items = [[str(bundle.item_ids[i]) for i in row] for row in expected.item_idx]

    for uri, version in zip(uris, ["1", "2"]):
        recs = got["models"][uri]
        assert recs["columns"] == ["user_id", "item_ids", "scores", "source", "model_version"]
        assert recs["user_id"] == frame["user_id"]
        assert recs["item_ids"] == want_items
        np.testing.assert_allclose(np.array(recs["scores"]), expected.scores.astype(np.float64), rtol=1e-6)
        assert recs["source"] == ["model"] * len(want_items)
        assert recs["model_version"] == [version] * len(want_items), uri


def test_mlflow_models_serve_answers_the_serving_example(server, registered, venv, tmp_path):
    """``mlflow models serve`` from the fresh venv (no environment rebuilt: it is that venv)
    answers the request the model logged as its serving input example."""
    cfg, snap = registered
    python, _ = venv
    registry.client(cfg)
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/piarec@champion", dst_path=str(tmp_path)))
    example = (model_dir / "serving_input_example.json").read_text()
    port, log = _free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(python.with_name("mlflow")), "models", "serve", "-m", "models:/piarec@champion",
             "--env-manager", "local", "--host", HOST, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            # the venv activated: the server runs the `uvicorn` found on PATH
            env=_clean_env(MLFLOW_TRACKING_URI=server, PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}"))
    try:
        _wait_http(f"http://{HOST}:{port}/ping", proc, log, timeout=180)
        request = urllib.request.Request(f"http://{HOST}:{port}/invocations", data=example.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            predictions = json.loads(resp.read())["predictions"]
    finally:
        _stop(proc)

    body = json.loads(example)
    rows = body["dataframe_split"]["data"]
    assert [p["user_id"] for p in predictions] == [r[0] for r in rows]
    k = body["params"]["k"]
    for (_, history, seen), p in zip(rows, predictions):
        assert history and set(history) <= set(map(str, snap.item_ids))  # the model's own titles
        assert len(p["item_ids"]) == k and not set(p["item_ids"]) & set(history + seen)
        assert p["source"] == "model" and p["model_version"] == "1"
