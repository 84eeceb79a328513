"""Multi-VAE (Liang et al. 2018) with the Personalized Item Alignment regularizer.

The trainer and the scorer talk to a model through a few methods:

- ``encode(batch, keep_prob)`` -> ``(mu, logvar)``, each float32 [B, d]; with
  ``keep_prob=1.0`` ``logits(mu)`` is the deterministic score used for ranking
- ``logits(z)`` -> float32 [B, I]
- ``loss(batch, beta, lambda_a, phase, step=0)`` -> :class:`LossParts` (training only;
  ``step`` counts the updates made so far, for warmed-up loss weights)
- ``param_groups()`` / ``phases()`` / ``end_phase(phase)``: how one epoch updates which
  parameters (one joint Adam step here; RecVAE alternates encoder and decoder)

:func:`build_model` makes the model a :class:`~piarec.config.ModelConfig` describes.
Input batches are sparse (:class:`SparseBatch`, cut from CSR rows): the first encoder
layer is an ``embedding_bag`` over the user's items, so a [B, I] input is never built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from piarec.config import ModelConfig
from piarec.flows import IAF, log_normal
from piarec.sparse import CSR


@dataclass(frozen=True)
class SparseBatch:
    """Rows of a binary matrix on a device: ``indices`` int64 [nnz], ``offsets`` int64 [B]."""

    indices: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor  # int64 [B]: items per row

    @property
    def size(self) -> int:
        return int(self.offsets.shape[0])

    @classmethod
    def from_csr(cls, csr: CSR, device: torch.device | str = "cpu") -> "SparseBatch":
        return cls(
            torch.from_numpy(csr.indices.astype(np.int64)).to(device),
            torch.from_numpy(csr.indptr[:-1].astype(np.int64)).to(device),
            torch.from_numpy(csr.row_lengths().astype(np.int64)).to(device),
        )

    def row_ids(self) -> torch.Tensor:
        """int64 [nnz]: the row of each entry."""
        return torch.repeat_interleave(torch.arange(self.size, device=self.indices.device), self.lengths)


@dataclass
class LossParts:
    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    align: torch.Tensor


@dataclass(frozen=True)
class Phase:
    """One kind of pass over the training users within an epoch.

    ``group`` names the parameter group whose optimizer steps (the others are frozen),
    ``passes`` how many times the data is traversed, ``keep_prob`` the input masking and
    ``terms`` which loss terms matter ("all", or "nll" when only the decoder learns).
    """

    group: str
    passes: int
    keep_prob: float
    terms: str = "all"


def sparse_first_layer(
    batch: SparseBatch, weight: torch.Tensor, bias: torch.Tensor, keep_prob: float
) -> torch.Tensor:
    """``dropout(normalize(x)) @ weight + bias`` for binary rows x, without building x.

    L2-normalise each row (1/sqrt(|x_u|) per item), drop items with probability
    1 - keep_prob and scale survivors by 1/keep_prob (``nn.Dropout`` after
    ``F.normalize``, as in Liang et al.). ``weight``: float32 [I, H]. Returns [B, H].
    """
    lengths = batch.lengths.clamp(min=1).to(weight.dtype)
    weights = torch.repeat_interleave(lengths.rsqrt(), batch.lengths)
    if keep_prob < 1.0:
        keep = torch.rand(weights.shape, device=weights.device) < keep_prob
        weights = weights * keep / keep_prob
    h = F.embedding_bag(batch.indices, weight, batch.offsets, mode="sum", per_sample_weights=weights)
    return h + bias


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, float32 [B]."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


class MultiVAE(nn.Module):
    """Encoder I -> hidden -> [latent]* -> (mu, logvar) [-> IAF]; decoder latent -> [decoder_hidden] -> I.

    ``encoder="deeper"`` adds two latent-wide tanh layers, ``encoder="iaf"`` adds
    ``flow_steps`` inverse-autoregressive flow steps after the base encoder (the PIA
    paper's appendix D.2). ``anchors`` are the PIA item anchors E [I, d].
    """

    def __init__(self, n_items: int, cfg: ModelConfig):
        super().__init__()
        self.n_items = n_items
        self.cfg = cfg
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
    def encode_base(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, ...]:
        """The Gaussian part: ``mu, logvar`` of q(z0 | x) and the last hidden layer
        (the flows' context), float32 [B, d], [B, d], [B, H]."""
        h = torch.tanh(sparse_first_layer(batch, self.item_in, self.bias_in, keep_prob))
        for layer in self.encoder_extra:
            h = torch.tanh(layer(h))
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar, h

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
        keep_prob = self.cfg.keep_prob if phase is None else phase.keep_prob
        mu, logvar, h = self.encode_base(batch, keep_prob)
        std = torch.exp(0.5 * logvar)
        z0 = mu + std * torch.randn_like(std)
        if self.flow is None:
            z, kl = z0, gaussian_kl(mu, logvar).mean()
        else:
            z, logdet = self.flow(z0, h)
            log_q = log_normal(z0, mu, logvar).sum(dim=1) - logdet
            log_p = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(dim=1)
            kl = (log_q - log_p).mean()
        nll = multinomial_nll(self.logits(z), batch)
        if lambda_a > 0:
            align = alignment_closed_form(mu, logvar, self.anchors, batch).mean()
        else:
            align = torch.zeros((), device=mu.device)
        return LossParts(nll + beta * kl + lambda_a * align, nll, kl, align)

    # -- how an epoch trains it ---------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"all": list(self.parameters())}

    def phases(self) -> list[Phase]:
        return [Phase("all", 1, self.cfg.keep_prob)]

    def end_phase(self, phase: Phase) -> None:
        """Hook after a phase's passes (RecVAE refreshes its prior here)."""


def build_model(n_items: int, cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` describes, freshly initialised, on CPU."""
    if n_items < 1:
        raise ValueError(f"a model needs at least one item, got n_items={n_items}")
    if cfg.backbone == "recvae":
        from piarec.recvae import RecVAE  # noqa: PLC0415 - recvae imports this module

        return RecVAE(n_items, cfg)
    return MultiVAE(n_items, cfg)


class _MultinomialNLL(torch.autograd.Function):
    """-mean_u sum_{i in S_u} log softmax(logits_u)_i with a hand-written backward,
    ``mean_u(|S_u| softmax_u - x_u) / B``: one [B, I] buffer instead of autograd's three
    (logsumexp's gradient, a zero-filled gather gradient, and their sum)."""

    @staticmethod
    def forward(ctx, logits, rows, cols, lengths):
        lse = torch.logsumexp(logits, dim=1)  # [B]
        picked = logits[rows, cols]  # [nnz]
        per_user = torch.zeros_like(lse).index_add_(0, rows, picked) - lengths * lse
        ctx.save_for_backward(logits, lse, rows, cols, lengths)
        return -per_user.mean()

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, rows, cols, lengths = ctx.saved_tensors
        scale = grad_out / logits.shape[0]
        grad = torch.sub(logits, lse[:, None]).exp_().mul_((lengths * scale)[:, None])
        grad.index_put_((rows, cols), (-scale).expand(rows.shape[0]), accumulate=True)
        return grad, None, None, None


def multinomial_nll(logits: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
    """-mean_u sum_{i in S_u} log softmax(logits_u)_i, gathering only at the positives.
    ``logits``: float [B, I]; returns a scalar."""
    return _MultinomialNLL.apply(logits, batch.row_ids(), batch.indices, batch.lengths.to(logits.dtype))


def alignment_closed_form(
    mu: torch.Tensor, logvar: torch.Tensor, anchors: torch.Tensor, batch: SparseBatch
) -> torch.Tensor:
    """Eq. 9 in the closed form of Proposition 3.1, per user, float32 [B]:

        (1/|S|) sum_{i in S} E_q ||z - e_i||^2
          = ||mu - e_bar||^2 + tr Sigma + (1/|S|) sum_i ||e_i||^2 - ||e_bar||^2

    The last two terms are constant in the encoder but not in E, so they are kept:
    gradients reach mu, sigma and the anchors exactly as for Eq. 9.
    """
    centroid = F.embedding_bag(batch.indices, anchors, batch.offsets, mode="mean")  # [B, d]
    sq_norms = anchors.pow(2).sum(dim=1, keepdim=True)  # [I, 1]
    mean_sq = F.embedding_bag(batch.indices, sq_norms, batch.offsets, mode="mean").squeeze(1)
    return (
        (mu - centroid).pow(2).sum(dim=1)
        + logvar.exp().sum(dim=1)
        + mean_sq
        - centroid.pow(2).sum(dim=1)
    )
