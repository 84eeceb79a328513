"""Paired comparison of two models on the same test users.

Given per-user metric values of model A and model B for the same users (one row per
seed when several training seeds were run, seeds paired by index), report the mean
difference B - A and the relative change B / A - 1 with percentile bootstrap confidence
intervals. Each bootstrap replicate resamples seeds and users with replacement (a
two-level bootstrap), so the interval covers both user sampling and seed variance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedComparison:
    mean_a: float
    mean_b: float
    diff: float  # mean(B) - mean(A)
    diff_low: float
    diff_high: float
    rel: float  # mean(B) / mean(A) - 1
    rel_low: float
    rel_high: float
    n_users: int
    n_seeds: int
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _as_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[None, :] if x.ndim == 1 else x


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> PairedComparison:
    """Compare per-user values ``a`` and ``b``: float [U] or [S, U] (S seeds, same users).

    Users whose value is not finite in any seed of either model (e.g. no held-out items)
    are left out. Raises ValueError when the shapes differ or no user is left.
    """
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (seeds x users), got {a.shape} and {b.shape}")
    keep = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    a, b = a[:, keep], b[:, keep]
    n_seeds, n_users = a.shape
    if n_users == 0:
        raise ValueError("no user has a finite value in both models")
    rng = np.random.default_rng(seed)
    # Resampling as multiplicities: user counts [n_boot, U], seed counts [n_boot, S].
    user_w = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot) / n_users
    seed_w = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot) / n_seeds
    boot_a = ((a @ user_w.T).T * seed_w).sum(axis=1)
    boot_b = ((b @ user_w.T).T * seed_w).sum(axis=1)
    tail = 100 * (1 - confidence) / 2
    diff_lo, diff_hi = np.percentile(boot_b - boot_a, [tail, 100 - tail])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_lo, rel_hi = np.percentile(boot_b / boot_a - 1, [tail, 100 - tail])
    mean_a, mean_b = float(a.mean()), float(b.mean())
    return PairedComparison(
        mean_a, mean_b, mean_b - mean_a, float(diff_lo), float(diff_hi),
        mean_b / mean_a - 1 if mean_a else float("nan"), float(rel_lo), float(rel_hi),
        int(n_users), int(n_seeds), confidence,
    )
