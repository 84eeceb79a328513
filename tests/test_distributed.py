"""Data-parallel training (piarec/train/distributed.py): two gloo processes started by
torchrun on this CPU against the reference, one process over the same global batches with
the same keyed noise (docs/training-scale.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from piarec.config import load_config
from piarec.errors import TrainingError
from piarec.models.contract import SparseBatch
from piarec.models.noise import KeyedNoise, stream_key
from piarec.data.csr import CSR
from piarec.train.checkpoint import load_checkpoint
from piarec.train.distributed import Ranks
from piarec.train.trainer import train

DRIVER = Path(__file__).with_name("distributed_driver.py")


def _overrides(**model):
    return {"model": {"hidden_dim": 48, "latent_dim": 12, **model},
            # batch 96 over 800 users: 9 global batches per pass, the last one short (32 users)
            "training": {"epochs": 2, "batch_size": 96, "lr": 3e-3, "anneal_steps": 500, "device": "cpu",
                         "noise": "keyed"},
            "pia": {"lambda_a": 0.5}, "diagnostics": {"enabled": False}}


def _torchrun(tmp_path, overrides, *extra, ranks=2):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
         str(DRIVER), "--overrides", json.dumps(overrides), "--out", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=300)
    return proc, [out.with_name(f"out.rank{r}") for r in range(ranks)]


def _assert_same_weights(got, want, atol=2e-5):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model", [{}, {"backbone": "recvae", "recvae_encoder_passes": 2}],
                         ids=["multivae", "recvae"])
def test_two_gloo_ranks_equal_one_process_over_the_same_global_batches(tmp_path, planted_snapshot, model):
    overrides = _overrides(**model)
    proc, files = _torchrun(tmp_path, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(f, weights_only=False) for f in files)
    reference = train(load_config(environ={}, overrides=overrides), planted_snapshot, ranks=Ranks())

    assert rank0["world"] == 2 and rank0["best_epoch"] == reference.best_epoch
    _assert_same_weights(rank0["best"], reference.model.state_dict())
    # one all-reduce per update keeps the ranks' weights identical without a broadcast
    for name, value in rank0["best"].items():
        assert torch.equal(value, rank1["best"][name]), name
    for got, want in zip(rank0["history"], reference.history, strict=True):
        for key in ("loss", "nll", "kl", "align", "val_ndcg_at_100", "step"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # leaving the group joined gloo's worker threads: one still running when Python shuts down
    # aborts the rank if it then drops a finished collective's tensors
    for f in files:
        assert "pt_gloo_runloop" not in json.loads(f.with_name(f.name + ".threads").read_text())


def test_a_killed_two_rank_run_resumes_from_its_checkpoint(tmp_path, planted_snapshot):
    overrides = {**_overrides(), "training": {**_overrides()["training"], "epochs": 3}}
    ck = tmp_path / "ck.pt"
    killed, _ = _torchrun(tmp_path, overrides, "--checkpoint", str(ck), "--crash-after-epoch", "2")
    assert killed.returncode != 0
    assert load_checkpoint(str(ck), torch.device("cpu")).epoch == 2

    resumed, files = _torchrun(tmp_path, overrides, "--checkpoint", str(ck))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rank0, rank1 = (torch.load(f, weights_only=False) for f in files)
    assert rank0["start_epoch"] == 2 and rank1["start_epoch"] == 2  # every rank restored epoch 2
    assert [row["epoch"] for row in rank0["history"]] == [1, 2, 3]
    straight = train(load_config(environ={}, overrides=overrides), planted_snapshot, ranks=Ranks())
    _assert_same_weights(rank0["best"], straight.model.state_dict())


def test_keyed_noise_follows_the_user_not_the_batch():
    rows = CSR.from_lists([[1, 4, 7, 9], [2, 3], [0, 5, 6, 8, 9]], 10)
    users = np.array([40, 7, 123])
    whole = SparseBatch.from_csr(rows, users=users, stream=stream_key(0, 3))
    alone = SparseBatch.from_csr(rows.take_rows([2, 0]), users=users[[2, 0]], stream=stream_key(0, 3))
    u_whole = whole.noise.entry_uniform(whole.row_ids(), whole.indices)
    u_alone = alone.noise.entry_uniform(alone.row_ids(), alone.indices)
    # user 123's mask draws and user 40's, wherever they sit in the batch
    assert torch.equal(u_alone[:5], u_whole[6:]) and torch.equal(u_alone[5:], u_whole[:4])
    assert torch.equal(alone.noise.normal(6)[0], whole.noise.normal(6)[2])
    # another pass or another seed draws afresh
    other = KeyedNoise(stream_key(0, 4), whole.noise.users)
    assert not torch.equal(other.normal(6), whole.noise.normal(6))
    assert stream_key(1, 3) != stream_key(0, 3)


def test_keyed_draws_are_uniform_and_standard_normal():
    noise = KeyedNoise(stream_key(7, 0), torch.arange(20_000))
    z = noise.normal(50)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1.0) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:, 0], z[:, 1]]))[0, 1].item()) < 0.03  # dimensions independent
    u = noise.entry_uniform(torch.arange(20_000).repeat_interleave(5), torch.arange(100_000) % 977)
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    assert abs((u < 0.5).float().mean().item() - 0.5) < 0.01
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert (counts / counts.sum() - 0.1).abs().max().item() < 0.01


def test_keyed_training_in_one_process_learns_like_the_generator(planted_snapshot):
    overrides = {**_overrides(), "training": {**_overrides()["training"], "epochs": 12}}
    keyed = train(load_config(environ={}, overrides=overrides), planted_snapshot)
    overrides["training"]["noise"] = "generator"
    generator = train(load_config(environ={}, overrides=overrides), planted_snapshot)
    # different draws, the same learning: both recover the planted groups alike
    assert keyed.best_metrics["ndcg_at_100"] == pytest.approx(generator.best_metrics["ndcg_at_100"], abs=0.05)
    assert keyed.best_metrics["ndcg_at_100"] > 0.3


def test_several_processes_refuse_what_they_cannot_reproduce(planted_snapshot):
    cfg = load_config(environ={}, overrides={**_overrides(), "training": {**_overrides()["training"],
                                                                        "noise": "generator"}})
    with pytest.raises(TrainingError, match="generator' cannot train on several processes"):
        train(cfg, planted_snapshot, ranks=Ranks(0, 2))
    nc = load_config(environ={}, overrides={**_overrides(), "model": {"regularizers": {"noise_contrastive": True}}})
    with pytest.raises(TrainingError, match="noise-contrastive"):
        train(nc, planted_snapshot, ranks=Ranks())


def test_piarec_train_on_two_processes_registers_the_one_process_model(tmp_path):
    """`piarec train --nproc-per-node 2`: torchrun, two gloo ranks, rank 0 alone in MLflow."""
    import yaml

    from piarec.data.snapshot import load_snapshot
    from piarec.registry import client as registry
    from test_gate import planted, write_snapshot

    uri = write_snapshot(planted(800), tmp_path / "snapshots" / "window_end=2026-04-01")
    overrides = {**_overrides(), "storage": {"root": str(tmp_path)}, "gate": {"min_active_units": 3}}
    overrides["training"] = {**overrides["training"], "epochs": 3, "noise": "auto"}
    config = tmp_path / "piarec.yaml"
    config.write_text(yaml.safe_dump(overrides))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAREC")}
    proc = subprocess.run([sys.executable, "-m", "piarec", "--config", str(config), "train", "--snapshot", uri,
                           "--nproc-per-node", "2"], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # printed once, by rank 0
    assert summary["stop_reason"] == "epochs"

    cfg = load_config(str(config), environ={})
    client = registry.client(cfg)
    run = client.get_run(summary["run_id"])
    assert run.data.params["processes"] == "2" and run.data.tags["stop_reason"] == "epochs"
    assert len(client.search_model_versions(f"name='{cfg.mlflow.registered_model}'")) == 1
    bundle, _ = registry.load_model(cfg, f"models:/{cfg.mlflow.registered_model}/{summary['version']}")
    reference = train(load_config(str(config), environ={}, overrides={"training": {"noise": "keyed"}}),
                      load_snapshot(uri), ranks=Ranks())
    _assert_same_weights(bundle.model.state_dict(), reference.model.state_dict())


def test_a_rank_leaves_the_process_group_even_when_its_training_fails(tmp_path, monkeypatch):
    """`run_training` on a rank other than 0: the process group is destroyed on the way out, also
    when training raises, so no rank exits with gloo's threads still running (they can abort it)."""
    import torch.distributed as dist

    from piarec.train.job import run_training
    from test_gate import planted, write_snapshot

    uri = write_snapshot(planted(200), tmp_path / "snapshots" / "window_end=2026-04-01")
    cfg = load_config(environ={}, overrides={**_overrides(regularizers={"noise_contrastive": True}),
                                             "storage": {"root": str(tmp_path)}})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(TrainingError, match="noise-contrastive"):
            run_training(cfg, uri)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_rank_takes_its_shard_as_loaded_and_refuses_another_ranks(planted_snapshot):
    import dataclasses

    from piarec.data.snapshot import TrainShard
    from piarec.train.trainer import TrainRows

    n = planted_snapshot.train.n_rows
    shard = TrainShard(1, 2, n, planted_snapshot.train.nnz, np.zeros(planted_snapshot.n_items, np.int64))
    mine = dataclasses.replace(planted_snapshot, train=planted_snapshot.train.take_rows(np.arange(1, n, 2)), shard=shard)
    rows = TrainRows.of(mine, Ranks(rank=1, world=2), keyed=True)
    sliced = TrainRows.of(planted_snapshot, Ranks(rank=1, world=2), keyed=True)
    assert rows.n_users == sliced.n_users == n
    assert rows.csr.indices.tolist() == sliced.csr.indices.tolist()
    with pytest.raises(TrainingError, match="holds shard 1 of 2, but this process is rank 0 of 2"):
        TrainRows.of(mine, Ranks(rank=0, world=2), keyed=True)
