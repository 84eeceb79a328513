"""Multi-VAE (Liang et al. 2018) with the Personalized Item Alignment regularizer.

The trainer and the scorer talk to a model through a few methods:

- ``encode(batch, keep_prob)`` -> ``(mu, logvar)``, each float32 [B, d]; with
  ``keep_prob=1.0`` ``logits(mu)`` is the deterministic score used for ranking
- ``logits(z)`` -> float32 [B, I]
- ``loss(batch, beta, lambda_a, phase, step=0)`` -> :class:`LossParts` (training only;
  ``step`` counts the updates made so far, for warmed-up loss weights)
- ``param_groups()`` / ``phases()`` / ``end_phase(phase)``: how one epoch updates which
  parameters (one joint Adam step here; RecVAE alternates encoder and decoder)
- optionally ``encode_dense(x)`` -> ``(mu, logvar)`` for non-negative dense rows x [B, I]
  (a decoder's softmax, say), unmasked: the collapse diagnostics and the latent
  reconstruction term feed the decoder's output back through the encoder with it

:func:`build_model` makes the model a :class:`~piarec.config.ModelConfig` describes.
Input batches are sparse (:class:`SparseBatch`, cut from CSR rows): the first encoder
layer is an ``embedding_bag`` over the user's items, so a [B, I] input is never built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from piarec.config import ModelConfig, RegularizerConfig
from piarec.models.flows import IAF, log_normal
from piarec.data.csr import CSR


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


def dense_first_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``normalize(x) @ weight + bias`` for dense non-negative rows x, float [B, I] -> [B, H].

    The same L2 normalisation the sparse path applies to binary rows, so a binary x gives
    exactly :func:`sparse_first_layer` with ``keep_prob=1``. The encoder is therefore
    invariant to the scale of x: a softmax p and the expected counts |x_u| * p encode alike.
    """
    return F.normalize(x, dim=1) @ weight + bias


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, float32 [B]."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


def gaussian_kl_wide(mu: torch.Tensor, logvar: torch.Tensor, scale: float) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, scale^2 I)) per row, float32 [B]."""
    log_s2 = 2.0 * math.log(scale)
    return 0.5 * ((logvar.exp() + mu.pow(2)) / scale**2 - 1.0 - logvar + log_s2).sum(dim=1)


def warmup_weight(step: int, final: float, warmup_steps: int) -> float:
    """``final * min(1, step / warmup_steps)``: linear from 0 at step 0 to ``final``
    (``final`` from the start when ``warmup_steps`` is 0)."""
    if warmup_steps <= 0:
        return float(final)
    return float(final) * min(1.0, step / warmup_steps)


def swap_items(batch: SparseBatch, n_items: int, fraction: float) -> SparseBatch:
    """A copy of ``batch`` with each entry replaced, with probability ``fraction``, by an
    item drawn uniformly from all ``n_items`` (row lengths unchanged; a drawn item may
    repeat one the row holds, a negligible count bump when rows are short next to I)."""
    swap = torch.rand(batch.indices.shape, device=batch.indices.device) < fraction
    drawn = torch.randint(n_items, batch.indices.shape, device=batch.indices.device)
    return SparseBatch(torch.where(swap, drawn, batch.indices), batch.offsets, batch.lengths)


def sample_from_decoder(logits: torch.Tensor, lengths: torch.Tensor) -> SparseBatch:
    """Histories drawn from the decoder: row u holds ``lengths[u]`` distinct items sampled
    without replacement from softmax(logits_u). ``logits`` [B, I] (not differentiated)."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    n = int(lengths.max().clamp(min=1))
    draws = torch.multinomial(probs, n, replacement=False)  # [B, n]
    keep = torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]
    offsets = torch.cumsum(lengths, 0) - lengths
    return SparseBatch(draws[keep], offsets, lengths.clone())


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
        logits = self.logits(z)
        nll = multinomial_nll(logits, batch)
        if lambda_a > 0:
            align = alignment_closed_form(mu, logvar, self.anchors, batch).mean()
        else:
            align = torch.zeros((), device=mu.device)
        total = nll + beta * kl + lambda_a * align
        reg = self.cfg.regularizers
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
            nc_term = self.noise_contrastive(batch, logits, reg)
            total = total + reg.nc_weight * nc_term
        return LossParts(total, nll, kl, align, lr_term, nc_term)

    def noise_contrastive(self, batch: SparseBatch, logits: torch.Tensor, reg: RegularizerConfig) -> torch.Tensor:
        """NC-VAE's contrastive term, mean over the batch: KL(q(z0 | x~) || N(0, K^2 I)) of
        contrastive histories x~ (random item swaps, or draws from the current decoder).
        The base Gaussian is used with the IAF encoder (closed form); the corrupted input is
        not masked again."""
        if reg.nc_noise == "swap":
            noisy = swap_items(batch, self.n_items, reg.nc_swap_fraction)
        else:
            noisy = sample_from_decoder(logits, batch.lengths)
        mu, logvar, _ = self.encode_base(noisy, 1.0)
        return gaussian_kl_wide(mu, logvar, reg.nc_prior_scale).mean()

    # -- how an epoch trains it ---------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"all": list(self.parameters())}

    def phases(self) -> list[Phase]:
        return [Phase("all", 1, self.cfg.keep_prob)]

    def end_phase(self, phase: Phase) -> None:
        """Hook after a phase's passes (RecVAE refreshes its prior here)."""


def latent_reconstruction(model: nn.Module, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """LRVAE's term, mean over rows: ||mu_enc(softmax(logits)) - z||^2 with ``logits`` =
    ``model.logits(z)``, float [B, I], and ``z`` [B, d].

    ``z`` is a target (detached): the term trains the encoder and decoder so that
    encode(decode(z)) returns z, and cannot be lowered by moving the posterior samples
    themselves toward a fixed point of that map, which would favour collapse.
    """
    mu_back, _ = model.encode_dense(torch.softmax(logits, dim=1))
    return (mu_back - z.detach()).pow(2).sum(dim=1).mean()


def build_model(n_items: int, cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` describes, freshly initialised, on CPU."""
    if n_items < 1:
        raise ValueError(f"a model needs at least one item, got n_items={n_items}")
    if cfg.backbone == "recvae":  # (ModelConfig refuses regularizers for RecVAE)
        from piarec.models.recvae import RecVAE  # noqa: PLC0415 - recvae imports this module

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
