"""Non-neural baselines in the same harness: popularity and EASE (Steck 2019).

EASE learns an item-item matrix B [I, I] with a zero diagonal in closed form:

    P = (X^T X + lambda I)^-1,   B = I - P diag(1 / diag(P))

and scores a user as ``x_u B``. X is the training users' binary matrix; X^T X is built
from sparse rows (never a dense [U, I] matrix) and inverted with a Cholesky factorisation
in torch, in float32 (lambda >= 1 keeps G + lambda I well conditioned; float64 is 2x
slower and, on MovieLens-100K, gives the same top-100 lists). lambda is picked on the validation users
(:func:`piarec.evaluate.protocol.fit_ease_on_validation`).

With fewer training users n than items I (Last.fm: 1.5k users, 17.6k artists) the same
scores come from the dual form, by the Woodbury identity with K = X X^T + lambda I [n, n]:

    lambda P = I - X^T K^-1 X,   (x_u B)_j = x_uj - (x_u - x_u X^T K^-1 X)_j / (lambda P_jj)

(the 1/lambda cancels). :class:`EaseDual` diagonalises X X^T = V diag(s) V^T once, keeps
W = V^T X [n, I], and then serves any lambda in O(n I) for the diagonal and O(b n I) per b
users, never forming an [I, I] matrix: a fine lambda grid costs about one primal fit.

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


def gram_factor(train: CSR, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """X^T as a sparse COO tensor [I, U] of ones."""
    rows = torch.from_numpy(np.repeat(np.arange(train.n_rows), train.row_lengths()))
    cols = torch.from_numpy(train.indices.astype(np.int64))
    return torch.sparse_coo_tensor(torch.stack([cols, rows]), torch.ones(len(cols), dtype=dtype),
                                   (train.n_cols, train.n_rows), check_invariants=True).coalesce()


def gram(train: CSR, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """X^T X [I, I] (co-occurrence counts) from sparse rows."""
    xt = gram_factor(train, dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta" from sparse @ sparse
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.mm(xt, xt.t().coalesce()).to_dense()


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


def _bag(part: CSR, table: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` summed over each CSR row's columns: x_part @ table, [b, table cols]."""
    idx = torch.from_numpy(part.indices.astype(np.int64))
    offsets = torch.from_numpy(part.indptr[:-1].astype(np.int64))
    return F.embedding_bag(idx, table, offsets, mode="sum")


class EaseDual:
    """EASE through the dual form, for ``train`` with fewer rows than columns (see the
    module docstring). float64 throughout; ``scores(part, lam)`` equals the primal
    ``x_u B`` to rounding (tested)."""

    def __init__(self, train: CSR):
        if train.n_rows >= train.n_cols:
            raise ValueError(f"the dual form pays only with fewer users than items, got {train.n_rows} x {train.n_cols}")
        xt = gram_factor(train)  # X^T, sparse [I, n]
        with warnings.catch_warnings():  # "sparse CSR support is in beta" from sparse @ sparse
            warnings.simplefilter("ignore", UserWarning)
            user_gram = torch.sparse.mm(xt.t().coalesce(), xt).to_dense()  # X X^T [n, n]
        self.eigenvalues, v = torch.linalg.eigh(user_gram)
        self.eigenvalues.clamp_(min=0.0)  # X X^T is PSD; rounding can leave -1e-13
        self.wt = torch.sparse.mm(xt, v)  # W^T = X^T V [I, n]
        self.n_items = train.n_cols
        self._diagonals: dict[float, torch.Tensor] = {}  # lambda -> diagonal(lambda)

    def diagonal(self, lam: float) -> torch.Tensor:
        """lambda P_jj = 1 - x_j^T K^-1 x_j for every item j, float64 [I] (computed once per lambda)."""
        if lam not in self._diagonals:
            self._diagonals[lam] = 1.0 - (self.wt.square() / (self.eigenvalues + lam)).sum(dim=1)
        return self._diagonals[lam]

    def scores(self, part: CSR, lam: float) -> torch.Tensor:
        """x_u B for CSR rows at ``lam``: float32 [b, I]."""
        if lam <= 0:
            raise ValueError(f"EASE needs lambda > 0, got {lam}")
        a = _bag(part, self.wt)  # x_u X^T V [b, n]
        x = torch.from_numpy(part.to_dense()).double()
        lam_xp = x - (a / (self.eigenvalues + lam)) @ self.wt.t()  # lambda x_u P
        return (x - lam_xp / self.diagonal(lam)).float()


@dataclass
class EASE:
    """A fitted EASE model: ``weights`` float32 [I, I], or, when it was fitted in the dual
    form and B was never formed, ``weights=None`` and the scores come from ``dual``."""

    weights: torch.Tensor | None
    lam: float
    val_ndcg: dict[float, float] = field(default_factory=dict)  # lambda -> validation NDCG@100 (when fitted on it)
    dual: EaseDual | None = None

    def scores(self, part: CSR) -> torch.Tensor:
        """x_u B for CSR rows: float32 [b, I] (rows of B summed with an embedding bag)."""
        if self.weights is None:
            assert self.dual is not None, "an EASE without weights needs its dual form"
            return self.dual.scores(part, self.lam)
        return _bag(part, self.weights)


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
