"""The optional collapse regularizers: exactly off when disabled, gradients when on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from piarec.config import ModelConfig, RegularizerConfig
from piarec.models.contract import SparseBatch
from piarec.models.factory import build_model
from piarec.models.multivae import MultiVAE
from piarec.models.ops import alignment_closed_form, gaussian_kl, gaussian_kl_wide, multinomial_nll, sample_from_decoder, swap_items, warmup_weight
from piarec.data.csr import CSR

N_ITEMS = 30
ROWS = [[0, 3, 5, 9], [1, 2], [2, 4, 6, 7, 20], [11, 12, 13]]


def _batch() -> SparseBatch:
    return SparseBatch.from_csr(CSR.from_lists(ROWS, N_ITEMS))


def _model(seed: int = 0, encoder: str = "shallow", **reg) -> MultiVAE:
    torch.manual_seed(seed)
    return build_model(N_ITEMS, ModelConfig(hidden_dim=12, latent_dim=4, encoder=encoder, flow_hidden=8,
                                            regularizers=RegularizerConfig(**reg)))


def _loss_and_grads(model, seed: int, step: int = 0, beta: float = 0.2, lambda_a: float = 0.1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    parts = model.loss(_batch(), beta, lambda_a, step=step)
    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads, torch.get_rng_state()


# --------------------------------------------------------------------------- exactly off
@pytest.mark.parametrize("encoder", ["shallow", "iaf"])
def test_switched_off_regularizers_change_nothing(encoder):
    """Switches off (whatever the weights say): the same loss, gradients and RNG draws, bit
    for bit, as a default model."""
    plain = _model(encoder=encoder)
    off = _model(encoder=encoder, latent_recon=False, noise_contrastive=False, latent_recon_weight=5.0,
                 nc_weight=3.0, nc_noise="decoder")
    p1, g1, rng1 = _loss_and_grads(plain, seed=4, step=50)
    p2, g2, rng2 = _loss_and_grads(off, seed=4, step=50)
    for name in ("total", "nll", "kl", "align"):
        assert torch.equal(getattr(p1, name), getattr(p2, name)), name
    assert p2.latent_recon.item() == 0.0 and p2.noise_contrastive.item() == 0.0
    assert g1.keys() == g2.keys()
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert torch.equal(rng1, rng2)


def test_switched_off_loss_is_the_eq8_loss_bit_for_bit():
    """Against the loss written out by hand: NLL + beta KL + lambda_A alignment, one draw."""
    m = _model()
    torch.manual_seed(9)
    parts = m.loss(_batch(), 0.3, 0.2, step=7)
    torch.manual_seed(9)
    mu, logvar, _ = m.encode_base(_batch(), m.config.keep_prob)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    nll = multinomial_nll(m.logits(z), _batch())
    kl = gaussian_kl(mu, logvar).mean()
    align = alignment_closed_form(mu, logvar, m.anchors, _batch()).mean()
    assert torch.equal(parts.total, nll + 0.3 * kl + 0.2 * align)


# --------------------------------------------------------------------------- switched on
def test_latent_reconstruction_adds_its_warmed_up_weight_times_its_value():
    m = _model(latent_recon=True, latent_recon_weight=2.0, latent_recon_warmup=100)
    base = _model()
    for step, weight in ((0, 0.0), (25, 0.5), (50, 1.0), (100, 2.0), (400, 2.0)):
        torch.manual_seed(1)
        on = m.loss(_batch(), 0.2, 0.1, step=step)
        torch.manual_seed(1)
        off = base.loss(_batch(), 0.2, 0.1, step=step)
        assert on.latent_recon.item() > 0
        assert on.total.item() == pytest.approx(off.total.item() + weight * on.latent_recon.item(), rel=1e-6)


def test_warmup_weight_is_linear_in_step():
    steps = np.arange(0, 101)
    w = np.array([warmup_weight(int(s), 3.0, 100) for s in steps])
    np.testing.assert_allclose(w, 3.0 * steps / 100, rtol=1e-12)
    assert warmup_weight(150, 3.0, 100) == 3.0
    assert warmup_weight(0, 3.0, 0) == 3.0  # no warm-up: the final weight from the start


def _term_grads(model, term: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    getattr(model.loss(_batch(), 0.2, 0.1, step=10_000), term).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_latent_reconstruction_gradient_reaches_encoder_and_decoder():
    grads = _term_grads(_model(latent_recon=True), "latent_recon")
    assert {"item_in", "to_stats.weight", "decoder.0.weight"} <= grads.keys()


def test_latent_reconstruction_is_the_papers_loss_with_nothing_detached():
    """||E_mu(D(z)) - z||^2 differentiated in z as a whole (gradcheck in float64): a detached
    target or a detached D(z) would give another gradient."""
    from piarec.models.multivae import latent_reconstruction

    m = _model(latent_recon=True).double()
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: latent_reconstruction(m, v, m.logits(v)), (z,))
    latent_reconstruction(m, z, m.logits(z)).backward()
    target_only = torch.autograd.grad(latent_reconstruction(m, z, m.logits(z.detach())), z)[0]
    assert not torch.allclose(z.grad, target_only)  # the path through D(z) counts too


def test_decoder_noise_is_drawn_from_the_prior_not_the_users_posterior():
    """NC-VAE's E_{p(z)}[p(x|z)]: the contrastive histories depend on the row lengths and the
    random draws only, not on what the users of the batch watched."""
    m = _model(noise_contrastive=True, nc_noise="decoder")
    other = SparseBatch.from_csr(CSR.from_lists([[20, 21, 22, 23], [28, 29], [0, 1, 2, 3, 4], [7, 8, 9]], N_ITEMS))
    seen = {}

    def spy(logits, lengths):
        seen.setdefault("logits", []).append(logits.clone())
        return sample_from_decoder(logits, lengths)

    import piarec.models.multivae as mv

    real = mv.sample_from_decoder
    mv.sample_from_decoder = spy
    try:
        for batch in (_batch(), other):
            torch.manual_seed(3)
            m.noise_contrastive(batch, m.config.regularizers)
    finally:
        mv.sample_from_decoder = real
    a, b = seen["logits"]
    assert torch.equal(a, b)  # the same prior draws give the same decoder, whatever the batch
    torch.manual_seed(3)
    assert torch.equal(a, m.logits(torch.randn(4, 4)))


@pytest.mark.parametrize("noise", ["swap", "decoder"])
def test_noise_contrastive_gradient_reaches_the_encoder(noise):
    grads = _term_grads(_model(noise_contrastive=True, nc_noise=noise), "noise_contrastive")
    assert {"item_in", "to_stats.weight"} <= grads.keys()


def test_noise_contrastive_adds_delta_times_the_wide_prior_kl():
    m = _model(noise_contrastive=True, nc_weight=0.7, nc_prior_scale=3.0)
    torch.manual_seed(5)
    on = m.loss(_batch(), 0.2, 0.1)
    assert on.noise_contrastive.item() > 0
    assert on.total.item() == pytest.approx((on.nll + 0.2 * on.kl + 0.1 * on.align).item()
                                            + 0.7 * on.noise_contrastive.item(), rel=1e-6)


def test_wide_prior_kl_closed_form():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(gaussian_kl_wide(mu, logvar, 1.0), gaussian_kl(mu, logvar))
    k = 4.0
    at_prior = gaussian_kl_wide(torch.zeros(2, 3), torch.full((2, 3), 2 * np.log(k)), k)
    torch.testing.assert_close(at_prior, torch.zeros(2))


def test_contrastive_inputs_keep_row_lengths():
    b = _batch()
    torch.manual_seed(0)
    assert torch.equal(swap_items(b, N_ITEMS, 1e-9).indices, b.indices)
    swapped = swap_items(b, N_ITEMS, 1.0)
    assert not torch.equal(swapped.indices, b.indices) and torch.equal(swapped.lengths, b.lengths)
    sampled = sample_from_decoder(torch.randn(b.size, N_ITEMS), b.lengths)
    assert torch.equal(sampled.lengths, b.lengths) and torch.equal(sampled.offsets, b.offsets)
    for u in range(b.size):
        items = sampled.indices[sampled.offsets[u]: sampled.offsets[u] + sampled.lengths[u]]
        assert len(set(items.tolist())) == len(items)  # without replacement


def test_regularizers_are_refused_for_recvae():
    from piarec.config import load_config
    from piarec.errors import ConfigError

    with pytest.raises(ValueError, match="Multi-VAE backbone only"):
        ModelConfig(backbone="recvae", regularizers=RegularizerConfig(latent_recon=True))
    with pytest.raises(ConfigError, match="Multi-VAE backbone only"):
        load_config(environ={}, overrides={"model": {"backbone": "recvae", "regularizers": {"noise_contrastive": True}}})


def test_iaf_model_trains_with_both_regularizers():
    m = _model(encoder="iaf", latent_recon=True, noise_contrastive=True, nc_noise="decoder")
    parts, grads, _ = _loss_and_grads(m, seed=0, step=20_000)
    assert torch.isfinite(parts.total) and parts.latent_recon > 0 and parts.noise_contrastive > 0
    assert all(torch.isfinite(g).all() for g in grads.values())
