"""Multi-VAE (Liang et al. 2018) with the Personalized Item Alignment regularizer.

It implements the model contract of :mod:`piarec.models.contract`;
:func:`piarec.models.factory.build_model` makes the model a
:class:`~piarec.config.ModelConfig` describes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from piarec.config import ModelConfig, RegularizerConfig
from piarec.models.contract import LossParts, Phase, SparseBatch
from piarec.models.flows import IAF, log_normal
from piarec.models.ops import (
    alignment_closed_form, dense_first_layer, gaussian_kl, gaussian_kl_wide, multinomial_nll, sample_from_decoder,
    sparse_first_layer, standard_normal, swap_items, warmup_weight,
)


class MultiVAE(nn.Module):
    """Encoder I -> hidden -> [latent]* -> (mu, logvar) [-> IAF]; decoder latent -> [decoder_hidden] -> I.

    ``encoder="deeper"`` adds two latent-wide tanh layers, ``encoder="iaf"`` adds
    ``flow_steps`` inverse-autoregressive flow steps after the base encoder (the PIA
    paper's appendix D.2). ``anchors`` are the PIA item anchors E [I, d].
    """

    def __init__(self, n_items: int, cfg: ModelConfig):
        super().__init__()
        self.n_items = n_items
        self.config = cfg
        d, h = cfg.latent_dim, cfg.hidden_dim
        # First layer as an item-embedding table so sparse input is consumed directly.
        self.item_in = nn.Parameter(torch.empty(n_items, h))
        self.bias_in = nn.Parameter(torch.zeros(h))
        extra = [nn.Linear(h if i == 0 else d, d) for i in range(cfg.extra_encoder_layers)]
        self.encoder_extra = nn.ModuleList(extra)
        context = d if extra else h
        self.to_stats = nn.Linear(context, 2 * d)
        self.flow = IAF(d, cfg.flow_hidden, context, cfg.flow_steps) if cfg.encoder == "iaf" else None
        dims = [d, *cfg.decoder_hidden, n_items]
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.anchors = nn.Parameter(torch.empty(n_items, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier weights and N(0, 0.001) biases, as in Liang et al.'s reference code
        # (xavier-normal here; the TF original draws Xavier-uniform, same variance).
        fan_in, fan_out = self.n_items, self.item_in.shape[1]
        nn.init.normal_(self.item_in, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        nn.init.normal_(self.bias_in, 0.0, 0.001)
        for layer in [*self.encoder_extra, self.to_stats, *self.decoder]:
            nn.init.xavier_normal_(layer.weight)
            nn.init.normal_(layer.bias, 0.0, 0.001)
        nn.init.normal_(self.anchors, 0.0, 0.01)

    # -- the model contract ---------------------------------------------------------
    def _stats(self, first: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(first)
        for layer in self.encoder_extra:
            h = torch.tanh(layer(h))
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar, h

    def encode_base(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, ...]:
        """The Gaussian part: ``mu, logvar`` of q(z0 | x) and the last hidden layer
        (the flows' context), float32 [B, d], [B, d], [B, H]."""
        return self._stats(sparse_first_layer(batch, self.item_in, self.bias_in, keep_prob))

    def encode(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu, logvar``: float32 [B, d]. ``logits(mu)`` is the deterministic score.

        With the IAF encoder the posterior of z_T is not Gaussian; ``mu`` is then the base
        mean pushed through the flows with zero noise, f_T(...f_1(mu0)), the image of the
        base posterior's mode, and ``logvar`` is the base (z0) log-variance.
        """
        mu, logvar, h = self.encode_base(batch, keep_prob)
        if self.flow is not None:
            mu, _ = self.flow(mu, h)
        return mu, logvar

    def gaussian_posterior(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu, logvar`` of the Gaussian q(z0 | x), before the flows (the posterior itself
        for the shallow and deeper encoders)."""
        mu, logvar, _ = self.encode_base(batch, keep_prob)
        return mu, logvar

    def posterior_moments(self, batch: SparseBatch, samples: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean, logvar`` [B, d] of q(z | x) for the latent the decoder reads, unmasked:
        exact for the shallow and deeper encoders; with the IAF encoder the mean and
        per-dimension log-variance of ``samples`` draws of z_T (global RNG)."""
        mu, logvar, h = self.encode_base(batch, 1.0)
        if self.flow is None:
            return mu, logvar
        z, _ = self._flow_draws(mu, logvar, h, samples)
        return z.mean(dim=0), z.var(dim=0).clamp_min(torch.finfo(z.dtype).tiny).log()

    def kl_to_prior(self, batch: SparseBatch, samples: int = 32) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) per row [B], unmasked: the closed form of the Gaussian
        encoders (float64); with the IAF encoder the Monte Carlo mean over ``samples``
        draws of log q(z_T | x) - log p(z_T), the KL that training weighs (Eq. 12-13)."""
        mu, logvar, h = self.encode_base(batch, 1.0)
        if self.flow is None:
            return gaussian_kl(mu.double(), logvar.double())
        z, log_q = self._flow_draws(mu, logvar, h, samples)
        return (log_q - log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(dim=-1)).mean(dim=0)

    def _flow_draws(self, mu: torch.Tensor, logvar: torch.Tensor, h: torch.Tensor,
                    samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``samples`` draws of z_T [S, B, d] through the flows and their log q(z_T | x) [S, B]."""
        (b, d), s = mu.shape, samples
        z0 = mu + torch.exp(0.5 * logvar) * torch.randn(s, b, d, device=mu.device, dtype=mu.dtype)
        z, logdet = self.flow(z0.reshape(s * b, d), h.repeat(s, 1))
        return z.reshape(s, b, d), log_normal(z0, mu, logvar).sum(dim=-1) - logdet.reshape(s, b)

    def encode_dense_base(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`encode_base` of dense non-negative rows ``x`` float [B, I] (unmasked)."""
        return self._stats(dense_first_layer(x, self.item_in, self.bias_in))

    def encode_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` of dense non-negative rows ``x`` float [B, I], e.g. a decoder's
        softmax; L2-normalised like binary input (see :func:`dense_first_layer`)."""
        mu, logvar, h = self.encode_dense_base(x)
        if self.flow is not None:
            mu, _ = self.flow(mu, h)
        return mu, logvar

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised item scores, float32 [B, I]."""
        for layer in self.decoder[:-1]:
            z = torch.tanh(layer(z))
        return self.decoder[-1](z)

    def loss(
        self, batch: SparseBatch, beta: float, lambda_a: float, phase: Phase | None = None, step: int = 0
    ) -> LossParts:
        """Eq. 8 of the PIA paper: multinomial NLL + beta * KL + lambda_A * alignment,
        each averaged over the batch. Targets are the batch's own (unmasked) items.

        With flows the KL is taken in the transformed space (Eq. 12-13), estimated with
        the sample: log q(z_T|x) - log p(z_T), log q(z_T|x) = log q(z0|x) - sum log|det|.
        The alignment is applied to the Gaussian z0, where Proposition 3.1 holds.
        """
        keep_prob = self.config.keep_prob if phase is None else phase.keep_prob
        mu, logvar, h = self.encode_base(batch, keep_prob)
        mu, logvar = mu.float(), logvar.float()  # the loss terms in fp32 under bf16 autocast
        std = torch.exp(0.5 * logvar)
        z0 = mu + std * standard_normal(batch, std)
        if self.flow is None:
            z, kl = z0, gaussian_kl(mu, logvar).mean()
        else:
            z, logdet = self.flow(z0, h)
            log_q = log_normal(z0, mu, logvar).sum(dim=1) - logdet
            log_p = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(dim=1)
            kl = (log_q - log_p).mean()
        logits = self.logits(z)
        nll = multinomial_nll(logits, batch, reuse_logits=True)  # its backward overwrites logits
        if lambda_a > 0:
            align = alignment_closed_form(mu, logvar, self.anchors, batch).mean()
        else:
            align = torch.zeros((), device=mu.device)
        total = nll + beta * kl + lambda_a * align
        reg = self.config.regularizers
        if not (reg.latent_recon or reg.noise_contrastive):
            # Switched off: not a single extra operation or random draw, so training is
            # bit-identical to a model without the regularizers.
            return LossParts(total, nll, kl, align)
        zero = torch.zeros((), device=mu.device)
        lr_term, nc_term = zero, zero
        if reg.latent_recon:
            lr_term = latent_reconstruction(self, z, logits)
            total = total + warmup_weight(step, reg.latent_recon_weight, reg.latent_recon_warmup) * lr_term
        if reg.noise_contrastive:
            nc_term = self.noise_contrastive(batch, reg)
            total = total + reg.nc_weight * nc_term
        return LossParts(total, nll, kl, align, lr_term, nc_term)

    def noise_contrastive(self, batch: SparseBatch, reg: RegularizerConfig) -> torch.Tensor:
        """NC-VAE's contrastive term, mean over the batch: KL(q(z0 | x~) || N(0, K^2 I)) of
        contrastive histories x~: random item swaps, or (``decoder``) draws from the model's
        marginal E_{p(z)}[p(x | z)] (NC-VAE section 6.2): the decoder at samples of the prior
        N(0, I), with each row's length.
        The base Gaussian is used with the IAF encoder (closed form); the corrupted input is
        not masked again."""
        if reg.nc_noise == "swap":
            noisy = swap_items(batch, self.n_items, reg.nc_swap_fraction)
        else:
            with torch.no_grad():
                prior = torch.randn(batch.size, self.config.latent_dim, device=batch.indices.device)
                noisy = sample_from_decoder(self.logits(prior), batch.lengths)
        mu, logvar, _ = self.encode_base(noisy, 1.0)
        return gaussian_kl_wide(mu, logvar, reg.nc_prior_scale).mean()

    def item_anchors(self) -> torch.Tensor:
        return self.anchors

    def affine_decoder(self) -> nn.Linear | None:
        return self.decoder[0] if len(self.decoder) == 1 else None

    # -- how an epoch trains it ---------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"all": list(self.parameters())}

    def phases(self) -> list[Phase]:
        return [Phase("all", 1, self.config.keep_prob)]

    def end_phase(self, phase: Phase) -> None:
        """Hook after a phase's passes (RecVAE refreshes its prior here)."""


def latent_reconstruction(model: nn.Module, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """LRVAE's term (its Eq. 3), mean over rows: ``||E_mu(D(z)) - z||^2`` with ``logits`` =
    ``model.logits(z)`` = D(z), float [B, I], and ``z`` [B, d] the posterior sample.

    As in the paper, nothing is detached: the gradient reaches the encoder and the decoder
    through E_mu(D(z)), and the posterior sample (so the encoder again) through both D(z)
    and the target z.
    """
    mu_back, _ = model.encode_dense(torch.softmax(logits, dim=1))
    return (mu_back - z).pow(2).sum(dim=1).mean()
