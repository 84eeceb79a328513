"""Ranking metrics of the strong-generalization protocol (Liang et al. 2018).

All functions take a top-K ranking ``topk`` (int [U, >=K], best first) and the held-out
items as a :class:`CSR` with the same rows, and return float64 [U] per-user values.
"""

from __future__ import annotations

import numpy as np

from piarec.data.csr import CSR


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
    hits = _hits(topk, held_out, k)  # [U, min(k, ranked items)]: a small catalogue ranks fewer
    dcg = (hits * discounts[: hits.shape[1]]).sum(axis=1)
    n = held_out.row_lengths()
    idcg = np.cumsum(discounts)[np.clip(np.minimum(k, n) - 1, 0, None)]
    return np.where(n > 0, dcg / idcg, np.nan)


# The ranking evaluation reads: its longest cut-off. Apart from the serving top-K
# (scoring.k): evaluation ranks EVAL_K items whatever the daily job serves.
EVAL_K = 100
SELECTION_METRIC = "ndcg_at_100"  # picks the best epoch and the best EASE lambda


def summarize(topk: np.ndarray, held_out: CSR) -> dict[str, float]:
    """The protocol's headline numbers: Recall@20, Recall@50, NDCG@100 (means over users
    with at least one held-out item)."""
    return {
        "recall_at_20": float(np.nanmean(recall_at_k(topk, held_out, 20))),
        "recall_at_50": float(np.nanmean(recall_at_k(topk, held_out, 50))),
        "ndcg_at_100": float(np.nanmean(ndcg_at_k(topk, held_out, EVAL_K))),
    }


# The paper's Table 3 groups of users by number of interactions (inclusive bounds).
PAPER_GROUPS: tuple[tuple[int, int | None], ...] = ((5, 10), (11, 50), (51, 100), (101, None))


def per_user_metrics(topk: np.ndarray, held_out: CSR) -> dict[str, np.ndarray]:
    """The headline metrics per user, float64 [U] each (nan for users with nothing held out)."""
    return {
        "recall_at_20": recall_at_k(topk, held_out, 20),
        "recall_at_50": recall_at_k(topk, held_out, 50),
        "ndcg_at_100": ndcg_at_k(topk, held_out, EVAL_K),
    }


def interaction_groups(
    counts: np.ndarray, min_users: int = 10, n_quantiles: int = 4
) -> list[tuple[str, np.ndarray]]:
    """Groups of users by interaction count: ``[(label, bool mask [U]), ...]``.

    The paper's groups [5-10], [11-50], [51-100], [100+] when each holds at least
    ``min_users`` users; otherwise ``n_quantiles`` quantile groups of ``counts`` (the data
    lacks the paper's spread, e.g. MovieLens-100K has no user under 20 ratings).
    """
    counts = np.asarray(counts, dtype=np.int64)

    def bounded(lo: int, hi: int | None) -> np.ndarray:
        return (counts >= lo) & (counts <= (hi if hi is not None else np.iinfo(np.int64).max))

    paper = [(f"[{lo}-{hi}]" if hi else f"[{lo - 1}+]", bounded(lo, hi)) for lo, hi in PAPER_GROUPS]
    if all(mask.sum() >= min_users for _, mask in paper) or len(counts) == 0:
        return paper
    edges = np.unique(np.quantile(counts, np.linspace(0, 1, n_quantiles + 1)).round().astype(np.int64))
    groups = []
    for j in range(len(edges) - 1):
        lo = int(edges[j]) if j == 0 else int(edges[j]) + 1
        hi = int(edges[j + 1])
        if lo <= hi:
            groups.append((f"[{lo}-{hi}]", bounded(lo, hi)))
    return groups


def summarize_groups(
    per_user: dict[str, np.ndarray], groups: list[tuple[str, np.ndarray]]
) -> list[dict[str, float | str | int]]:
    """Mean of each per-user metric within each group (users with no held-out items skipped)."""
    rows = []
    for label, mask in groups:
        row: dict[str, float | str | int] = {"group": label, "users": int(mask.sum())}
        for name, values in per_user.items():
            v = values[mask]
            row[name] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        rows.append(row)
    return rows
