"""Non-neural baselines in the same harness: popularity and EASE (Steck 2019).

EASE learns an item-item matrix B [I, I] with a zero diagonal in closed form:

    P = (X^T X + lambda I)^-1,   B = I - P diag(1 / diag(P))

and scores a user as ``x_u B``. X is the training users' binary matrix; X^T X is built
from sparse rows (never a dense [U, I] matrix) and inverted with a Cholesky factorisation
in torch, in float32 (lambda >= 1 keeps G + lambda I well conditioned; float64 is 2x
slower and, on MovieLens-100K, gives the same top-100 lists). lambda is picked on the validation users
(:func:`piarec.evaluate.protocol.fit_ease_on_validation`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

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
    val_ndcg: dict[float, float] = field(default_factory=dict)  # lambda -> validation NDCG@100 (when fitted on it)

    def scores(self, part: CSR) -> torch.Tensor:
        """x_u B for CSR rows: float32 [b, I] (rows of B summed with an embedding bag)."""
        idx = torch.from_numpy(part.indices.astype(np.int64))
        offsets = torch.from_numpy(part.indptr[:-1].astype(np.int64))
        return F.embedding_bag(idx, self.weights, offsets, mode="sum")


def fit_ease(train: CSR, lam: float) -> EASE:
    return EASE(ease_weights(gram(train).float(), lam), lam)


def train_popularity(train: CSR) -> np.ndarray:
    """float32 [I]: number of training users per item — the popularity baseline and fallback."""
    return np.bincount(train.indices, minlength=train.n_cols).astype(np.float32)
