"""Multi-VAE (Liang et al. 2018) with the Personalized Item Alignment regularizer.

The trainer and the scorer talk to a model through three methods:

- ``encode(batch, keep_prob)`` -> ``(mu, logvar)``, each float32 [B, d]
- ``logits(z)`` -> float32 [B, I]
- ``loss(batch, targets, beta, lambda_a)`` -> :class:`LossParts` (training only)

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


class MultiVAE(nn.Module):
    """Encoder I -> hidden -> [latent]* -> (mu, logvar); decoder latent -> [decoder_hidden] -> I.

    ``encoder_depth`` extra latent-wide tanh layers give the "deeper" encoder of the
    PIA paper's appendix D.2. ``anchors`` are the PIA item anchors E [I, d].
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
        self.to_stats = nn.Linear(d if extra else h, 2 * d)
        dims = [d, *cfg.decoder_hidden, n_items]
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.anchors = nn.Parameter(torch.empty(n_items, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-normal weights and N(0, 0.001) biases, as in Liang et al.'s reference code.
        fan_in, fan_out = self.n_items, self.item_in.shape[1]
        nn.init.normal_(self.item_in, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        nn.init.normal_(self.bias_in, 0.0, 0.001)
        for layer in [*self.encoder_extra, self.to_stats, *self.decoder]:
            nn.init.xavier_normal_(layer.weight)
            nn.init.normal_(layer.bias, 0.0, 0.001)
        nn.init.normal_(self.anchors, 0.0, 0.01)

    # -- the model contract ---------------------------------------------------------
    def encode(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalise each row, drop items with probability 1 - keep_prob (survivors
        scaled by 1/keep_prob, as ``nn.Dropout`` after ``F.normalize`` in Liang et al.),
        then the MLP. Returns ``mu, logvar``: float32 [B, d]."""
        lengths = batch.lengths.clamp(min=1).to(torch.float32)
        weights = torch.repeat_interleave(lengths.rsqrt(), batch.lengths)
        indices, offsets = batch.indices, batch.offsets
        if keep_prob < 1.0:
            keep = torch.rand(weights.shape, device=weights.device) < keep_prob
            weights = weights * keep / keep_prob
        h = F.embedding_bag(indices, self.item_in, offsets, mode="sum", per_sample_weights=weights)
        h = torch.tanh(h + self.bias_in)
        for layer in self.encoder_extra:
            h = torch.tanh(layer(h))
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised item scores, float32 [B, I]."""
        for layer in self.decoder[:-1]:
            z = torch.tanh(layer(z))
        return self.decoder[-1](z)

    def loss(self, batch: SparseBatch, beta: float, lambda_a: float) -> LossParts:
        """Eq. 8 of the PIA paper: multinomial NLL + beta * KL + lambda_A * alignment,
        each averaged over the batch. Targets are the batch's own (unmasked) items."""
        mu, logvar = self.encode(batch, self.cfg.keep_prob)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn_like(std)
        logits = self.logits(z)
        nll = multinomial_nll(logits, batch)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
        if lambda_a > 0:
            align = alignment_closed_form(mu, logvar, self.anchors, batch).mean()
        else:
            align = torch.zeros((), device=mu.device)
        return LossParts(nll + beta * kl + lambda_a * align, nll, kl, align)


def multinomial_nll(logits: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
    """-mean_u sum_{i in S_u} log softmax(logits_u)_i, gathering only at the positives."""
    lse = torch.logsumexp(logits, dim=1)  # [B]
    rows = batch.row_ids()
    picked = logits[rows, batch.indices]  # [nnz]
    per_user = torch.zeros_like(lse).index_add_(0, rows, picked) - batch.lengths * lse
    return -per_user.mean()


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
