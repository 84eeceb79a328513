"""The evaluation protocol: fold-in items go in, held-out items are ranked among the rest.

Items a user folded in are excluded from the ranking (they are known), exactly as in
Liang et al.'s strong-generalization protocol.
"""

from __future__ import annotations

import numpy as np
import torch

from typing import Callable

from piarec.evaluate.metrics import per_user_metrics, summarize
from piarec.models.contract import SparseBatch
from piarec.data.snapshot import Split
from piarec.data.csr import CSR


def _mask_known(scores: torch.Tensor, known: CSR) -> None:
    rows = torch.from_numpy(np.repeat(np.arange(known.n_rows), known.row_lengths()))
    scores[rows, torch.from_numpy(known.indices.astype(np.int64))] = -torch.inf


@torch.inference_mode()
def scores_topk(
    score: Callable[[CSR], torch.Tensor], fold_in: CSR, k: int = 100, batch_size: int = 2000
) -> np.ndarray:
    """int64 [U, k]: the top-k unseen items per row of ``fold_in`` under ``score``, a
    function from a CSR batch [b, I] to float scores [b, I] (any device)."""
    out = []
    for start in range(0, fold_in.n_rows, batch_size):
        part = fold_in.take_rows(np.arange(start, min(start + batch_size, fold_in.n_rows)))
        scores = score(part).float().cpu()
        _mask_known(scores, part)
        out.append(torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


@torch.inference_mode()
def model_topk(model: torch.nn.Module, fold_in: CSR, k: int = 100, batch_size: int = 2000) -> np.ndarray:
    """int64 [U, k]: the model's top-k unseen items per row of ``fold_in``, scored with
    ``logits(mu)``, ``mu`` from ``encode(keep_prob=1.0)`` (no sampling), as the scorer does."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def score(part: CSR) -> torch.Tensor:
        mu, _ = model.encode(SparseBatch.from_csr(part, device), keep_prob=1.0)
        return model.logits(mu)

    try:
        return scores_topk(score, fold_in, k, batch_size)
    finally:
        model.train(was_training)


def popularity_topk(popularity: np.ndarray, fold_in: CSR, k: int = 100) -> np.ndarray:
    """int64 [U, k]: most popular items each user has not folded in (ties by item index)."""
    order = np.lexsort((np.arange(len(popularity)), -np.asarray(popularity, dtype=np.float64)))
    out = np.empty((fold_in.n_rows, min(k, len(order))), dtype=np.int64)
    for u in range(fold_in.n_rows):
        # The k + |known| best always contain the k best unknown items.
        cand = order[: k + len(fold_in.row(u))]
        out[u] = cand[~np.isin(cand, fold_in.row(u))][:k]
    return out


def evaluate_model(model: torch.nn.Module, split: Split, batch_size: int = 2000) -> dict[str, float]:
    return summarize(model_topk(model, split.fold_in, 100, batch_size), split.held_out)


def evaluate_popularity(popularity: np.ndarray, split: Split) -> dict[str, float]:
    return summarize(popularity_topk(popularity, split.fold_in, 100), split.held_out)


def train_popularity(train: CSR) -> np.ndarray:
    """float32 [I]: number of training users per item — the popularity baseline and fallback."""
    return np.bincount(train.indices, minlength=train.n_cols).astype(np.float32)


def per_user_evaluation(topk: np.ndarray, split: Split) -> dict[str, np.ndarray]:
    """Per-user metrics of a ranking of ``split``'s users, plus ``n_interactions`` (fold-in
    + held-out positives, the grouping key of the paper's Table 3)."""
    out = per_user_metrics(topk, split.held_out)
    out["n_interactions"] = (split.fold_in.row_lengths() + split.held_out.row_lengths()).astype(np.float64)
    return out
