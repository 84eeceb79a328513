"""The evaluation protocol: fold-in items go in, held-out items are ranked among the rest.

Items a user folded in are excluded from the ranking (they are known), exactly as in
Liang et al.'s strong-generalization protocol.
"""

from __future__ import annotations

import numpy as np
import torch

from piarec.metrics import summarize
from piarec.model import MultiVAE, SparseBatch
from piarec.snapshot import Split
from piarec.sparse import CSR


def _mask_known(scores: torch.Tensor, known: CSR) -> None:
    rows = torch.from_numpy(np.repeat(np.arange(known.n_rows), known.row_lengths()))
    scores[rows, torch.from_numpy(known.indices.astype(np.int64))] = -torch.inf


@torch.inference_mode()
def model_topk(model: MultiVAE, fold_in: CSR, k: int = 100, batch_size: int = 2000) -> np.ndarray:
    """int64 [U, k]: the model's top-k unseen items per row of ``fold_in`` (posterior mean)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, fold_in.n_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, fold_in.n_rows))
        part = fold_in.take_rows(rows)
        mu, _ = model.encode(SparseBatch.from_csr(part, device))
        scores = model.logits(mu).float().cpu()
        _mask_known(scores, part)
        out.append(torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def popularity_topk(popularity: np.ndarray, fold_in: CSR, k: int = 100) -> np.ndarray:
    """int64 [U, k]: most popular items each user has not folded in (ties by item index)."""
    order = np.lexsort((np.arange(len(popularity)), -np.asarray(popularity, dtype=np.float64)))
    out = np.empty((fold_in.n_rows, min(k, len(order))), dtype=np.int64)
    for u in range(fold_in.n_rows):
        # The k + |known| best always contain the k best unknown items.
        cand = order[: k + len(fold_in.row(u))]
        out[u] = cand[~np.isin(cand, fold_in.row(u))][:k]
    return out


def evaluate_model(model: MultiVAE, split: Split, batch_size: int = 2000) -> dict[str, float]:
    return summarize(model_topk(model, split.fold_in, 100, batch_size), split.held_out)


def evaluate_popularity(popularity: np.ndarray, split: Split) -> dict[str, float]:
    return summarize(popularity_topk(popularity, split.fold_in, 100), split.held_out)


def train_popularity(train: CSR) -> np.ndarray:
    """float32 [I]: number of training users per item — the popularity baseline and fallback."""
    return np.bincount(train.indices, minlength=train.n_cols).astype(np.float32)
