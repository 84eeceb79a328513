"""Exact top-K scoring of users against a model bundle, in batches, with no Spark.

Both engines of the daily job call this on every batch: the Spark job
(``pipelines/score_users.py``, in each Python worker) and the single-node engine
(:mod:`piarec.daily.local_engine`); the pyfunc model and the tests call it directly.

The ranking contract is strict because A/B analysis compares runs item by item: for every
user the returned items equal a full stable sort of the fp32 scores, descending, ties
broken by ascending item index, with seen items removed.

- Users with history: ``logits(mu)``, ``mu`` the posterior mean from ``encode(batch,
  keep_prob=1.0)`` (no sampling).
- Users with no known history: the bundle's popularity vector (``source='popularity'``).
- ``exclude``: titles no user may get (withdrawn or not yet released, see
  :mod:`piarec.daily.availability`), removed for every user like seen titles.

Precision (``precision=``):

- ``fp32``: the scores are the model's fp32 logits. Rows go through the model in blocks of
  at least :data:`MIN_ROWS` (padded when fewer): BLAS switches to other kernels for a
  handful of rows, and their last bits differ. So a user's scores do not depend on the
  batch they arrived in, and both engines write bit-identical output.
- ``bf16`` (for GPUs, whose bf16 matrix units are many times faster): a bf16 decoder pass
  with a rigorous per-score error bound selects, per user, a candidate set that provably
  holds the top-K; only the candidates are rescored exactly (fp64 accumulation, rounded to
  fp32) and ranked. The output is the exact top-K of those correctly rounded fp32 scores.

Selection on the CPU is ``np.partition`` (the k-th largest value of each row) then the
items at or above it, ordered by one integer key per item (score bits, then item index);
on a GPU, ``torch.topk`` over the same keys. Both are exact, ties included.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from piarec.models.bundle import ModelBundle
from piarec.models.contract import SparseBatch
from piarec.data.csr import CSR
from piarec.scoring.topk import top_k_rows, top_k_torch

MODEL, POPULARITY = "model", "popularity"  # the ``source`` of a user's list
MIN_ROWS = 32  # fewest rows per matrix product (see the module docstring)
_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}  # logits per block (a CPU reuses it: no page faults)


# -- the scorer -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scored:
    """Top-k' per user, k' = min(k, I). Row b holds ``count[b]`` valid entries, best
    first; the rest (only when a user has seen almost the whole catalogue) are -1 / nan."""

    item_idx: np.ndarray  # int32 [B, k']
    scores: np.ndarray  # float32 [B, k']
    source: np.ndarray  # object [B]: "model" | "popularity"
    count: np.ndarray  # int32 [B]

    def __len__(self) -> int:
        return len(self.count)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU, fp32 elsewhere; anything else as given."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


class TopKScorer:
    """Scores CSR rows with a bundle's model; see the module docstring for the contract.

    ``device``: where the model runs (``None`` = CPU; the engines pass
    :func:`piarec.device.pick_device`'s choice). ``precision``: ``fp32``, ``bf16`` or
    ``auto``. ``exclude``: item indices never returned to anyone. The scorer holds no
    per-call state, so threads may share one.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        k: int,
        batch_size: int = 4096,
        *,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        exclude: np.ndarray | None = None,
    ):
        if k < 1 or batch_size < 1:
            raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
        popularity = np.asarray(bundle.popularity, dtype=np.float32)
        if not np.isfinite(popularity).all():
            raise ValueError("the bundle's popularity vector holds non-finite values; retrain or repair it")
        self.device = torch.device(device or "cpu")
        model = bundle.model if self.device.type == "cpu" else copy.deepcopy(bundle.model).to(self.device)
        self.model = model.eval()
        self.n_items = bundle.n_items
        self.k = min(k, self.n_items)
        self.batch_size = batch_size
        self.popularity = popularity
        self.precision = resolve_precision(precision, self.device)
        # The bf16 pass needs an affine decoder's weights to bound its error; others run in fp32.
        head = self.model.affine_decoder() if self.precision == "bf16" else None
        if self.precision == "bf16" and head is None:
            if precision == "bf16":
                raise ValueError(
                    "bf16 scoring needs a model whose logits are one affine layer (no decoder "
                    "hidden layers); set scoring.precision to fp32 for this model"
                )
            self.precision = "fp32"
        self._bf16 = _Bf16Head(head, self.device) if head is not None else None
        chunk_bytes = _CHUNK_BYTES.get(self.device.type, _CHUNK_BYTES["cuda"])
        self._rows_per_block = max(MIN_ROWS, chunk_bytes // (4 * self.n_items))
        self._excluded = np.zeros(self.n_items, bool)
        if exclude is not None and len(exclude):
            self._excluded[np.asarray(exclude, np.int64)] = True
        self._exclude_idx = np.flatnonzero(self._excluded)
        self._exclude_t = torch.from_numpy(self._exclude_idx).to(self.device)
        # Popularity never changes: sort it once (stable, so ties go to the lower index),
        # excluded titles left out, and keep each item's rank in that order for the
        # seen-skipping walk (excluded titles rank past the end: never reached).
        order = np.argsort(-popularity, kind="stable")
        self._pop_order = order[~self._excluded[order]]
        self._pop_rank = np.full(self.n_items, self.n_items, np.int64)
        self._pop_rank[self._pop_order] = np.arange(len(self._pop_order))

    def score(self, history: CSR, seen: CSR) -> Scored:
        """Top-k' for every row of ``history`` (known items, CSR [B, I]) never returning
        an item of ``seen`` (CSR [B, I], same rows)."""
        if history.n_rows != seen.n_rows:
            raise ValueError(f"history has {history.n_rows} rows but seen has {seen.n_rows}")
        if history.n_cols != self.n_items or seen.n_cols != self.n_items:
            raise ValueError(
                f"history/seen have {history.n_cols}/{seen.n_cols} columns; the model has {self.n_items} items"
            )
        n, kk = history.n_rows, self.k
        item_idx = np.full((n, kk), -1, np.int32)
        scores = np.full((n, kk), np.nan, np.float32)
        has_history = history.row_lengths() > 0
        # Seen titles are unique per row (CSR collapses duplicates), so this is exact:
        # what is left is the catalogue less the union of seen and excluded titles.
        left = self.n_items - seen.row_lengths()
        if len(self._exclude_idx):  # without exclusions (the usual day) nothing more to count
            seen_excluded = np.bincount(np.repeat(np.arange(n), seen.row_lengths())[self._excluded[seen.indices]],
                                        minlength=n)
            left = left - len(self._exclude_idx) + seen_excluded
        count = np.minimum(kk, left).astype(np.int32)
        model_rows, popularity_rows = np.flatnonzero(has_history), np.flatnonzero(~has_history)
        for rows, fill in ((model_rows, self._model_topk), (popularity_rows, self._popularity_topk)):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                if len(chunk) == n:  # the common case: no gather
                    idx, val = fill(history, seen)
                else:
                    idx, val = fill(history.take_rows(chunk), seen.take_rows(chunk))
                item_idx[chunk], scores[chunk] = idx, val
        invalid = np.arange(kk)[None, :] >= count[:, None]
        item_idx[invalid], scores[invalid] = -1, np.nan
        if not np.isfinite(scores[~invalid]).all():
            raise ValueError("the model produced non-finite scores; the model version is broken")
        source = np.where(has_history, MODEL, POPULARITY).astype(object)
        return Scored(item_idx, scores, source, count)

    @torch.inference_mode()
    def _model_topk(self, history: CSR, seen: CSR) -> tuple[np.ndarray, np.ndarray]:
        with _full_precision_matmul():
            return self._model_topk_inner(history, seen)

    def _model_topk_inner(self, history: CSR, seen: CSR) -> tuple[np.ndarray, np.ndarray]:
        m, kk = history.n_rows, self.k
        mu, _ = self.model.encode(SparseBatch.from_csr(_pad_rows(history, MIN_ROWS), self.device), keep_prob=1.0)
        idx = np.empty((m, kk), np.int64)
        val = np.empty((m, kk), np.float32)
        seen_rows = np.repeat(np.arange(m), seen.row_lengths())
        for s, e, lo, hi in _blocks(m, self._rows_per_block, mu.shape[0]):
            a, b = seen.indptr[s], seen.indptr[e]
            rows, cols = seen_rows[a:b] - s, seen.indices[a:b].astype(np.int64)
            if self._bf16 is not None:
                sel, sc = self._bf16.top_k(mu[s:e], rows, cols, kk, self._exclude_t)
            elif self.device.type == "cpu":
                v = self.model.logits(mu[lo:hi]).numpy()[s - lo : e - lo]
                v[rows, cols] = -np.inf
                v[:, self._exclude_idx] = -np.inf
                sel = top_k_rows(v, kk)
                sc = np.take_along_axis(v, sel, axis=1)
            else:
                t = self.model.logits(mu[lo:hi])[s - lo : e - lo]
                t[torch.from_numpy(rows).to(t.device), torch.from_numpy(cols).to(t.device)] = -torch.inf
                t[:, self._exclude_t] = -torch.inf
                sel, sc = top_k_torch(t, kk)
            idx[s:e] = sel.cpu().numpy() if isinstance(sel, torch.Tensor) else sel
            val[s:e] = sc.cpu().numpy() if isinstance(sc, torch.Tensor) else sc
        return idx, val

    def _popularity_topk(self, history: CSR, seen: CSR) -> tuple[np.ndarray, np.ndarray]:
        # Walk the global popularity order and skip seen items: only the first
        # k' + (most seen in this chunk) positions can contribute.
        m, kk = seen.n_rows, self.k
        width = min(len(self._pop_order), kk + int(seen.row_lengths().max(initial=0)))
        is_seen = np.zeros((m, width), bool)
        pos = self._pop_rank[seen.indices]
        rows = np.repeat(np.arange(m), seen.row_lengths())
        inside = pos < width
        is_seen[rows[inside], pos[inside]] = True
        first_unseen = np.argsort(is_seen, axis=1, kind="stable")[:, :kk]  # False sorts first
        idx = self._pop_order[first_unseen]
        if idx.shape[1] < kk:  # fewer available titles than k: the rest is past ``count``
            idx = np.pad(idx, ((0, 0), (0, kk - idx.shape[1])))
        return idx, self.popularity[idx]


def _pad_rows(csr: CSR, n_rows: int) -> CSR:
    """``csr`` with empty rows appended up to ``n_rows`` rows (unchanged when it has more)."""
    if csr.n_rows >= n_rows:
        return csr
    indptr = np.concatenate([csr.indptr, np.full(n_rows - csr.n_rows, csr.indptr[-1], csr.indptr.dtype)])
    return CSR(indptr, csr.indices, csr.n_cols)


def _blocks(m: int, step: int, available: int) -> Iterator[tuple[int, int, int, int]]:
    """Row blocks ``[s, e)`` of ``m`` rows with a window ``[lo, hi) ⊇ [s, e)`` of at least
    MIN_ROWS rows (``available`` >= MIN_ROWS rows exist, padding included)."""
    for s in range(0, m, step):
        e = min(m, s + step)
        lo = min(s, max(0, e - MIN_ROWS))
        yield s, e, lo, max(e, min(available, lo + MIN_ROWS))


_MATMUL_LOCK = threading.Lock()
_MATMUL_USERS = [0, None]  # active scorers, the CUDA flags they replaced


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """No TF32 and no reduced-precision bf16 reductions on CUDA while scoring: the fp32
    path's scores and the bf16 pass's error bound assume plain fp32 accumulation. The
    flags are process-wide, so concurrent scorers share one save / restore."""
    if not torch.cuda.is_available():
        yield
        return
    flags = torch.backends.cuda.matmul
    with _MATMUL_LOCK:
        if _MATMUL_USERS[0] == 0:
            _MATMUL_USERS[1] = (flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction)
            flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction = False, False
        _MATMUL_USERS[0] += 1
    try:
        yield
    finally:
        with _MATMUL_LOCK:
            _MATMUL_USERS[0] -= 1
            if _MATMUL_USERS[0] == 0:
                flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction = _MATMUL_USERS[1]


class _Bf16Head:
    """The bf16 pass and its exact correction for an affine decoder ``z W^T + b``.

    For every item the bf16 score is within ``e = c1 |z| |W_i| + c2 |p| + c3 |s|`` of the
    exact score and of its fp32 rounding (u = 2^-8 is bf16's unit roundoff; inputs rounded
    to bf16 err by at most (2u + u^2)|z_k W_ik| per product, fp32 accumulation of d terms by
    d 2^-24 of the sum of |products|, a bf16 output p by u|p|, the fp32 bias add and the
    final rounding by 2^-24 each; Cauchy-Schwarz bounds the sum of |z_k W_ik|). If theta
    is the k-th largest lower bound ``s - e`` among unseen items, every item of the exact
    top-K has an upper bound ``s + e >= theta``, so those candidates are rescored exactly.
    """

    def __init__(self, head: nn.Linear, device: torch.device):
        w = head.weight.detach().to(device, torch.float32)
        d = w.shape[1]
        u = 2.0**-8
        self.c1 = 1.01 * (2 * u + u * u + 2 * d * 2.0**-24 + d * 2.0**-52)
        self.c2, self.c3 = 1.01 * 2 * u, 2.0**-22
        self.w_norm = w.norm(dim=1)  # [I]
        self.w64 = w.to(torch.float64)
        self.b64 = head.bias.detach().to(device, torch.float64)
        self.b = head.bias.detach().to(device, torch.float32)
        # On a GPU the product runs in bf16 on the matrix units; elsewhere bf16-rounded
        # inputs multiplied in fp32 give the same bound (bf16 x bf16 is exact in fp32).
        self.native = device.type == "cuda"
        self.w_low = w.to(torch.bfloat16) if self.native else w.to(torch.bfloat16).to(torch.float32)
        self.device = device

    def top_k(self, z: torch.Tensor, rows: np.ndarray, cols: np.ndarray, kk: int,
              exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, n_items = z.shape[0], self.w_low.shape[0]
        r = torch.from_numpy(rows).to(self.device)
        c = torch.from_numpy(cols).to(self.device)
        low = z.to(torch.bfloat16)
        p = (low @ self.w_low.T).float() if self.native else low.float() @ self.w_low.T
        approx = p + self.b
        err = (self.c1 * z.norm(dim=1, keepdim=True)) * self.w_norm + self.c2 * p.abs() + self.c3 * approx.abs()
        approx[r, c], err[r, c] = -torch.inf, 0.0
        approx[:, exclude], err[:, exclude] = -torch.inf, 0.0
        theta = torch.topk(approx - err, min(kk, n_items), dim=1).values[:, -1:]
        upper = approx + err
        width = int((upper >= theta).sum(dim=1).max())
        cand = torch.topk(upper, width, dim=1).indices  # [m, width]: every row's candidates, and more
        del approx, err, upper, p
        is_seen = torch.zeros((m, n_items), dtype=torch.bool, device=self.device)
        is_seen[r, c] = True
        is_seen[:, exclude] = True
        exact = torch.empty(cand.shape, dtype=torch.float32, device=self.device)
        z64 = z.to(torch.float64)
        step = max(1, (64 << 20) // max(1, width * z.shape[1] * 8))  # fp64 gather <= 64 MB
        for s in range(0, m, step):
            ci = cand[s : s + step]
            dots = torch.bmm(self.w64[ci], z64[s : s + step, :, None]).squeeze(2)
            exact[s : s + step] = (dots + self.b64[ci]).to(torch.float32)
        exact[is_seen.gather(1, cand)] = -torch.inf
        return top_k_torch(exact, kk, cand)


