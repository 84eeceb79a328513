import numpy as np
import pytest
import torch
import torch.nn.functional as F

from piarec.config import ModelConfig
from piarec.model import MultiVAE, SparseBatch, alignment_closed_form, multinomial_nll
from piarec.sparse import CSR

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
