"""RecVAE (Shenbin et al. 2020) on sparse input, with the PIA regularizer.

What differs from Multi-VAE, following the authors' reference implementation:

- encoder: five 600-wide layers with swish, layer norm (eps 0.1) and dense connections
  (each layer's input is summed into every later layer), then linear ``mu`` and ``logvar``;
- composite prior: a mixture of N(0, I), the posterior of a frozen copy of the encoder
  from the previous epoch ("old encoder", fed the clean input) and a wide N(0, e^10 I),
  weights 3/20, 3/4, 1/10; the KL is estimated with the sample, log q(z|x) - log p(z);
- user-dependent KL weight beta_u = gamma * |x_u| instead of an annealed beta;
- alternating updates: each epoch runs the encoder's optimizer for ``recvae_encoder_passes``
  passes (masked input), copies the encoder into the prior, then the decoder's optimizer
  for ``recvae_decoder_passes`` passes (clean input). :meth:`phases` says so to the trainer.

PIA (Eq. 8) adds lambda_A times the closed-form alignment of the Gaussian posterior to
the encoder phase; the anchors belong to the encoder's parameter group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from piarec.config import ModelConfig
from piarec.models.flows import log_normal
from piarec.models.contract import LossParts, Phase, SparseBatch
from piarec.models.ops import (
    alignment_closed_form, dense_first_layer, multinomial_nll, sparse_first_layer, standard_normal,
)

N_DENSE_LAYERS = 5
WIDE_PRIOR_LOGVAR = 10.0


class RecVAEEncoder(nn.Module):
    """x -> (mu, logvar) with dense connections; the first layer reads sparse rows."""

    def __init__(self, n_items: int, hidden: int, latent: int, ln_eps: float = 0.1):
        super().__init__()
        bound = 1.0 / math.sqrt(n_items)  # nn.Linear(n_items, hidden)'s default init
        self.item_in = nn.Parameter(torch.empty(n_items, hidden).uniform_(-bound, bound))
        self.bias_in = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))
        self.fcs = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(N_DENSE_LAYERS - 1))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, eps=ln_eps) for _ in range(N_DENSE_LAYERS))
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)

    def forward(self, batch: SparseBatch, keep_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rest(sparse_first_layer(batch, self.item_in, self.bias_in, keep_prob))

    def rest(self, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after the first layer's pre-activation ``first`` [B, H]."""
        h = self.norms[0](F.silu(first))
        total = h  # running sum of all earlier layers' outputs (the dense connections)
        for fc, norm in zip(self.fcs, self.norms[1:]):
            h = norm(F.silu(fc(h) + total))
            total = total + h
        return self.fc_mu(h), self.fc_logvar(h)


class RecVAE(nn.Module):
    """RecVAE with item anchors; same encode / logits contract as :class:`MultiVAE`."""

    def __init__(self, n_items: int, cfg: ModelConfig):
        super().__init__()
        self.n_items = n_items
        self.config = cfg
        self.encoder = RecVAEEncoder(n_items, cfg.hidden_dim, cfg.latent_dim)
        self.encoder_old = RecVAEEncoder(n_items, cfg.hidden_dim, cfg.latent_dim)
        self.encoder_old.requires_grad_(False)
        self.decoder = nn.Linear(cfg.latent_dim, n_items)
        self.anchors = nn.Parameter(torch.empty(n_items, cfg.latent_dim).normal_(0.0, 0.01))
        self.register_buffer("log_prior_weights", torch.tensor(cfg.recvae_prior_weights).log())

    def encode(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu, logvar`` of q(z | x): float32 [B, d]."""
        return self.encoder(batch, keep_prob)

    def gaussian_posterior(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior is Gaussian: :meth:`encode`."""
        return self.encoder(batch, keep_prob)

    def posterior_moments(self, batch: SparseBatch, samples: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior is Gaussian: :meth:`encode` of the unmasked input (``samples`` unused)."""
        return self.encoder(batch, 1.0)

    def kl_to_prior(self, batch: SparseBatch, samples: int = 32) -> torch.Tensor:
        """KL(q(z | x) || composite prior) per row [B], unmasked: the Monte Carlo mean over
        ``samples`` draws (global RNG) of log q(z | x) - log p(z), the KL of :meth:`loss`
        before its user weight gamma |x_u|."""
        mu, logvar = self.encoder(batch, 1.0)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(samples, *mu.shape, device=mu.device, dtype=mu.dtype)
        return (log_normal(z, mu, logvar).sum(dim=-1) - self.log_prior(batch, z)).mean(dim=0)

    def item_anchors(self) -> torch.Tensor:
        return self.anchors

    def affine_decoder(self) -> nn.Linear:
        return self.decoder

    def encode_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu, logvar`` of dense non-negative rows ``x`` float [B, I] (L2-normalised like
        binary input, unmasked)."""
        return self.encoder.rest(dense_first_layer(x, self.encoder.item_in, self.encoder.bias_in))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised item scores, float32 [B, I]."""
        return self.decoder(z)

    def log_prior(self, batch: SparseBatch, z: torch.Tensor) -> torch.Tensor:
        """log of the composite prior density at z [..., B, d], summed over dimensions: [..., B]."""
        with torch.no_grad():
            old_mu, old_logvar = self.encoder_old(batch, 1.0)
        zeros = torch.zeros_like(z)
        parts = torch.stack([
            log_normal(z, zeros, zeros),
            log_normal(z, old_mu, old_logvar),
            log_normal(z, zeros, torch.full_like(z, WIDE_PRIOR_LOGVAR)),
        ], dim=-1) + self.log_prior_weights
        # As in the reference: the mixture is taken per dimension, then dimensions summed.
        return torch.logsumexp(parts, dim=-1).sum(dim=-1)

    def loss(
        self, batch: SparseBatch, beta: float, lambda_a: float, phase: Phase | None = None, step: int = 0
    ) -> LossParts:
        """NLL + mean_u(gamma |x_u| KL_u) + lambda_A * alignment. ``beta`` is unused (the
        KL weight is user-dependent). In a decoder phase only the NLL is computed: the
        other terms do not depend on the decoder."""
        phase = phase or self.phases()[0]
        mu, logvar = self.encoder(batch, phase.keep_prob)
        mu, logvar = mu.float(), logvar.float()  # the loss terms in fp32 under bf16 autocast
        z = mu + torch.exp(0.5 * logvar) * standard_normal(batch, mu)
        nll = multinomial_nll(self.logits(z), batch, reuse_logits=True)
        zero = torch.zeros((), device=mu.device)
        if phase.terms == "nll":
            return LossParts(nll, nll, zero, zero)
        kl_u = log_normal(z, mu, logvar).sum(dim=1) - self.log_prior(batch, z)
        kl = (self.config.recvae_gamma * batch.lengths.to(kl_u.dtype) * kl_u).mean()
        align = alignment_closed_form(mu, logvar, self.anchors, batch).mean() if lambda_a > 0 else zero
        return LossParts(nll + kl + lambda_a * align, nll, kl, align)

    # -- how an epoch trains it ---------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoder": [*self.encoder.parameters(), self.anchors], "decoder": list(self.decoder.parameters())}

    def phases(self) -> list[Phase]:
        return [
            Phase("encoder", self.config.recvae_encoder_passes, self.config.keep_prob),
            Phase("decoder", self.config.recvae_decoder_passes, 1.0, terms="nll"),
        ]

    def end_phase(self, phase: Phase) -> None:
        if phase.group == "encoder":
            self.encoder_old.load_state_dict(self.encoder.state_dict())
