"""Collapse diagnostics on tiny models with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from piarec.config import DiagnosticsConfig, ModelConfig
from piarec.evaluate.diagnostics import (
    active_units, collapse_metrics, decoder_ima_contrast, ima_contrast, kl_per_dim, kl_per_dimension,
    kl_to_prior, map_ima_contrast, mask_stability, mutual_information, posterior_gaussians, self_consistency,
)
from piarec.models.contract import SparseBatch
from piarec.models.factory import build_model
from piarec.models.multivae import MultiVAE
from piarec.models.ops import gaussian_kl
from piarec.data.csr import CSR

N_ITEMS = 40
SMALL = ModelConfig(hidden_dim=16, latent_dim=6)


def _rows(n_users: int = 60, seed: int = 0) -> CSR:
    rng = np.random.default_rng(seed)
    return CSR.from_lists([np.sort(rng.choice(N_ITEMS, rng.integers(2, 12), replace=False)) for _ in range(n_users)],
                          N_ITEMS)


def _model(seed: int = 0, cfg: ModelConfig = SMALL) -> MultiVAE:
    torch.manual_seed(seed)
    return build_model(N_ITEMS, cfg)


def _collapsed(mu_value: float = 0.0) -> MultiVAE:
    """An encoder that ignores its input: zero first layer, so every user gets
    mu = mu_value (each dimension) and logvar = 0."""
    m = _model()
    with torch.no_grad():
        m.item_in.zero_()
        m.bias_in.zero_()
        m.to_stats.weight.zero_()
        m.to_stats.bias.zero_()
        m.to_stats.bias[: SMALL.latent_dim] = mu_value
    return m


# --------------------------------------------------------------------------- collapse
def test_collapsed_model_has_no_active_units_no_kl_and_no_information():
    out = collapse_metrics(_collapsed(), _rows(), DiagnosticsConfig(jacobian_users=0), seed=3)
    assert out["active_units"] == 0
    assert out["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    # Every posterior is the same N(0, I): q(z | x) = q(z), so each log-ratio is 0.
    assert out["mutual_info"] == pytest.approx(0.0, abs=1e-9)
    assert out["mask_variance"] == pytest.approx(0.0, abs=1e-12)


def test_collapsed_model_off_the_origin_pays_exactly_its_kl():
    mu, logvar = posterior_gaussians(_collapsed(0.5), _rows())
    per_dim = kl_per_dim(mu, logvar)
    np.testing.assert_allclose(per_dim, 0.5 * 0.5**2, atol=1e-9)  # KL(N(m, 1) || N(0, 1)) = m^2 / 2
    assert active_units(mu) == 0


def test_trained_like_model_has_information_and_kl_matches_the_loss_formula():
    m = _model()
    rows = _rows()
    mu, logvar = posterior_gaussians(m, rows)
    expected = gaussian_kl(torch.from_numpy(mu), torch.from_numpy(logvar)).mean().item()
    assert kl_per_dim(mu, logvar).sum() == pytest.approx(expected, rel=1e-9)
    assert kl_per_dimension(m, rows).shape == (SMALL.latent_dim,)


def test_mutual_information_of_well_separated_posteriors_reaches_log_n():
    n, d = 50, 4
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(n, d)) * 100.0  # far apart next to their spread
    logvar = np.full((n, d), -6.0)
    assert mutual_information(mu, logvar, rng) == pytest.approx(math.log(n), abs=1e-6)
    # Half the users share one posterior: they are indistinguishable, the bound drops.
    mu[: n // 2] = mu[0]
    half = mutual_information(mu, logvar, rng)
    expected = 0.5 * math.log(n / (n // 2)) + 0.5 * math.log(n)
    assert half == pytest.approx(expected, abs=1e-6)


def test_mutual_information_of_a_separating_model_is_near_its_bound():
    """Users holding one distinct item each; the encoder maps them to distant means."""
    n = 8
    m = MultiVAE(n, ModelConfig(hidden_dim=n, latent_dim=n))
    with torch.no_grad():
        m.item_in.copy_(torch.eye(n) * 3.0)
        m.bias_in.zero_()
        m.to_stats.weight.zero_()
        m.to_stats.weight[:n].copy_(torch.eye(n) * 50.0)
        m.to_stats.bias.zero_()
        m.to_stats.bias[n:] = -4.0
    rows = CSR.from_lists([[i] for i in range(n)], n)
    out = collapse_metrics(m, rows, DiagnosticsConfig(jacobian_users=0, mask_users=0))
    assert out["active_units"] == n
    assert out["mutual_info"] == pytest.approx(math.log(n), abs=1e-3)
    assert out["mutual_info_bound"] == pytest.approx(math.log(n))


# --------------------------------------------------------------------------- self-consistency
class _SoftmaxInverse(nn.Module):
    """Decoder logits [z, 0] over d + 1 items; encoder mu = log(x_i / x_d), which inverts
    the softmax exactly, for any scale of x (the L2 normalisation cannot change it)."""

    def __init__(self, d: int, skew: float = 0.0):
        super().__init__()
        self.d = d
        self.skew = nn.Parameter(torch.tensor(skew, dtype=torch.float64))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, torch.zeros(len(z), 1, dtype=z.dtype)], dim=1)

    def encode_dense(self, x: torch.Tensor):
        x = torch.nn.functional.normalize(x, dim=1)
        mu = torch.log(x[:, : self.d] / x[:, self.d :]) * (1.0 + self.skew)
        return mu, torch.zeros_like(mu)


def test_an_encoder_that_inverts_its_decoder_has_zero_self_consistency_error():
    z = torch.randn(32, 5, dtype=torch.float64)
    assert self_consistency(_SoftmaxInverse(5), z).max() == pytest.approx(0.0, abs=1e-20)
    # An encoder off by 10 % misses every latent by 1 % of its squared norm.
    err = self_consistency(_SoftmaxInverse(5, skew=0.1), z)
    np.testing.assert_allclose(err, 0.01 * z.pow(2).sum(dim=1).numpy(), rtol=1e-9)


def test_multivae_dense_encoder_equals_the_sparse_one_on_binary_rows():
    m = _model()
    rows = _rows(8)
    mu_s, lv_s = m.encode(SparseBatch.from_csr(rows))
    dense = torch.from_numpy(rows.to_dense()).float()
    for scale in (1.0, 7.0):  # the L2 normalisation makes the encoder scale-invariant
        mu_d, lv_d = m.encode_dense(dense * scale)
        torch.testing.assert_close(mu_d, mu_s)
        torch.testing.assert_close(lv_d, lv_s)


# --------------------------------------------------------------------------- IMA contrast
def test_ima_contrast_is_zero_for_orthogonal_columns_and_positive_otherwise():
    q, _ = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))
    orthogonal = q * torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)  # orthogonal, unequal norms
    assert ima_contrast(orthogonal) == pytest.approx(0.0, abs=1e-10)
    a = torch.randn(7, 3, dtype=torch.float64)
    gram = a.T @ a
    expected = 0.5 * (torch.log(torch.diagonal(gram)).sum() - torch.logdet(gram)).item()
    assert ima_contrast(a) == pytest.approx(expected, rel=1e-9)
    assert ima_contrast(a) > 0  # Hadamard's inequality
    assert ima_contrast(torch.stack([a[:, 0], a[:, 0], a[:, 1]], dim=1)) == math.inf


def test_ima_contrast_of_hand_built_maps():
    points = torch.tensor([[0.0, 0.0], [0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    # Elementwise maps have diagonal Jacobians: orthogonal columns everywhere.
    np.testing.assert_allclose(map_ima_contrast(torch.tanh, points), 0.0, atol=1e-12)
    # (a, b) -> (a, b, a b): columns (1, 0, b) and (0, 1, a) meet at an angle unless a b = 0.
    def f(z):
        return torch.stack([z[:, 0], z[:, 1], z[:, 0] * z[:, 1]], dim=1)

    c = map_ima_contrast(f, points)
    assert c[0] == pytest.approx(0.0, abs=1e-12)
    a, b = 0.5, -1.0
    gram = np.array([[1 + b * b, a * b], [a * b, 1 + a * a]])
    assert c[1] == pytest.approx(0.5 * (np.log(np.diag(gram)).sum() - np.log(np.linalg.det(gram))), rel=1e-9)
    assert c[2] > 0


def test_decoder_ima_contrast_uses_the_softmax_jacobian():
    m = _model(cfg=ModelConfig(hidden_dim=16, latent_dim=4, decoder_hidden=[8]))
    z = torch.randn(3, 4)
    auto = [ima_contrast(torch.func.jacfwd(lambda v: torch.softmax(m.logits(v[None])[0], 0))(v)) for v in z]
    np.testing.assert_allclose(decoder_ima_contrast(m, z), auto, rtol=1e-4)


# --------------------------------------------------------------------------- mask stability
def test_mask_variance_is_zero_without_masking_and_positive_with_it():
    m = _model()
    rows = _rows(10)
    var, dist = mask_stability(m, rows, keep_prob=1.0, repeats=4)
    np.testing.assert_allclose(var, 0.0, atol=1e-12)
    mu, _ = m.encode(SparseBatch.from_csr(rows))
    centroid = torch.stack([m.anchors[rows.row(u)].mean(dim=0) for u in range(rows.n_rows)])
    np.testing.assert_allclose(dist, (mu - centroid).pow(2).sum(dim=1).detach().numpy(), rtol=1e-5)
    var_masked, _ = mask_stability(m, rows, keep_prob=0.5, repeats=4)
    assert (var_masked[rows.row_lengths() > 1] > 0).all()


# --------------------------------------------------------------------------- the entry point
def test_collapse_metrics_are_deterministic_and_leave_mode_and_rng_alone():
    m = _model()
    m.train()
    rows = _rows()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = collapse_metrics(m, rows, DiagnosticsConfig(), seed=7)
    assert m.training
    assert torch.equal(torch.get_rng_state(), state)
    assert a == collapse_metrics(m, rows, DiagnosticsConfig(), seed=7)
    assert a != collapse_metrics(m, rows, DiagnosticsConfig(), seed=8)
    expected = {"active_units", "latent_dim", "kl_mean", "kl_dims_active", "mutual_info", "mutual_info_bound",
                "self_consistency", "ima_contrast", "mask_keep_prob", "mask_variance", "mask_anchor_dist"}
    assert set(a) == expected
    assert all(k.replace("_", "").isalnum() for k in a)
    assert 0 <= a["mutual_info"] <= a["mutual_info_bound"] + 1e-9
    assert a["mask_keep_prob"] == SMALL.keep_prob


def test_collapse_metrics_work_for_iaf_and_recvae_and_skip_what_does_not_apply():
    rows = _rows()
    for cfg in (ModelConfig(hidden_dim=16, latent_dim=6, encoder="iaf", flow_hidden=8),
                ModelConfig(backbone="recvae", hidden_dim=16, latent_dim=6)):
        out = collapse_metrics(_model(cfg=cfg), rows, DiagnosticsConfig(users=30, jacobian_users=2))
        assert np.isfinite(list(out.values())).all(), out
    out = collapse_metrics(_model(), rows, DiagnosticsConfig(jacobian_users=0, mask_users=0))
    assert "ima_contrast" not in out and "mask_variance" not in out


def test_collapse_metrics_refuse_fewer_than_two_users():
    with pytest.raises(ValueError, match="at least two users"):
        collapse_metrics(_model(), CSR.from_lists([[1], []], N_ITEMS), DiagnosticsConfig())


# --------------------------------------------------------------------------- z_T and the model's own prior
def _affine_iaf(mean_shift: float = 0.7, gate: float = -1.0) -> MultiVAE:
    """An IAF encoder whose steps ignore z and context: every step is z' = s z + (1 - s) c
    with s = sigmoid(gate) and a per-dimension constant c, so z_T is Gaussian with a known
    mean and variance (the flow's own closed form)."""
    m = _model(cfg=ModelConfig(hidden_dim=16, latent_dim=6, encoder="iaf", flow_hidden=8, flow_steps=2))
    with torch.no_grad():
        for t, step in enumerate(m.flow.steps):
            step.out_m.weight.zero_()
            step.out_s.weight.zero_()
            step.out_m.bias.copy_(mean_shift * torch.arange(6, dtype=torch.float32) + t)
            step.out_s.bias.fill_(gate)
    return m


def _affine_iaf_closed_form(m: MultiVAE, rows: CSR) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean, logvar`` float64 of z_T for :func:`_affine_iaf`, in closed form."""
    mu, logvar, _ = m.encode_base(SparseBatch.from_csr(rows, torch.device("cpu")), 1.0)
    mean, log_scale = mu.double(), torch.zeros_like(mu, dtype=torch.float64)
    for step in m.flow.steps:
        s = torch.sigmoid(step.out_s.bias.double())
        mean = s * mean + (1 - s) * step.out_m.bias.double()
        log_scale = log_scale + s.log()
    return mean.detach(), (logvar.double() + 2 * log_scale).detach()


def test_iaf_diagnostics_read_z_t_not_the_base_posterior():
    m, rows = _affine_iaf(), _rows(20)
    mean, logvar = _affine_iaf_closed_form(m, rows)
    want = gaussian_kl(mean, logvar).numpy()
    base_mu, base_logvar = m.gaussian_posterior(SparseBatch.from_csr(rows, torch.device("cpu")))
    base = gaussian_kl(base_mu.double(), base_logvar.double()).detach().numpy()
    assert np.abs(want - base).min() > 1.0  # the two answers are far apart for every user

    torch.manual_seed(0)
    got = kl_to_prior(m, rows, samples=4000)
    # log q(z_T | x) - log p(z_T) has a per-user sd of ~sqrt(d / 2 + ...) nats; 4,000 draws
    # leave a standard error well under 0.15 nats.
    np.testing.assert_allclose(got, want, atol=0.15)
    got_mu, got_logvar = posterior_gaussians(m, rows, samples=4000)
    np.testing.assert_allclose(got_mu, mean.numpy(), atol=0.02)
    np.testing.assert_allclose(np.exp(got_logvar), np.exp(logvar.numpy()), rtol=0.1)

    out = collapse_metrics(m, rows, DiagnosticsConfig(users=20, posterior_samples=2000, jacobian_users=0,
                                                      mask_users=0, self_consistency_users=1))
    assert out["kl_mean"] == pytest.approx(want.mean(), abs=0.1)
    assert abs(out["kl_mean"] - base.mean()) > 1.0


def test_gaussian_encoders_report_their_closed_form_kl_exactly():
    m, rows = _model(), _rows()
    mu, logvar = posterior_gaussians(m, rows, samples=2)  # no draws: the posterior itself
    np.testing.assert_allclose(kl_to_prior(m, rows, samples=2),
                               gaussian_kl(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy(), rtol=1e-6)


def test_recvae_kl_is_to_its_composite_prior():
    """The Monte Carlo KL against a per-dimension Gauss-Hermite quadrature of
    KL(q || composite prior): the prior's mixture is taken per dimension, so the KL is a sum
    of one-dimensional integrals."""
    torch.manual_seed(1)
    m = build_model(N_ITEMS, ModelConfig(backbone="recvae", hidden_dim=16, latent_dim=6))
    with torch.no_grad():  # an old encoder unlike the current one, so the prior is not N(0, I)
        for p in m.encoder_old.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    rows = _rows(15)
    batch = SparseBatch.from_csr(rows, torch.device("cpu"))
    with torch.no_grad():
        mu, logvar = (t.double().numpy() for t in m.encoder(batch, 1.0))
        old_mu, old_logvar = (t.double().numpy() for t in m.encoder_old(batch, 1.0))
        log_w = m.log_prior_weights.double().numpy()

    nodes, weights = np.polynomial.hermite.hermgauss(80)
    sd = np.exp(0.5 * logvar)
    z = mu[..., None] + math.sqrt(2.0) * sd[..., None] * nodes  # [B, d, K]

    def log_n(x, m_, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (x - m_) ** 2 / np.exp(lv))

    parts = np.stack([log_n(z, 0.0, 0.0), log_n(z, old_mu[..., None], old_logvar[..., None]),
                      log_n(z, 0.0, 10.0)], axis=-1) + log_w
    log_p = np.logaddexp.reduce(parts, axis=-1)
    log_q = log_n(z, mu[..., None], logvar[..., None])
    want = ((log_q - log_p) * weights / math.sqrt(math.pi)).sum(axis=(1, 2))
    to_standard = gaussian_kl(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy()
    assert np.abs(want - to_standard).max() > 0.5  # the composite prior matters here

    torch.manual_seed(0)
    np.testing.assert_allclose(kl_to_prior(m, rows, samples=20000), want, atol=0.08)
