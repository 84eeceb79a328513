"""Posterior-collapse diagnostics on held-out users: one implementation for the trainer,
the promotion gate and the reports.

- **Active units**: a latent dimension is active when the variance over users of its
  posterior mean exceeds 0.01 (Burda et al. 2016, A_d = Var_x(E_q[z_d | x])). A collapsed
  posterior ignores its input: its means barely move between users.
- **KL to the prior**: in total to the model's own prior, and per dimension to N(0, 1).
- **Mutual information** I(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)], q(z) the mixture of
  the sampled users' posteriors; it lies in [0, log N] for N users.
- **Self-consistency**: ||mu(softmax(logits(z))) - z||^2, the decoder's output distribution
  fed back through the encoder (L2-normalised like any input, so the scale of the softmax
  does not matter); zero when the encoder inverts the decoder.
- **IMA contrast** of z -> softmax(logits(z)) (Gresele et al. 2021): sum_j log ||J_j|| -
  1/2 log det J^T J >= 0 (Hadamard), 0 iff the Jacobian's columns are orthogonal. The raw
  logits are not used: their Jacobian is constant for a linear decoder.
- **Mask stability** (Proposition 3.2 of the PIA paper): over R input masks of a user, the
  variance of the posterior mean and its mean squared distance to the user's item-anchor
  centroid; PIA should shrink both.

Every figure is taken on the latent the decoder reads and against the prior that training
uses. With the IAF encoder that latent is z_T, whose posterior has no closed form: active
units use the mean of ``samples`` draws of z_T, the KL is the Monte Carlo mean of log q(z_T | x)
- log p(z_T) (exact in expectation), and the per-dimension KL and the mutual information use
the Gaussian with the draws' mean and per-dimension variance (an approximation: the flow's
posterior is neither Gaussian nor factorised). RecVAE's posterior is Gaussian, so those
are exact for it, but its prior is the composite one: ``kl_mean`` is the Monte Carlo KL to
that prior, while the per-dimension KL (``kl_dims_active``) stays against N(0, 1). Mask
stability reads the Gaussian q(z0 | x) (``gaussian_posterior``), where PIA's alignment acts.
:func:`collapse_metrics` is the entry point; it is deterministic for a seed and leaves the
model's mode and the global RNG state as it found them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from piarec.config import DiagnosticsConfig
from piarec.models.contract import SparseBatch
from piarec.data.csr import CSR

ACTIVE_VARIANCE = 0.01  # a unit is active when Var over users of its posterior mean > this
POSTERIOR_SAMPLES = 32  # draws per user where q(z | x) has no closed form (after a flow; RecVAE's KL)


# --------------------------------------------------------------------------- encoding
@torch.inference_mode()
def posterior_means(model: torch.nn.Module, rows: CSR, batch_size: int = 2000) -> np.ndarray:
    """float32 [U, d]: ``mu`` of ``model.encode(rows, keep_prob=1.0)`` for every row.

    ``model`` is any model of the contract in :mod:`piarec.models.contract` (``encode`` returns
    ``(mu, logvar)``); ``rows`` is a CSR [U, I] in the model's item space.
    """
    (mu,) = _encode_rows(model, rows, batch_size, lambda b: (model.encode(b, keep_prob=1.0)[0].float(),))
    return mu


@torch.inference_mode()
def posterior_gaussians(model: torch.nn.Module, rows: CSR, batch_size: int = 2000,
                        samples: int = POSTERIOR_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """float64 [U, d] each: ``mean, logvar`` of q(z | x) for the latent the decoder reads
    (``model.posterior_moments``, unmasked): the posterior itself when it is Gaussian, the
    moments of ``samples`` draws of z_T after a flow."""
    mu, logvar = _encode_rows(model, rows, batch_size, lambda b: model.posterior_moments(b, samples))
    return mu.astype(np.float64), logvar.astype(np.float64)


@torch.inference_mode()
def kl_to_prior(model: torch.nn.Module, rows: CSR, batch_size: int = 2000,
                samples: int = POSTERIOR_SAMPLES) -> np.ndarray:
    """float64 [U]: KL(q(z | x) || p(z)) of each row against the model's own prior
    (``model.kl_to_prior``: closed form, or a Monte Carlo estimate from ``samples`` draws)."""
    (kl,) = _encode_rows(model, rows, batch_size, lambda b: (model.kl_to_prior(b, samples),))
    return kl.astype(np.float64)


def _encode_rows(model: torch.nn.Module, rows: CSR, batch_size: int,
                 fn: Callable[[SparseBatch], tuple[torch.Tensor, ...]]) -> tuple[np.ndarray, ...]:
    """``fn`` of every batch of ``rows`` in eval mode, each output concatenated over rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[tuple[np.ndarray, ...]] = []
    try:
        for start in range(0, rows.n_rows, batch_size):
            part = rows.take_rows(np.arange(start, min(start + batch_size, rows.n_rows)))
            parts.append(tuple(t.cpu().numpy() for t in fn(SparseBatch.from_csr(part, device))))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("posterior means need at least one user")
    return tuple(np.concatenate(col) for col in zip(*parts))


