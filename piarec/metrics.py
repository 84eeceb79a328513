"""Ranking metrics of the strong-generalization protocol (Liang et al. 2018).

All functions take a top-K ranking ``topk`` (int [U, >=K], best first) and the held-out
items as a :class:`CSR` with the same rows, and return float64 [U] per-user values.
"""

from __future__ import annotations

import numpy as np

from piarec.sparse import CSR


def _hits(topk: np.ndarray, held_out: CSR, k: int) -> np.ndarray:
    """bool [U, k]: whether the item at each rank is a held-out item of that user."""
    topk = np.asarray(topk, dtype=np.int64)[:, :k]
    n_cols = np.int64(held_out.n_cols)
    rows = np.repeat(np.arange(held_out.n_rows, dtype=np.int64), held_out.row_lengths())
    held_keys = rows * n_cols + held_out.indices
    # Padding (-1) in topk maps to a key no held-out pair can have.
    top_keys = np.where(topk >= 0, np.arange(len(topk))[:, None] * n_cols + topk, -1)
    return np.isin(top_keys, held_keys)


def recall_at_k(topk: np.ndarray, held_out: CSR, k: int) -> np.ndarray:
    """Hits in the top k divided by min(k, number of held-out items)."""
    n = held_out.row_lengths()
    denom = np.minimum(k, n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, _hits(topk, held_out, k).sum(axis=1) / np.maximum(denom, 1), np.nan)


def ndcg_at_k(topk: np.ndarray, held_out: CSR, k: int) -> np.ndarray:
    """Binary-relevance NDCG@k: DCG = sum 1/log2(rank + 1); IDCG puts min(k, n) hits first."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (_hits(topk, held_out, k) * discounts).sum(axis=1)
    n = held_out.row_lengths()
    idcg = np.cumsum(discounts)[np.clip(np.minimum(k, n) - 1, 0, None)]
    return np.where(n > 0, dcg / idcg, np.nan)


def summarize(topk: np.ndarray, held_out: CSR) -> dict[str, float]:
    """The protocol's headline numbers: Recall@20, Recall@50, NDCG@100 (means over users
    with at least one held-out item)."""
    return {
        "recall_at_20": float(np.nanmean(recall_at_k(topk, held_out, 20))),
        "recall_at_50": float(np.nanmean(recall_at_k(topk, held_out, 50))),
        "ndcg_at_100": float(np.nanmean(ndcg_at_k(topk, held_out, 100))),
    }
