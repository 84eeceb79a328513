"""A minimal CSR matrix of binary interactions, shared by training, evaluation and scoring.

The pipeline never densifies a whole user-item matrix: batches are cut from CSR rows
(training feeds them to an embedding bag; scoring turns them into masks). No torch
import here: the Spark build job reads snapshots through this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CSR:
    """Binary CSR matrix. ``indptr``: int64 [n_rows + 1]; ``indices``: int32 [nnz], sorted per row."""

    indptr: np.ndarray
    indices: np.ndarray
    n_cols: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> "CSR":
        """Build from (row, col) pairs; duplicates collapse to one entry (binary matrix).

        Memory: one int64 sort key per pair (sorted in place) and the int32 result, about
        12 bytes per pair beside the inputs (int32 or int64 arrays, not copied), so a
        production week's billion pairs fit a training host."""
        rows, cols = np.asarray(rows), np.asarray(cols)
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols differ in length: {rows.shape} vs {cols.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"row index outside [0, {n_rows})")
        if len(cols) and (cols.min() < 0 or cols.max() >= n_cols):
            raise ValueError(f"column index outside [0, {n_cols})")
        # sort + drop adjacent repeats: same result as np.unique, many times faster
        key = rows.astype(np.int64)
        key *= n_cols
        key += cols
        key.sort()
        if len(key) > 1:
            repeat = key[1:] == key[:-1]
            if repeat.any():
                key = key[np.concatenate(([True], ~repeat))]
            del repeat
        # rows are sorted in the key: row r starts at the first key >= r * n_cols
        indptr = np.searchsorted(key, np.arange(n_rows + 1, dtype=np.int64) * n_cols).astype(np.int64)
        np.remainder(key, n_cols, out=key)
        return cls(indptr, key.astype(np.int32), int(n_cols))

    @classmethod
    def from_lists(cls, lists: list[np.ndarray] | list[list[int]], n_cols: int) -> "CSR":
        rows = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
        cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.array([], np.int64)
        return cls.from_pairs(rows, cols, len(lists), n_cols)

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def take_rows(self, rows: np.ndarray) -> "CSR":
        """Rows ``rows`` (any order, repeats allowed) as a new CSR."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # Gather every row's slice in one vectorised pass.
        offsets = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return CSR(indptr, self.indices[offsets], self.n_cols)

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n_rows, self.n_cols), dtype=np.float32)
        out[np.repeat(np.arange(self.n_rows), self.row_lengths()), self.indices] = 1.0
        return out
