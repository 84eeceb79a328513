"""The one exact top-K kernel and its tie rule, used by every ranking in piarec: the
daily scorer, the pyfunc model, evaluation, the gate and the baselines.

The rule: for every row the returned columns equal a full stable sort of the fp32 scores,
descending, ties broken by ascending column (item index); ``-inf`` marks an excluded item.
:func:`top_k_rows` (numpy, the CPU) and :func:`top_k_torch` (any device) implement it
over the same integer keys (score bits, then column), so both give identical results.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from piarec.data.csr import CSR

__all__ = ["top_k_rows", "top_k_torch", "masked_top_k"]


def _desc_keys_np(values: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """int64 keys whose ascending order is (value descending, column ascending)."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)  # +0.0: -0.0 ties with 0.0
    asc = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed integers
    return ((-asc - 1) << 32) | cols


def top_k_rows(v: np.ndarray, kk: int) -> np.ndarray:
    """Columns of the ``kk`` largest values per row of ``v`` (float32 [n, I], no NaN; -inf
    allowed), best first, ties by ascending column: exactly
    ``np.lexsort((columns, -v[r]))[:kk]`` per row, without sorting rows. int64 [n, kk].

    ``np.partition`` finds each row's kk-th largest value; every item at or above it is a
    candidate (kk of them, more only on ties at that value), and one sort of the
    candidates' integer keys orders them exactly.
    """
    n, n_cols = v.shape
    kk = min(kk, n_cols)
    if n == 0 or kk == 0:
        return np.zeros((n, kk), np.int64)
    part = np.partition(v, n_cols - kk, axis=1)
    if np.isnan(part[:, n_cols - kk :]).any():  # NaN sorts last, so any NaN lands here
        raise ValueError("the model produced NaN scores; the model version is broken")
    kth = part[:, n_cols - kk]
    del part
    flat = np.flatnonzero(v >= kth[:, None])  # row-major: rows ascending, columns ascending
    rows, cols = np.divmod(flat, n_cols)
    counts = np.bincount(rows, minlength=n)
    width = int(counts.max())
    keys = np.full((n, width), np.iinfo(np.int64).max, np.int64)
    starts = np.zeros(n, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    keys[rows, np.arange(len(flat)) - starts[rows]] = _desc_keys_np(v.ravel()[flat], cols)
    if width > kk:
        keys.partition(kk - 1, axis=1)
        keys = keys[:, :kk]
    keys.sort(axis=1)
    return keys & 0xFFFFFFFF


def _desc_keys_torch(values: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    bits = (values + 0.0).view(torch.int32).to(torch.int64)
    asc = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ((-asc - 1) << 32) | cols


def top_k_torch(values: torch.Tensor, kk: int, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_k_rows` on any device: ``(columns int64 [n, kk], values [n, kk])``.
    ``cols`` names the item of each position (default: the position itself)."""
    if torch.isnan(values).any():
        raise ValueError("the model produced NaN scores; the model version is broken")
    if cols is None:
        cols = torch.arange(values.shape[1], device=values.device).expand(values.shape)
    keys = _desc_keys_torch(values, cols)
    pos = torch.topk(keys, min(kk, values.shape[1]), dim=1, largest=False, sorted=True).indices
    return cols.gather(1, pos), values.gather(1, pos)


@torch.inference_mode()
def masked_top_k(score: Callable[[CSR], torch.Tensor], known: CSR, k: int, batch_size: int = 2000) -> np.ndarray:
    """int64 [U, k']: the top-k' (k' = min(k, I)) items per row of ``known`` under
    ``score``, never one of the row's known items, by the kernel's tie rule.

    ``score`` maps a CSR batch [b, I] to scores [b, I] (any device, any float dtype); it is
    called on batches of ``batch_size`` rows of ``known``. A NaN score ranks last: this
    ranks for evaluation, where a broken model must get a (bad) metric rather than stop
    the comparison; the gate refuses such a model by its health check, and the daily
    scorer, which calls :func:`top_k_rows` directly, refuses NaN outright.
    """
    out = []
    for start in range(0, known.n_rows, batch_size):
        part = known.take_rows(np.arange(start, min(start + batch_size, known.n_rows)))
        values = score(part).float().cpu().numpy().copy()
        values[np.isnan(values)] = -np.inf
        values[np.repeat(np.arange(part.n_rows), part.row_lengths()), part.indices] = -np.inf
        out.append(top_k_rows(values, k))
    return np.concatenate(out) if out else np.zeros((0, min(k, known.n_cols)), dtype=np.int64)
