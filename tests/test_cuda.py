"""The GPU paths against the CPU's: keyed noise, the hand-written sparse ops, a training
step in fp32 and bf16, scoring (fp32, and bf16 with its exact correction) and a whole
training run.

Skipped on a machine without a CUDA GPU (CI, the development machine). The device run
(``benchmarks/gpu_host.sh``) runs this file on the GPU host before it times anything.
``PIAREC_TEST_DEVICE=cpu`` runs the same checks with the CPU standing in for the GPU, which
checks the tests themselves where no GPU is present.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from piarec.config import ModelConfig, load_config
from piarec.data.csr import CSR
from piarec.models.bundle import ModelBundle
from piarec.models.contract import SparseBatch
from piarec.models.multivae import MultiVAE
from piarec.models.noise import KeyedNoise, hash32
from piarec.models.ops import multinomial_nll
from piarec.scoring.scorer import MIN_ROWS, TopKScorer

DEVICE = torch.device(os.environ.get("PIAREC_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """Full fp32 matrix products on the GPU (no TF32), so fp32 results compare with the CPU's."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rows(n_users: int, n_items: int, seed: int, low: int = 1, high: int = 30) -> CSR:
    rng = np.random.default_rng(seed)
    return CSR.from_lists([rng.choice(n_items, rng.integers(low, high), replace=False) for _ in range(n_users)],
                          n_items)


def test_keyed_noise_draws_the_same_numbers_on_the_device():
    users = torch.arange(1_000, 1_064, dtype=torch.int64) * 7919
    items = torch.randint(0, 4_000, (5_000,), generator=torch.Generator().manual_seed(0))
    row_of = torch.randint(0, 64, (5_000,), generator=torch.Generator().manual_seed(1))
    cpu, dev = KeyedNoise(12345, users), KeyedNoise(12345, users.to(DEVICE))
    assert torch.equal(hash32(7, users, items[:64]), hash32(7, users.to(DEVICE), items[:64].to(DEVICE)).cpu())
    # the masks: uniform draws from the top 24 bits, exact on any device
    assert torch.equal(cpu.entry_uniform(row_of, items), dev.entry_uniform(row_of.to(DEVICE), items.to(DEVICE)).cpu())
    # the reparameterisation noise: Box-Muller through log and cos, equal to float32 rounding
    torch.testing.assert_close(dev.normal(200).cpu(), cpu.normal(200), rtol=1e-5, atol=1e-5)


