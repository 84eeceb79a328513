import numpy as np
import pytest
import torch
import torch.nn.functional as F

from piarec.config import ModelConfig
from piarec.models.contract import SparseBatch
from piarec.models.multivae import MultiVAE
from piarec.models.ops import alignment_closed_form, multinomial_nll
from piarec.data.csr import CSR

ROWS = [[0, 3, 5], [1], [2, 4, 6, 7]]


def _batch():
    return SparseBatch.from_csr(CSR.from_lists(ROWS, n_cols=8))


def test_sparse_encoder_equals_dense_normalised_input():
    torch.manual_seed(0)
    m = MultiVAE(8, ModelConfig(hidden_dim=5, latent_dim=3))
    x = torch.from_numpy(CSR.from_lists(ROWS, 8).to_dense())
    h = torch.tanh(F.normalize(x) @ m.item_in + m.bias_in)
    mu_ref, logvar_ref = m.to_stats(h).chunk(2, dim=1)
    mu, logvar = m.encode(_batch())
    torch.testing.assert_close(mu, mu_ref)
    torch.testing.assert_close(logvar, logvar_ref)


def test_input_masking_drops_items_and_rescales_survivors():
    torch.manual_seed(0)
    m = MultiVAE(8, ModelConfig(hidden_dim=5, latent_dim=3))
    mu_clean, _ = m.encode(_batch(), keep_prob=1.0)
    outs = torch.stack([m.encode(_batch(), keep_prob=0.5)[0] for _ in range(20)])
    assert not torch.allclose(outs[0], mu_clean)
    assert outs.var(dim=0).sum() > 0  # different masks give different posteriors


def test_multinomial_nll_gathers_log_softmax_at_positives():
    logits = torch.randn(3, 8)
    x = torch.from_numpy(CSR.from_lists(ROWS, 8).to_dense())
    expected = -(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean()
    torch.testing.assert_close(multinomial_nll(logits, _batch()), expected)


def test_multinomial_nll_holds_where_positives_have_underflowing_probabilities():
    """Exact when the logits span far more than float32's exp range (positives whose
    probability is 0.0 in fp32): the log-probabilities come from a log-sum-exp, never a log."""
    torch.manual_seed(2)
    logits = torch.randn(3, 8) * 80.0
    logits[2, 7] = 500.0  # user 2's positive 7 takes all the mass; its other positives underflow
    x = torch.from_numpy(CSR.from_lists(ROWS, 8).to_dense())
    expected = -(F.log_softmax(logits.double(), dim=1) * x.double()).sum(dim=1).mean()
    got = multinomial_nll(logits, _batch())
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-3)


def test_multinomial_nll_backward_runs_twice_through_a_retained_graph():
    logits = torch.randn(3, 8, requires_grad=True)
    loss = multinomial_nll(logits, _batch())
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    second = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_reused_logits_take_their_own_gradient_bit_for_bit():
    leaf = torch.randn(3, 8, requires_grad=True)
    grads = {}
    for reuse in (False, True):
        logits = leaf * 2.0  # a temporary of the loss, as the decoder's output is
        (grads[reuse],) = torch.autograd.grad(multinomial_nll(logits, _batch(), reuse_logits=reuse), logits)
        assert (grads[reuse].data_ptr() == logits.data_ptr()) is reuse  # no new [B, I] buffer
    assert torch.equal(grads[True], grads[False])