# --------------------------------------------------------------------------- statistics
def unit_variances(mu: np.ndarray) -> np.ndarray:
    """float64 [d]: the variance over users (rows) of each posterior-mean column."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[0] < 2:
        raise ValueError(f"need posterior means of shape [users >= 2, d], got {mu.shape}")
    return mu.var(axis=0)


def active_units(mu: np.ndarray, threshold: float = ACTIVE_VARIANCE) -> int:
    """Number of latent dimensions whose posterior-mean variance over users exceeds
    ``threshold`` (default 0.01). Non-finite variances count as inactive."""
    var = unit_variances(mu)
    return int(np.count_nonzero(np.isfinite(var) & (var > threshold)))


def kl_per_dim(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """float64 [d]: mean over users of KL(N(mu_d, exp(logvar_d)) || N(0, 1)) per dimension.
    Its sum is the mean KL to the prior; a collapsed dimension has KL 0."""
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    return (-0.5 * (1.0 + logvar - mu**2 - np.exp(logvar))).mean(axis=0)


def kl_per_dimension(model: torch.nn.Module, rows: CSR, batch_size: int = 2000) -> np.ndarray:
    """float64 [d]: :func:`kl_per_dim` of ``model``'s posteriors of ``rows`` (for reports)."""
    return kl_per_dim(*posterior_gaussians(model, rows, batch_size))


def mutual_information(mu: np.ndarray, logvar: np.ndarray, rng: np.random.Generator) -> float:
    """I(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)] for N users' Gaussian posteriors
    ``mu, logvar`` float [N, d], with q(z) = (1/N) sum_v q(z | x_v) and one sample z_u ~
    q(z | x_u) per user. Bounded by log N; 0 when all posteriors are equal.

    The N x N log-densities come from three matrix products (the quadratic form
    expanded), in float64, so no [N, N, d] tensor is built.
    """
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    n, d = mu.shape
    if n < 2:
        raise ValueError("mutual information needs at least two users")
    z = mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape)
    prec = np.exp(-logvar)  # [N, d]
    # log N(z_u; mu_v, s_v^2) = -1/2 [sum z^2 p_v - 2 z.(mu_v p_v) + sum mu_v^2 p_v + sum logvar_v + d log 2pi]
    quad = (z**2) @ prec.T - 2.0 * z @ (mu * prec).T + ((mu**2) * prec).sum(axis=1)[None, :]
    log_dens = -0.5 * (quad + logvar.sum(axis=1)[None, :] + d * math.log(2 * math.pi))  # [u, v]
    log_own = np.diagonal(log_dens)
    m = log_dens.max(axis=1, keepdims=True)
    log_mix = (m[:, 0] + np.log(np.exp(log_dens - m).sum(axis=1))) - math.log(n)
    return float(np.mean(log_own - log_mix))


