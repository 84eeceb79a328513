"""The model contract: what the trainer, the scorer, the diagnostics and the bundle may
ask of a model, and the batch and loss types they exchange.

A model (:class:`~piarec.models.multivae.MultiVAE`, :class:`~piarec.models.recvae.RecVAE`)
is a ``torch.nn.Module`` that implements :class:`RecommenderModel`. Callers use these
methods and nothing else of a model's attributes.

Input batches are sparse (:class:`SparseBatch`, cut from CSR rows): the first encoder
layer is an ``embedding_bag`` over the user's items, so a [B, I] input is never built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from piarec.config import ModelConfig
from piarec.data.csr import CSR
from piarec.models.noise import KeyedNoise

__all__ = ["SparseBatch", "LossParts", "Phase", "RecommenderModel"]


@dataclass(frozen=True)
class SparseBatch:
    """Rows of a binary matrix on a device: ``indices`` int64 [nnz], ``offsets`` int64 [B]."""

    indices: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor  # int64 [B]: items per row
    # Counter-based draws keyed by user (piarec.models.noise.KeyedNoise); None = torch's generator.
    noise: KeyedNoise | None = None

    @property
    def size(self) -> int:
        return int(self.offsets.shape[0])

    @classmethod
    def from_csr(cls, csr: CSR, device: torch.device | str = "cpu", users: np.ndarray | None = None,
                 stream: int | None = None) -> "SparseBatch":
        """The rows of ``csr`` on ``device``; with ``users`` (global ids of the rows) and
        ``stream``, their random draws are keyed by user (:class:`KeyedNoise`)."""
        noise = None
        if users is not None:
            noise = KeyedNoise(int(stream or 0), torch.from_numpy(np.asarray(users, dtype=np.int64)).to(device))
        return cls(
            torch.from_numpy(csr.indices.astype(np.int64)).to(device),
            torch.from_numpy(csr.indptr[:-1].astype(np.int64)).to(device),
            torch.from_numpy(csr.row_lengths().astype(np.int64)).to(device),
            noise,
        )

    def row_ids(self) -> torch.Tensor:
        """int64 [nnz]: the row of each entry."""
        return torch.repeat_interleave(torch.arange(self.size, device=self.indices.device), self.lengths)


def _zero() -> torch.Tensor:
    return torch.zeros(())


@dataclass
class LossParts:
    """The loss and its terms (scalars). ``total`` is what is minimised; the optional
    regularizers' unweighted values are zero when they are switched off."""

    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    align: torch.Tensor
    latent_recon: torch.Tensor = field(default_factory=_zero)
    noise_contrastive: torch.Tensor = field(default_factory=_zero)


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


@runtime_checkable
class RecommenderModel(Protocol):
    """A latent-variable recommender over ``n_items`` titles.

    - ``encode(batch, keep_prob)`` -> ``(mu, logvar)``, float32 [B, d]: the posterior
      q(z | x); with ``keep_prob=1.0`` ``logits(mu)`` is the deterministic score used for
      ranking (the scorer, evaluation and the gate all rank by it).
    - ``gaussian_posterior(batch, keep_prob)`` -> ``(mu, logvar)`` of the Gaussian part of
      the posterior (q(z0 | x) before any flow; the posterior itself otherwise): where PIA's
      alignment and the mask-stability diagnostic act.
    - ``posterior_moments(batch, samples)`` -> ``(mean, logvar)`` float [B, d] of q(z | x)
      for the latent the decoder reads (z_T after a flow), unmasked: exact for a Gaussian
      posterior, else the moments of ``samples`` draws (global RNG). The collapse
      diagnostics read it.
    - ``kl_to_prior(batch, samples)`` -> float [B]: KL(q(z | x) || p(z)) against the model's
      own prior (N(0, I); RecVAE's composite prior), unmasked: the closed form where one
      exists, else a Monte Carlo estimate from ``samples`` draws.
    - ``encode_dense(x)`` -> ``(mu, logvar)`` for non-negative dense rows x float [B, I]
      (a decoder's softmax, say), unmasked, L2-normalised like binary input.
    - ``logits(z)`` -> float32 [B, I].
    - ``loss(batch, beta, lambda_a, phase, step)`` -> :class:`LossParts` (training only;
      ``step`` counts the updates made so far, for warmed-up loss weights).
    - ``param_groups()`` / ``phases()`` / ``end_phase(phase)``: how one epoch updates which
      parameters (one joint Adam step for Multi-VAE; RecVAE alternates).
    - ``item_anchors()`` -> the PIA anchors E float [I, d], or None for a model without.
    - ``affine_decoder()`` -> the decoder as one ``nn.Linear`` when ``logits(z)`` is a
      single affine map of z (the bf16 scoring pass needs its weights), else None.
    - ``config``: the :class:`~piarec.config.ModelConfig` it was built from (the bundle
      writes it, :func:`piarec.models.factory.build_model` rebuilds from it).
    """

    n_items: int
    config: ModelConfig

    def encode(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]: ...

    def gaussian_posterior(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]: ...

    def posterior_moments(self, batch: SparseBatch, samples: int = 32) -> tuple[torch.Tensor, torch.Tensor]: ...

    def kl_to_prior(self, batch: SparseBatch, samples: int = 32) -> torch.Tensor: ...

    def encode_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def logits(self, z: torch.Tensor) -> torch.Tensor: ...

    def loss(self, batch: SparseBatch, beta: float, lambda_a: float, phase: Phase | None = None,
             step: int = 0) -> LossParts: ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def phases(self) -> list[Phase]: ...

    def end_phase(self, phase: Phase) -> None: ...

    def item_anchors(self) -> torch.Tensor | None: ...

    def affine_decoder(self) -> nn.Linear | None: ...