def test_reused_logits_refuse_a_second_backward_through_a_retained_graph():
    logits = torch.randn(3, 8, requires_grad=True) * 2.0
    loss = multinomial_nll(logits, _batch(), reuse_logits=True)
    torch.autograd.grad(loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        torch.autograd.grad(loss, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_callers_leaf_or_bf16_logits_are_never_overwritten(dtype):
    """A leaf is the caller's; bf16 logits are copied to fp32 first and only the copy is reused."""
    logits = torch.randn(3, 8).to(dtype).requires_grad_(True)
    before = logits.detach().clone()
    multinomial_nll(logits, _batch(), reuse_logits=True).backward()
    assert torch.equal(logits.detach(), before)
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_logsumexp_equals_torch_logsumexp_bit_for_bit(monkeypatch, threads):
    """The CPU likelihood takes its log-sum-exp in blocks of rows; each block has at least two
    rows (a one-row reduction may split across threads) and the result is torch's, bit for bit,
    so the trainer's weights do not move."""
    from piarec.models import ops

    monkeypatch.setattr(ops, "_LSE_BLOCK_FLOATS", 6 * 37)  # 6 rows of 37 items per block
    calls: list[int] = []
    whole = torch.logsumexp

    def spy(x, dim, out=None):
        calls.append(x.shape[0])
        return whole(x, dim) if out is None else whole(x, dim, out=out)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocks = {1: [1], 2: [2], 6: [6], 7: [7], 13: [6, 7], 14: [6, 6, 2], 50: [6] * 8 + [2]}
        for n, expected in blocks.items():
            logits = torch.randn(n, 37) * 20.0
            calls.clear()
            monkeypatch.setattr(ops.torch, "logsumexp", spy)
            got = ops._row_logsumexp(logits)
            monkeypatch.setattr(ops.torch, "logsumexp", whole)
            assert torch.equal(got, torch.logsumexp(logits, dim=1)), n
            assert calls == expected, (n, calls)
    finally:
        torch.set_num_threads(old_threads)


def test_alignment_closed_form_matches_monte_carlo():
    torch.manual_seed(1)
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4) * 0.3
    anchors = torch.randn(8, 4)
    closed = alignment_closed_form(mu, logvar, anchors, _batch())
    n = 200_000
    z = mu[:, None, :] + torch.exp(0.5 * logvar)[:, None, :] * torch.randn(3, n, 4)
    for u, items in enumerate(ROWS):
        d = ((z[u][:, None, :] - anchors[items][None]) ** 2).sum(-1).mean()
        assert closed[u].item() == pytest.approx(d.item(), rel=0.01)


def test_alignment_gradients_reach_mu_sigma_and_anchors():
    mu = torch.randn(3, 4, requires_grad=True)
    logvar = torch.randn(3, 4, requires_grad=True)
    anchors = torch.randn(8, 4, requires_grad=True)
    alignment_closed_form(mu, logvar, anchors, _batch()).sum().backward()
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0
    # only anchors of items some user has receive gradient
    assert (anchors.grad.abs().sum(dim=1) > 0).tolist() == [True] * 8
    # d/d mu of ||mu - e_bar||^2 = 2 (mu - e_bar)
    ebar = torch.stack([anchors[r].mean(0) for r in ROWS]).detach()
    torch.testing.assert_close(mu.grad, 2 * (mu - ebar).detach())


def test_loss_without_pia_has_zero_alignment_and_decoder_variants_shape():
    torch.manual_seed(0)
    for dec in ([], [6]):
        m = MultiVAE(8, ModelConfig(hidden_dim=5, latent_dim=3, decoder_hidden=dec, encoder="deeper"))
        parts = m.loss(_batch(), beta=0.2, lambda_a=0.0)
        assert parts.align.item() == 0.0
        assert torch.isfinite(parts.total)
        assert m.logits(torch.zeros(2, 3)).shape == (2, 8)
        assert len(m.encoder_extra) == 2


# -- IAF encoder ------------------------------------------------------------------------
from piarec.models.bundle import load_bundle, save_bundle  # noqa: E402
from piarec.models.flows import IAF, log_normal  # noqa: E402
from piarec.models.contract import Phase  # noqa: E402
from piarec.models.factory import build_model
from piarec.models.recvae import RecVAE  # noqa: E402


def _scramble(module: torch.nn.Module, scale: float = 0.5) -> None:
    """Non-trivial weights, so a test cannot pass on near-identity initial flows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_iaf_logdet_matches_autograd_jacobian():
    torch.manual_seed(0)
    flow = IAF(d=4, hidden=7, context=3, steps=2)
    _scramble(flow)
    z, h = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    flow = flow.double()
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], h)[0][0], z[0])
    _, logdet = flow(z, h)
    sign, expected = torch.linalg.slogdet(jac)
    assert sign.item() == 1.0
    torch.testing.assert_close(logdet[0], expected)
    # Each step alone is autoregressive: its Jacobian is triangular (lower for the first order).
    step_jac = torch.autograd.functional.jacobian(lambda v: flow.steps[0](v[None], h)[0][0], z[0])
    torch.testing.assert_close(step_jac, torch.tril(step_jac))
    assert not torch.allclose(jac, torch.tril(jac))  # reversed order in step 2 mixes both ways


def test_iaf_encode_pushes_the_mean_through_the_flows_deterministically():
    torch.manual_seed(0)
    m = MultiVAE(8, ModelConfig(hidden_dim=5, latent_dim=3, encoder="iaf", flow_hidden=6)).eval()
    _scramble(m.flow)
    mu, logvar = m.encode(_batch(), keep_prob=1.0)
    mu0, logvar0, h = m.encode_base(_batch(), keep_prob=1.0)
    torch.testing.assert_close(mu, m.flow(mu0, h)[0])
    torch.testing.assert_close(logvar, logvar0)
    assert not torch.allclose(mu, mu0)
    torch.testing.assert_close(m.encode(_batch(), keep_prob=1.0)[0], mu)  # no sampling


def test_iaf_loss_takes_kl_in_the_transformed_space_and_aligns_z0():
    m = MultiVAE(8, ModelConfig(hidden_dim=5, latent_dim=3, encoder="iaf", flow_hidden=6, keep_prob=1.0))
    _scramble(m.flow)
    torch.manual_seed(5)
    parts = m.loss(_batch(), beta=0.3, lambda_a=0.7)
    # Replay the same draws by hand.
    torch.manual_seed(5)
    mu, logvar, h = m.encode_base(_batch(), 1.0)
    z0 = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    z, logdet = m.flow(z0, h)
    kl = (log_normal(z0, mu, logvar).sum(1) - logdet - log_normal(z, 0 * z, 0 * z).sum(1)).mean()
    align = alignment_closed_form(mu, logvar, m.anchors, _batch()).mean()
    nll = multinomial_nll(m.logits(z), _batch())
    torch.testing.assert_close(parts.kl, kl)
    torch.testing.assert_close(parts.align, align)
    torch.testing.assert_close(parts.total, nll + 0.3 * kl + 0.7 * align)


# -- RecVAE -----------------------------------------------------------------------------
def _recvae(**kw) -> RecVAE:
    torch.manual_seed(0)
    return RecVAE(8, ModelConfig(backbone="recvae", hidden_dim=6, latent_dim=3, **kw))


def test_recvae_sparse_encoder_equals_the_dense_reference():
    m = _recvae()
    x = torch.from_numpy(CSR.from_lists(ROWS, 8).to_dense())
    enc = m.encoder
    swish = lambda t: t * torch.sigmoid(t)  # noqa: E731
    h1 = enc.norms[0](swish(F.normalize(x) @ enc.item_in + enc.bias_in))
    hs = [h1]
    for fc, norm in zip(enc.fcs, enc.norms[1:]):
        hs.append(norm(swish(fc(hs[-1]) + sum(hs))))  # dense connections
    mu, logvar = m.encode(_batch())
    torch.testing.assert_close(mu, enc.fc_mu(hs[-1]))
    torch.testing.assert_close(logvar, enc.fc_logvar(hs[-1]))


def test_recvae_loss_composite_prior_and_user_dependent_beta():
    m = _recvae(keep_prob=1.0, recvae_gamma=0.01)
    torch.manual_seed(7)
    parts = m.loss(_batch(), beta=123.0, lambda_a=0.5)  # beta is ignored by RecVAE
    torch.manual_seed(7)
    mu, logvar = m.encode(_batch())
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    old_mu, old_logvar = m.encoder_old(_batch(), 1.0)
    w = torch.tensor([0.15, 0.75, 0.1])
    dens = (w[0] * log_normal(z, 0 * z, 0 * z).exp() + w[1] * log_normal(z, old_mu, old_logvar).exp()
            + w[2] * log_normal(z, 0 * z, 0 * z + 10.0).exp())
    kl_u = log_normal(z, mu, logvar).sum(1) - dens.log().sum(1)
    lengths = torch.tensor([len(r) for r in ROWS], dtype=torch.float32)
    torch.testing.assert_close(parts.kl, (0.01 * lengths * kl_u).mean())
    torch.testing.assert_close(parts.align, alignment_closed_form(mu, logvar, m.anchors, _batch()).mean())


def test_recvae_phases_alternate_and_refresh_the_prior():
    m = _recvae()
    assert [(p.group, p.passes, p.terms) for p in m.phases()] == [("encoder", 3, "all"), ("decoder", 1, "nll")]
    assert m.phases()[1].keep_prob == 1.0
    groups = m.param_groups()
    assert any(p is m.anchors for p in groups["encoder"])
    assert not any(p is q for p in groups["decoder"] for q in m.encoder.parameters())
    assert not any(p.requires_grad for p in m.encoder_old.parameters())
    assert not torch.equal(m.encoder_old.item_in, m.encoder.item_in)
    m.end_phase(Phase("encoder", 3, 0.5))
    assert torch.equal(m.encoder_old.item_in, m.encoder.item_in)
    parts = m.loss(_batch(), 0.0, 1.0, m.phases()[1])
    assert parts.kl.item() == 0.0 and parts.align.item() == 0.0


# -- every variant keeps the scorer's contract and round-trips through a bundle ----------
VARIANTS = [
    {"encoder": "shallow"}, {"encoder": "deeper"}, {"encoder": "iaf"},
    {"decoder_hidden": [6]}, {"backbone": "recvae"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_every_variant_round_trips_through_a_bundle(variant, tmp_path):
    torch.manual_seed(0)
    m = build_model(8, ModelConfig(hidden_dim=5, latent_dim=3, flow_hidden=6, **variant)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_bundle(tmp_path / "b", m, np.array([f"t{i}" for i in range(8)], dtype=object), np.ones(8, np.float32))
    loaded = load_bundle(tmp_path / "b").model
    assert type(loaded) is type(m)
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    mu, _ = loaded.encode(_batch(), keep_prob=1.0)
    scores = loaded.logits(mu)
    assert scores.shape == (3, 8) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, m.logits(m.encode(_batch(), keep_prob=1.0)[0]))


def test_build_model_rejects_an_empty_vocabulary():
    with pytest.raises(ValueError, match="at least one item"):
        build_model(0, ModelConfig())


def test_multinomial_nll_gradient_matches_autograd_of_log_softmax():
    logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    x = torch.from_numpy(CSR.from_lists(ROWS, 8).to_dense()).double()
    ref = torch.autograd.grad(-(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean() * 1.7, logits)[0]
    got = torch.autograd.grad(multinomial_nll(logits, _batch()) * 1.7, logits)[0]
    torch.testing.assert_close(got, ref)
    assert torch.autograd.gradcheck(lambda t: multinomial_nll(t, _batch()), (logits,))