def ima_contrast(jacobian: torch.Tensor) -> float:
    """sum_j log ||J_j|| - 1/2 log det J^T J of one Jacobian [out, d] (columns J_j).

    Non-negative (Hadamard's inequality), 0 exactly when the columns are orthogonal; inf
    when J^T J is singular (a column is zero or the columns are dependent).
    """
    j = jacobian.detach().double()
    gram = j.T @ j
    sign, logdet = torch.linalg.slogdet(gram)
    if sign <= 0:
        return math.inf
    return float(0.5 * (torch.log(torch.diagonal(gram)).sum() - logdet))


def batched_jacobian(f: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """Jacobian [out, d] at ``v`` [d] of a row-wise map ``f`` ([B, d] -> [B, out]).

    Forward mode by the double-VJP trick on a batch of d copies of ``v``: g = w^T J per
    copy, then d(g_b . e_b)/dw = J e_b. Plain reverse-mode autograd, so it costs one
    batched forward and two backwards, with none of the one-off start-up (over a second
    on CPU) of forward-mode AD or ``torch.func``. Memory O(d * out).
    """
    d = v.shape[0]
    with torch.enable_grad():
        batch = v.detach().expand(d, d).clone().requires_grad_(True)
        out = f(batch)  # [d, out]
        w = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, batch, w, create_graph=True)  # row b: w_b^T J
        (jt,) = torch.autograd.grad(g, w, torch.eye(d, dtype=g.dtype, device=g.device))  # row b: J e_b
    return jt.T.detach()