def test_the_multinomial_likelihood_gradient_is_exact_on_the_device():
    history = rows(6, 40, seed=0, high=10)
    batch = SparseBatch.from_csr(history, DEVICE)
    logits = torch.randn(6, 40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    x = torch.from_numpy(history.to_dense()).double().to(DEVICE)
    ref = torch.autograd.grad(-(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean(), logits)[0]
    got = torch.autograd.grad(multinomial_nll(logits, batch), logits)[0]
    torch.testing.assert_close(got, ref)
    assert torch.autograd.gradcheck(lambda t: multinomial_nll(t, batch), (logits,))


def test_the_sparse_encoder_on_the_device_equals_the_dense_normalised_input():
    torch.manual_seed(0)
    model = MultiVAE(300, ModelConfig(hidden_dim=64, latent_dim=16)).to(DEVICE)
    history = rows(50, 300, seed=1)
    x = torch.from_numpy(history.to_dense()).float().to(DEVICE)
    h = torch.tanh(F.normalize(x) @ model.item_in + model.bias_in)
    mu_ref, logvar_ref = model.to_stats(h).chunk(2, dim=1)
    mu, logvar = model.encode(SparseBatch.from_csr(history, DEVICE), keep_prob=1.0)
    torch.testing.assert_close(mu, mu_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, logvar_ref, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model: MultiVAE, history: CSR, device: torch.device, precision: str = "fp32"):
    """The training loss parts and gradients of one keyed batch (masks and noise keyed by user)."""
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    batch = SparseBatch.from_csr(history, device, users=np.arange(history.n_rows) * 3 + 11, stream=5)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        parts = model.loss(batch, 0.2, 0.5)
    parts.total.backward()
    values = [float(v.detach()) for v in (parts.total, parts.nll, parts.kl, parts.align)]
    return values, {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("encoder", ["shallow", "iaf"])
def test_a_training_step_on_the_device_equals_the_cpu_step(encoder):
    torch.manual_seed(0)
    model = MultiVAE(500, ModelConfig(hidden_dim=64, latent_dim=16, flow_hidden=32, encoder=encoder))
    history = rows(128, 500, seed=2)
    cpu_loss, cpu_grads = _loss_and_grads(model, history, torch.device("cpu"))
    dev_loss, dev_grads = _loss_and_grads(model, history, DEVICE)
    assert dev_loss == pytest.approx(cpu_loss, rel=1e-4, abs=1e-5)
    assert dev_grads.keys() == cpu_grads.keys() and "anchors" in dev_grads  # PIA's anchors learn too
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(dev_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)
    # bf16 autocast: the layers in bf16, the loss in fp32, close to the fp32 step
    bf16_loss, bf16_grads = _loss_and_grads(model, history, DEVICE, precision="bf16")
    assert bf16_loss[:2] == pytest.approx(cpu_loss[:2], rel=0.02)  # the loss and the likelihood
    assert bf16_loss[2] == pytest.approx(cpu_loss[2], rel=0.1)  # the KL (IAF: through bf16 flows)
    assert all(g.dtype == torch.float32 for g in bf16_grads.values())
    cos = F.cosine_similarity(bf16_grads["decoder.0.weight"].flatten(), cpu_grads["decoder.0.weight"].flatten(), dim=0)
    assert cos > 0.99


def _reference_top_k(model: MultiVAE, history: CSR, seen: CSR, k: int, exact64: bool) -> list[np.ndarray]:
    """Every user's top-k unseen items from one forward pass on the scorer's device (ties by
    item index); ``exact64``: the decoder in float64, rounded (what the bf16 path's correction
    computes)."""
    with torch.inference_mode():
        padded = history.take_rows(np.concatenate([np.arange(history.n_rows),
                                                   np.zeros(max(0, MIN_ROWS - history.n_rows), np.int64)]))
        mu, _ = model.encode(SparseBatch.from_csr(padded, DEVICE), keep_prob=1.0)
        layer = model.decoder[-1]
        if exact64:
            logits = (mu.double() @ layer.weight.double().T + layer.bias.double()).float()
        else:
            logits = model.logits(mu)
    full = logits.cpu().numpy()[: history.n_rows]
    out = []
    for u in range(history.n_rows):
        unseen = np.setdiff1d(np.arange(history.n_cols), seen.row(u))
        out.append(unseen[np.lexsort((unseen, -full[u, unseen]))][:k])
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_scorer_on_the_device_returns_the_exact_top_k(precision):
    torch.manual_seed(3)
    n_items, k = 4_000, 100
    model = MultiVAE(n_items, ModelConfig(hidden_dim=64, latent_dim=16)).eval()
    bundle = ModelBundle(model, np.array([f"t{i}" for i in range(n_items)], dtype=object),
                         np.random.default_rng(0).integers(0, 1000, n_items).astype(np.float32))
    history, seen = rows(300, n_items, seed=4), rows(300, n_items, seed=5, high=200)
    seen = CSR.from_lists([np.union1d(history.row(u), seen.row(u)) for u in range(300)], n_items)
    scorer = TopKScorer(bundle, k, 512, device=DEVICE, precision=precision)  # one batch: the reference's shapes
    assert scorer.precision == precision
    scored = scorer.score(history, seen)
    expected = _reference_top_k(scorer.model, history, seen, k, exact64=precision == "bf16")
    for u, items in enumerate(expected):
        np.testing.assert_array_equal(scored.item_idx[u], items, err_msg=f"user {u}")
    # the same recommendations as the CPU's up to float32 rounding of near ties
    on_cpu = TopKScorer(bundle, k, 128, precision="fp32").score(history, seen)
    agree = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(scored.item_idx, on_cpu.item_idx)])
    assert agree > 0.999
    np.testing.assert_allclose(scored.scores, on_cpu.scores, rtol=1e-4, atol=1e-4)


def test_training_on_the_device_learns_what_the_cpu_learns(planted_snapshot):
    from piarec.train.trainer import train

    def cfg(device: str, precision: str = "fp32"):
        return load_config(environ={}, overrides={
            "model": {"hidden_dim": 64, "latent_dim": 16},
            "training": {"epochs": 8, "batch_size": 100, "lr": 3e-3, "anneal_steps": 2000, "device": device,
                         "precision": precision, "noise": "keyed"},  # the same masks and noise on both devices
            "pia": {"lambda_a": 0.1},
        })

    cpu = train(cfg("cpu"), planted_snapshot)
    for precision in ("fp32", "bf16"):
        dev = train(cfg(DEVICE.type, precision), planted_snapshot)
        assert dev.best_metrics["ndcg_at_100"] == pytest.approx(cpu.best_metrics["ndcg_at_100"], abs=0.03), precision
        assert all(p.dtype == torch.float32 for p in dev.model.parameters())
