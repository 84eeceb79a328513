"""Model diagnostics on held-out users: active latent units (posterior collapse).

A latent dimension is **active** when the variance over users of its posterior mean
exceeds 0.01 (Burda et al. 2016's activity statistic, A_d = Var_x(E_q[z_d | x])).
A collapsed posterior ignores its input: its means barely move between users, so few
or no units are active. The promotion gate refuses a model whose active units fall
below ``gate.min_active_units``; the collapse diagnostics build on this same module.
"""

from __future__ import annotations

import numpy as np
import torch

from piarec.model import SparseBatch
from piarec.sparse import CSR

ACTIVE_VARIANCE = 0.01  # a unit is active when Var over users of its posterior mean > this


@torch.inference_mode()
def posterior_means(model: torch.nn.Module, rows: CSR, batch_size: int = 2000) -> np.ndarray:
    """float32 [U, d]: ``mu`` of ``model.encode(rows, keep_prob=1.0)`` for every row.

    ``model`` is any model of the contract in :mod:`piarec.model` (``encode`` returns
    ``(mu, logvar)``); ``rows`` is a CSR [U, I] in the model's item space.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, rows.n_rows, batch_size):
            part = rows.take_rows(np.arange(start, min(start + batch_size, rows.n_rows)))
            mu, _ = model.encode(SparseBatch.from_csr(part, device), keep_prob=1.0)
            out.append(mu.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("posterior means need at least one user")
    return np.concatenate(out)


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
