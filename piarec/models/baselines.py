"""Non-neural baselines in the same harness: popularity and EASE (Steck 2019).

EASE learns an item-item matrix B [I, I] with a zero diagonal in closed form:

    P = (X^T X + lambda I)^-1,   B = I - P diag(1 / diag(P))

and scores a user as ``x_u B``. X is the training users' binary matrix; X^T X is built
from sparse rows (never a dense [U, I] matrix) and inverted with a Cholesky factorisation
in torch, in float32 (lambda >= 1 keeps G + lambda I well conditioned; float64 is 2x
slower and, on MovieLens-100K, gives the same top-100 lists). lambda is picked on the validation users
(:func:`piarec.evaluate.protocol.fit_ease_on_validation`).

:class:`PopularityRanker` and :class:`EaseRanker` carry the two baselines into the daily
scorer as scoring-only models (the part of :class:`~piarec.models.contract.RecommenderModel`
that :class:`~piarec.scoring.scorer.TopKScorer` calls: ``encode`` gives a user's scores over
every title, ``logits`` returns them), so a baseline arm is scored, written and validated
like a trained model's, in both engines. They travel in the ordinary bundle format
(:mod:`piarec.models.bundle`; ``config.json`` names the baseline instead of a ModelConfig).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from piarec.data.csr import CSR
from piarec.models.contract import SparseBatch

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


# -- scoring-only models of the baselines (the daily job's baseline arms) ---------------------
class _Ranker(torch.nn.Module):
    """A user's scores over all titles come straight from ``encode``; nothing is trained."""

    kind: str

    def __init__(self, n_items: int, params: dict | None = None):
        super().__init__()
        self.n_items = n_items
        self.params = dict(params or {})  # what the bundle records: lambda, snapshot, ...

    def scores(self, batch: SparseBatch) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, batch: SparseBatch, keep_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(batch)
        return s, s

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return z.clone()  # a new tensor, as a decoder's would be: the scorer writes into it

    def affine_decoder(self) -> None:
        return None  # no affine head: the bf16 pass does not apply

    def item_anchors(self) -> None:
        return None

    def bundle_config(self) -> dict:
        return {"kind": self.kind, **self.params}


class PopularityRanker(_Ranker):
    """Every user gets the same scores: the titles' training popularity."""

    kind = "popularity"

    def __init__(self, n_items: int, params: dict | None = None):
        super().__init__(n_items, params)
        self.register_buffer("popularity", torch.zeros(n_items))

    def scores(self, batch: SparseBatch) -> torch.Tensor:
        return self.popularity.expand(batch.size, -1)


class EaseRanker(_Ranker):
    """``x_u B``: the rows of EASE's item-item matrix summed over the user's titles."""

    kind = "ease"

    def __init__(self, n_items: int, params: dict | None = None):
        super().__init__(n_items, params)
        self.register_buffer("weights", torch.zeros(n_items, n_items))

    def scores(self, batch: SparseBatch) -> torch.Tensor:
        return F.embedding_bag(batch.indices, self.weights, batch.offsets, mode="sum")


RANKERS = {cls.kind: cls for cls in (PopularityRanker, EaseRanker)}


def popularity_ranker(popularity: np.ndarray, **params) -> PopularityRanker:
    model = PopularityRanker(len(popularity), params)
    model.popularity.copy_(torch.from_numpy(np.asarray(popularity, dtype=np.float32)))
    return model.eval()


def ease_ranker(ease: EASE, **params) -> EaseRanker:
    model = EaseRanker(ease.weights.shape[0], {"lambda": ease.lam, **params})
    model.weights.copy_(ease.weights)
    return model.eval()


def ranker_from_config(n_items: int, config: dict) -> _Ranker:
    """An empty ranker of the kind a bundle's ``baseline`` entry names (weights load next)."""
    params = dict(config)
    kind = params.pop("kind", None)
    if kind not in RANKERS:
        raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(RANKERS)}")
    return RANKERS[kind](n_items, params)
