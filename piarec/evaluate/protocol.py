"""The evaluation protocol: fold-in items go in, held-out items are ranked among the rest.

Items a user folded in are excluded from the ranking (they are known), exactly as in
Liang et al.'s strong-generalization protocol.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from piarec.evaluate.metrics import EVAL_K, SELECTION_METRIC, per_user_metrics, summarize
from piarec.models.baselines import DEFAULT_EASE_LAMBDAS, EASE, EaseDual, ease_weights, gram
from piarec.models.contract import RecommenderModel, SparseBatch
from piarec.scoring.topk import masked_top_k
from piarec.data.snapshot import Split
from piarec.data.csr import CSR


@torch.inference_mode()
def model_topk(model: RecommenderModel, fold_in: CSR, k: int = EVAL_K, batch_size: int = 2000) -> np.ndarray:
    """int64 [U, k]: the model's top-k unseen items per row of ``fold_in``, scored with
    ``logits(mu)``, ``mu`` from ``encode(keep_prob=1.0)`` (no sampling), as the scorer does."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def score(part: CSR) -> torch.Tensor:
        mu, _ = model.encode(SparseBatch.from_csr(part, device), keep_prob=1.0)
        return model.logits(mu)

    try:
        return masked_top_k(score, fold_in, k, batch_size)
    finally:
        model.train(was_training)


def popularity_topk(popularity: np.ndarray, fold_in: CSR, k: int = EVAL_K, batch_size: int = 2000) -> np.ndarray:
    """int64 [U, k]: the most popular items each user has not folded in (the kernel's tie
    rule: ties by ascending item index)."""
    pop = torch.from_numpy(np.asarray(popularity, dtype=np.float32))
    return masked_top_k(lambda part: pop.expand(part.n_rows, -1), fold_in, k, batch_size)


def evaluate_model(model: RecommenderModel, split: Split, batch_size: int = 2000) -> dict[str, float]:
    return summarize(model_topk(model, split.fold_in, EVAL_K, batch_size), split.held_out)


def evaluate_popularity(popularity: np.ndarray, split: Split) -> dict[str, float]:
    return summarize(popularity_topk(popularity, split.fold_in, EVAL_K), split.held_out)


def per_user_evaluation(topk: np.ndarray, split: Split) -> dict[str, np.ndarray]:
    """Per-user metrics of a ranking of ``split``'s users, plus ``n_interactions`` (fold-in
    + held-out positives, the grouping key of the paper's Table 3)."""
    out = per_user_metrics(topk, split.held_out)
    out["n_interactions"] = (split.fold_in.row_lengths() + split.held_out.row_lengths()).astype(np.float64)
    return out


def fit_ease_on_validation(train: CSR, val: Split, lambdas: Sequence[float] = DEFAULT_EASE_LAMBDAS,
                           weights: bool = True) -> EASE:
    """Fit EASE for each lambda and keep the one with the best validation NDCG@100.

    With fewer training users than items every lambda is scored in the dual form
    (:class:`~piarec.models.baselines.EaseDual`: one eigendecomposition of X X^T for the whole
    grid); the primal B is then formed once, at the chosen lambda, unless ``weights=False``,
    where the returned model keeps scoring through the dual form (evaluation only: a bundle
    needs B). Otherwise each lambda is a primal fit.
    """
    if not lambdas:
        raise ValueError("lambdas must not be empty")
    dual = EaseDual(train) if train.n_rows < train.n_cols else None
    g = gram(train).float() if dual is None else None
    scores: dict[float, float] = {}
    best: EASE | None = None
    for lam in map(float, lambdas):
        model = EASE(ease_weights(g, lam), lam) if dual is None else EASE(None, lam, dual=dual)
        scores[lam] = summarize(masked_top_k(model.scores, val.fold_in, EVAL_K), val.held_out)[SELECTION_METRIC]
        if best is None or scores[lam] > scores[best.lam]:
            best = model
    assert best is not None
    if dual is not None and weights:
        best = EASE(ease_weights(gram(train).float(), best.lam), best.lam)
    best.val_ndcg = scores
    return best
