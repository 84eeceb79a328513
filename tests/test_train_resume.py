"""`piarec train` killed mid-run resumes from its checkpoint; NaN keeps the last good one.

Real processes: the CLI is started as a subprocess on a published snapshot with a sqlite
MLflow store, SIGKILLed after its first checkpoint, and run again. The registered weights
must equal those of an uninterrupted run (bit for bit, on CPU with one thread).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from piarec.registry import client as registry
from piarec.config import load_config
from piarec.errors import TrainingError
from piarec.models.multivae import MultiVAE
from piarec.train.job import checkpoint_dir, run_training
from test_gate import planted, write_snapshot

pytestmark = pytest.mark.filterwarnings("ignore")
EPOCHS = 12


def _snapshot(root: Path) -> str:
    return write_snapshot(planted(3000), root / "snapshots" / "window_end=2026-04-01")


def _config(root: Path) -> tuple[Path, object]:
    overrides = {
        "storage": {"root": str(root)},
        "model": {"hidden_dim": 64, "latent_dim": 16},
        "training": {"epochs": EPOCHS, "batch_size": 100, "lr": 3e-3, "anneal_steps": 2000, "device": "cpu"},
        "gate": {"min_active_units": 3},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "piarec.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return path, load_config(str(path), environ={})


def _train_cli(config: Path, snapshot: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the same kernels in every run
    return subprocess.Popen([sys.executable, "-m", "piarec", "--config", str(config), "train", "--snapshot", snapshot],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(cfg, version: str) -> dict[str, torch.Tensor]:
    bundle, _ = registry.load_model(cfg, f"models:/{cfg.mlflow.registered_model}/{version}")
    return bundle.model.state_dict()


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    # Uninterrupted reference run.
    ref_root = tmp_path / "reference"
    ref_config, ref_cfg = _config(ref_root)
    ref = _train_cli(ref_config, _snapshot(ref_root))
    assert ref.wait(timeout=600) == 0, ref.stderr.read()

    root = tmp_path / "interrupted"
    config, cfg = _config(root)
    snapshot = _snapshot(root)
    checkpoints = root / "checkpoints"
    first = _train_cli(config, snapshot)
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("*/checkpoint.pt")):
        assert first.poll() is None, f"training ended before its first checkpoint: {first.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    ck_file = next(checkpoints.glob("*/checkpoint.pt"))
    state = torch.load(io.BytesIO(ck_file.read_bytes()), weights_only=True)
    assert 1 <= state["epoch"] < EPOCHS  # really interrupted mid-run
    client = registry.client(cfg)
    assert not client.search_model_versions(f"name='{cfg.mlflow.registered_model}'")  # nothing registered

    second = _train_cli(config, snapshot)
    assert second.wait(timeout=600) == 0, second.stderr.read()

    assert _weights(cfg, "1").keys() == _weights(ref_cfg, "1").keys()
    for (name, a), (_, b) in zip(_weights(cfg, "1").items(), _weights(ref_cfg, "1").items()):
        assert torch.equal(a, b), name
    # The killed attempt's MLflow run is closed as FAILED; the new run says where it resumed.
    client = registry.client(cfg)  # binds mlflow to this run's store again
    runs = {r.info.run_id: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    resumed = [r for r in runs.values() if "resumed_from_run" in r.data.tags]
    assert len(resumed) == 1 and runs[resumed[0].data.tags["resumed_from_run"]].info.status == "FAILED"
    # Every epoch is in the resumed run's metric history, the restored ones included.
    steps = [m.step for m in client.get_metric_history(resumed[0].info.run_id, "val_ndcg_at_100")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    assert not ck_file.parent.exists()  # registered: the checkpoint is gone


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    root = tmp_path / "nan"
    config, cfg = _config(root)
    snapshot = _snapshot(root)
    real_loss = MultiVAE.loss
    poison_from = 3 * 30  # updates: the planted snapshot has 30 batches per epoch

    def loss(self, batch, beta, lambda_a, phase=None, step=0):
        parts = real_loss(self, batch, beta, lambda_a, phase, step=step)
        if step >= poison_from:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(MultiVAE, "loss", loss)
    from piarec.cli import main

    rc = main(["--config", str(config), "train", "--snapshot", snapshot])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "Traceback" not in stderr
    assert "loss became nan" in err[0] and "last good checkpoint is kept at" in err[0]
    ck_file = next((root / "checkpoints").glob("*/checkpoint.pt"))
    assert str(ck_file) in err[0]
    state = torch.load(io.BytesIO(ck_file.read_bytes()), weights_only=True)
    assert state["epoch"] == 3  # epochs 1-3 completed before the poisoned update
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not registry.client(cfg).search_model_versions(f"name='{cfg.mlflow.registered_model}'")

    # Fixed (the poison removed), the same command resumes from epoch 4 and registers.
    monkeypatch.setattr(MultiVAE, "loss", real_loss)
    out = run_training(cfg, snapshot)
    assert out["version"] == "1" and len(out["val"]) == 2
    assert not Path(checkpoint_dir(cfg, "x")).exists() and not ck_file.exists()


def test_training_error_without_any_checkpoint_says_so(tmp_path, monkeypatch):
    root = tmp_path / "early"
    _, cfg = _config(root)
    snapshot = _snapshot(root)
    monkeypatch.setattr(MultiVAE, "loss", lambda *a, **k: (_ for _ in ()).throw(TrainingError("loss became inf")))
    with pytest.raises(TrainingError, match="no epoch completed"):
        run_training(cfg, snapshot)


def test_beta_search_logs_its_search_and_its_pick(tmp_path):
    root = tmp_path / "beta"
    _, cfg = _config(root)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={
        "epochs": 4, "anneal_epochs": 8, "beta_search": True, "early_stop_patience": None})})
    out = run_training(cfg, _snapshot(root))
    client = registry.client(cfg)
    run = client.get_run(out["run_id"])
    picked = float(run.data.params["beta_search_picked_beta"])
    epoch = int(run.data.params["beta_search_best_epoch"])
    searched = client.get_metric_history(out["run_id"], "beta_search_val_ndcg_at_100")
    betas = {m.step: m.value for m in client.get_metric_history(out["run_id"], "beta_search_beta")}
    assert sorted(m.step for m in searched) == [1, 2, 3, 4] and sorted(betas) == [1, 2, 3, 4]
    assert max(searched, key=lambda m: (m.value, -m.step)).step == epoch and betas[epoch] == pytest.approx(picked)
    assert betas[4] == pytest.approx(0.5)  # towards 1, reached after anneal_epochs = 8
    final = client.get_metric_history(out["run_id"], "beta")
    assert max(m.value for m in final) == pytest.approx(min(picked, 0.5))  # the retrain is capped at the pick
    assert out["version"] == "1"