def map_ima_contrast(f: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> np.ndarray:
    """float64 [P]: :func:`ima_contrast` of the Jacobian of a row-wise map ``f`` ([B, d] ->
    [B, out]) at each row of ``points`` [P, d], one point at a time."""
    return np.asarray([ima_contrast(batched_jacobian(f, v)) for v in points], dtype=np.float64)


def decoder_ima_contrast(model: torch.nn.Module, z: torch.Tensor) -> np.ndarray:
    """float64 [P]: IMA contrast of z -> softmax(logits(z)) at each latent of ``z`` [P, d].

    The logits' Jacobian J_L [I, d] comes from :func:`batched_jacobian` (one latent at a
    time); the softmax's is applied in closed form, J = (diag p - p p^T) J_L, exact and
    cheaper than differentiating through the softmax.
    """
    out = []
    for v in z:
        jl = batched_jacobian(model.logits, v)
        with torch.no_grad():
            p = torch.softmax(model.logits(v[None, :])[0], dim=0)
            out.append(ima_contrast(p[:, None] * (jl - (p @ jl)[None, :])))
    return np.asarray(out, dtype=np.float64)


def self_consistency(model: torch.nn.Module, z: torch.Tensor) -> np.ndarray:
    """float64 [P]: ||mu(softmax(logits(z))) - z||^2 per latent of ``z`` [P, d].

    ``model.encode_dense`` reads the softmax as a dense input, L2-normalised exactly as a
    binary history is (the encoder is scale-invariant, so it equals encoding the expected
    counts |x| * softmax). Raises AttributeError for a model without ``encode_dense``.
    """
    with torch.no_grad():
        back, _ = model.encode_dense(torch.softmax(model.logits(z), dim=1))
        return (back - z).pow(2).sum(dim=1).double().cpu().numpy()


def mask_stability(
    model: torch.nn.Module, rows: CSR, keep_prob: float, repeats: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Proposition 3.2 measured on ``rows`` [U, I]: per user, the variance of the posterior
    mean over ``repeats`` input masks at ``keep_prob`` (summed over dimensions, i.e. the trace
    of the covariance, unbiased over masks), and the mean over masks of ||mu - e_bar||^2 with
    e_bar the mean of the model's ``anchors`` over the user's items (None without anchors).
    Draws the masks from the global torch RNG. Returns float64 [U] arrays.
    """
    device = next(model.parameters()).device
    u = rows.n_rows
    rep = rows.take_rows(np.repeat(np.arange(u), repeats))
    with torch.no_grad():
        mu, _ = model.gaussian_posterior(SparseBatch.from_csr(rep, device), keep_prob)
        mu = mu.double().reshape(u, repeats, -1)
        var = mu.var(dim=1, unbiased=True).sum(dim=1).cpu().numpy()
        anchors = model.item_anchors()
        if anchors is None:
            return var, None
        batch = SparseBatch.from_csr(rows, device)
        centroid = torch.nn.functional.embedding_bag(batch.indices, anchors, batch.offsets, mode="mean").double()
        dist = (mu - centroid[:, None, :]).pow(2).sum(dim=2).mean(dim=1).cpu().numpy()
    return var, dist


# --------------------------------------------------------------------------- entry point
def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def diagnosable(rows: CSR) -> bool:
    """True when ``rows`` hold at least two users with items: what :func:`collapse_metrics`
    needs (a variance, a mixture of posteriors)."""
    return int(np.count_nonzero(rows.row_lengths())) >= 2


def collapse_metrics(model: torch.nn.Module, rows: CSR, cfg: DiagnosticsConfig, *, seed: int = 0) -> dict[str, float]:
    """The collapse diagnostics of ``model`` on the users of ``rows`` (CSR [U, I], e.g. the
    validation fold-in), as flat MLflow-safe keys:

    ``active_units``, ``latent_dim``, ``kl_mean`` (mean KL to the model's prior, nats per
    user), ``kl_dims_active`` (dimensions with mean KL to N(0, 1) > 0.01), ``mutual_info`` (nats; bounded by
    ``mutual_info_bound`` = log N), ``self_consistency``, ``ima_contrast`` (mean over the
    sampled users of finite values), ``mask_variance`` and ``mask_anchor_dist``.

    Users are sampled per ``cfg`` (rows with no items are skipped). A metric that does not
    apply to the model (no ``encode_dense``, no ``anchors``, ``cfg`` sample size 0) is left
    out. Deterministic for ``seed``; the model's train/eval mode and the global torch RNG
    state are restored on return.
    """
    if not diagnosable(rows):
        raise ValueError(f"collapse metrics need at least two users with items, got "
                         f"{np.count_nonzero(rows.row_lengths())}")
    nonempty = np.flatnonzero(rows.row_lengths() > 0)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            users = rows.take_rows(nonempty[_sample(len(nonempty), cfg.users, rng)])
            mu, logvar = posterior_gaussians(model, users, samples=cfg.posterior_samples)
            per_dim = kl_per_dim(mu, logvar)
            out["active_units"] = float(active_units(mu))
            out["latent_dim"] = float(mu.shape[1])
            out["kl_mean"] = float(kl_to_prior(model, users, samples=cfg.posterior_samples).mean())
            out["kl_dims_active"] = float(np.count_nonzero(per_dim > ACTIVE_VARIANCE))
            out["mutual_info"] = mutual_information(mu, logvar, rng)
            out["mutual_info_bound"] = math.log(len(mu))

            pick = _sample(len(mu), cfg.self_consistency_users, rng)
            z = torch.from_numpy(posterior_means(model, users.take_rows(pick))).to(device)
            out["self_consistency"] = float(self_consistency(model, z).mean())
            if cfg.jacobian_users > 0:
                ima = decoder_ima_contrast(model, z[: cfg.jacobian_users])
                finite = ima[np.isfinite(ima)]
                out["ima_contrast"] = float(finite.mean()) if len(finite) else float("nan")

            if cfg.mask_users > 0:
                keep = cfg.mask_keep_prob if cfg.mask_keep_prob is not None else _train_keep_prob(model)
                masked = users.take_rows(_sample(users.n_rows, cfg.mask_users, rng))
                var, dist = mask_stability(model, masked, keep, cfg.mask_repeats)
                out["mask_keep_prob"] = float(keep)
                out["mask_variance"] = float(var.mean())
                if dist is not None:
                    out["mask_anchor_dist"] = float(dist.mean())
    finally:
        model.train(was_training)
    return out


def _train_keep_prob(model: torch.nn.Module) -> float:
    """The input keep probability the model trains its encoder with."""
    return float(model.phases()[0].keep_prob)
