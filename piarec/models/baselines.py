"""Non-neural baselines in the same harness: popularity and EASE (Steck 2019).

EASE learns an item-item matrix B [I, I] with a zero diagonal in closed form:

    P = (X^T X + lambda I)^-1,   B = I - P diag(1 / diag(P))

and scores a user as ``x_u B``. X is the training users' binary matrix; X^T X is built
from sparse rows (never a dense [U, I] matrix) and inverted with a Cholesky factorisation
in torch, in float32 (lambda >= 1 keeps G + lambda I well conditioned; float64 is 2x
slower and, on MovieLens-100K, gives the same top-100 lists). lambda is picked on the validation users (:func:`fit_ease_on_validation`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from piarec.evaluate.protocol import scores_topk
from piarec.evaluate.metrics import summarize
from piarec.data.snapshot import Split
from piarec.data.csr import CSR

DEFAULT_EASE_LAMBDAS = (25.0, 100.0, 300.0, 1000.0, 3000.0)


def gram(train: CSR, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """X^T X [I, I] (co-occurrence counts) from sparse rows."""
    rows = torch.from_numpy(np.repeat(np.arange(train.n_rows), train.row_lengths()))
    cols = torch.from_numpy(train.indices.astype(np.int64))
    x = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(cols), dtype=dtype),
                                (train.n_rows, train.n_cols), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta" from sparse @ sparse
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.mm(x.t().coalesce(), x).to_dense()


def ease_weights(g: torch.Tensor, lam: float) -> torch.Tensor:
    """B [I, I] for the Gram matrix ``g`` and L2 weight ``lam`` > 0 (same dtype as g)."""
    if lam <= 0:
        raise ValueError(f"EASE needs lambda > 0, got {lam}")
    a = g.clone()
    a.diagonal().add_(lam)
    chol = torch.linalg.cholesky(a)
    del a  # peak memory: three [I, I] matrices
    p = torch.cholesky_inverse(chol)
    del chol
    p.div_(-p.diagonal().clone()[None, :])  # B_ij = -P_ij / P_jj, in place
    p.diagonal().zero_()
    return p


@dataclass
class EASE:
    """A fitted EASE model: ``weights`` float32 [I, I]."""

    weights: torch.Tensor
    lam: float
    val_ndcg: dict[float, float] = field(default_factory=dict)  # lambda -> validation NDCG@100

    def scores(self, part: CSR) -> torch.Tensor:
        """x_u B for CSR rows: float32 [b, I] (rows of B summed with an embedding bag)."""
        idx = torch.from_numpy(part.indices.astype(np.int64))
        offsets = torch.from_numpy(part.indptr[:-1].astype(np.int64))
        return F.embedding_bag(idx, self.weights, offsets, mode="sum")

    def topk(self, fold_in: CSR, k: int = 100) -> np.ndarray:
        return scores_topk(self.scores, fold_in, k)


def fit_ease(train: CSR, lam: float) -> EASE:
    return EASE(ease_weights(gram(train).float(), lam), lam)


def fit_ease_on_validation(train: CSR, val: Split, lambdas: Sequence[float] = DEFAULT_EASE_LAMBDAS) -> EASE:
    """Fit EASE for each lambda and keep the one with the best validation NDCG@100."""
    g = gram(train).float()
    best: EASE | None = None
    scores: dict[float, float] = {}
    for lam in lambdas:
        model = EASE(ease_weights(g, lam), float(lam))
        scores[float(lam)] = summarize(model.topk(val.fold_in), val.held_out)["ndcg_at_100"]
        if best is None or scores[float(lam)] > scores[best.lam]:
            best = model
    assert best is not None, "lambdas must not be empty"
    best.val_ndcg = scores
    return best
