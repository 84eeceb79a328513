"""Exact top-K scoring of users against a model bundle, in batches, with no Spark.

The daily job (``pipelines/score_users.py``) calls this from each Python worker; tests
call it directly. The ranking contract is strict because A/B analysis compares runs
item by item: for every user the returned items equal a full stable sort of the fp32
scores, descending, ties broken by ascending item index, with seen items removed.

- Users with history: ``logits(mu)`` where ``mu`` is the posterior mean from
  ``encode(batch, keep_prob=1.0)`` (no sampling), computed in fp32.
- Users with no known history: the bundle's popularity vector (``source='popularity'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from piarec.bundle import ModelBundle
from piarec.model import SparseBatch
from piarec.sparse import CSR

MODEL, POPULARITY = "model", "popularity"

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("item_ids", pa.list_(pa.string())),  # rank order, best first
        pa.field("scores", pa.list_(pa.float32())),  # aligned with item_ids
        pa.field("model_version", pa.string()),
        pa.field("source", pa.string()),  # "model" | "popularity"
    ]
)


def map_histories(
    lists: Sequence[Sequence[str] | None], item_index: dict[str, int], n_items: int
) -> tuple[CSR, int]:
    """Map per-user item_id lists onto the model's vocabulary.

    Returns a binary CSR [len(lists), n_items] (duplicates collapse) and the number of
    entries whose item_id the model does not know; those are ignored. ``None`` rows are
    empty.
    """
    rows: list[int] = []
    cols: list[int] = []
    unknown = 0
    for r, items in enumerate(lists):
        for item in items or ():
            c = item_index.get(item)
            if c is None:
                unknown += 1
            else:
                rows.append(r)
                cols.append(c)
    return CSR.from_pairs(np.asarray(rows, np.int64), np.asarray(cols, np.int64), len(lists), n_items), unknown


def map_arrow_lists(lists: pa.Array, vocab: pa.Array) -> tuple[CSR, np.ndarray]:
    """The vectorised :func:`map_histories` for an Arrow ``list<string>`` column.

    ``vocab`` is the model's item_ids as an Arrow string array (position = item index).
    Returns the CSR [len(lists), len(vocab)] and the unknown entries per row, int64 [B];
    null rows are empty, null entries count as unknown.
    """
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n_rows = len(lists)
    lists = lists.fill_null(pa.scalar([], lists.type)) if lists.null_count else lists
    offsets = lists.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets -= offsets[0]  # a sliced array's offsets start where the slice starts
    flat = lists.flatten()
    if flat.type != vocab.type:
        vocab = vocab.cast(flat.type)
    idx = pc.index_in(flat, value_set=vocab)  # null where unknown (or null)
    known = idx.is_valid().to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(n_rows), np.diff(offsets))
    unknown = np.bincount(row_of[~known], minlength=n_rows).astype(np.int64)
    cols = idx.fill_null(0).to_numpy(zero_copy_only=False)[known]
    return CSR.from_pairs(row_of[known], cols, n_rows, len(vocab)), unknown


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


class TopKScorer:
    """Scores CSR rows with a bundle's model; see the module docstring for the contract."""

    def __init__(self, bundle: ModelBundle, k: int, batch_size: int = 4096):
        if k < 1 or batch_size < 1:
            raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
        popularity = np.asarray(bundle.popularity, dtype=np.float32)
        if not np.isfinite(popularity).all():
            raise ValueError("the bundle's popularity vector holds non-finite values; retrain or repair it")
        self.model = bundle.model.eval()
        self.n_items = bundle.n_items
        self.k = min(k, self.n_items)
        self.batch_size = batch_size
        self.popularity = popularity
        # Popularity never changes: sort it once (stable, so ties go to the lower index)
        # and keep each item's rank in that order for the seen-skipping walk.
        self._pop_order = np.argsort(-popularity, kind="stable")
        self._pop_rank = np.empty(self.n_items, np.int64)
        self._pop_rank[self._pop_order] = np.arange(self.n_items)

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
        # Seen titles are unique per row (CSR collapses duplicates), so this is exact.
        count = np.minimum(kk, self.n_items - seen.row_lengths()).astype(np.int32)
        model_rows, popularity_rows = np.flatnonzero(has_history), np.flatnonzero(~has_history)
        for rows, fill in ((model_rows, self._model_topk), (popularity_rows, self._popularity_topk)):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
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
        mu, _ = self.model.encode(SparseBatch.from_csr(history), keep_prob=1.0)
        logits = self.model.logits(mu).to(torch.float32).contiguous()
        # ``logits`` has no out= argument in the model contract, so the [B, I] result is
        # fresh; everything after works in place on it (no further [B, I] float arrays):
        # negate so "best" is "smallest" for argpartition, and seen items go to +inf (last).
        v = logits.numpy()
        np.negative(v, out=v)
        v[np.repeat(np.arange(seen.n_rows), seen.row_lengths()), seen.indices] = np.inf
        idx = smallest_k(v, self.k)
        return idx, -np.take_along_axis(v, idx, axis=1)

    def _popularity_topk(self, history: CSR, seen: CSR) -> tuple[np.ndarray, np.ndarray]:
        # Walk the global popularity order and skip seen items: only the first
        # k' + (most seen in this chunk) positions can contribute.
        m, kk = seen.n_rows, self.k
        width = min(self.n_items, kk + int(seen.row_lengths().max(initial=0)))
        is_seen = np.zeros((m, width), bool)
        pos = self._pop_rank[seen.indices]
        rows = np.repeat(np.arange(m), seen.row_lengths())
        inside = pos < width
        is_seen[rows[inside], pos[inside]] = True
        first_unseen = np.argsort(is_seen, axis=1, kind="stable")[:, :kk]  # False sorts first
        idx = self._pop_order[first_unseen]
        return idx, self.popularity[idx]


def smallest_k(v: np.ndarray, kk: int) -> np.ndarray:
    """Column indices of the kk smallest values per row of ``v`` (float32 [n, I]) in
    ascending order, ties by ascending index: exactly ``argsort(v, kind='stable')[:, :kk]``
    without sorting whole rows. Returns int64 [n, kk]."""
    n, n_cols = v.shape
    if kk >= n_cols:
        return np.argsort(v, axis=1, kind="stable")
    part = np.argpartition(v, kk - 1, axis=1)[:, :kk]
    kth = np.take_along_axis(v, part, axis=1).max(axis=1)
    # argpartition picks arbitrary members among values equal to the kk-th one. Where
    # more items tie at that value than fit, rebuild the candidate set from the row so
    # the lowest indices win (rare with real logits, common with constant scores).
    overfull = np.flatnonzero(np.count_nonzero(v <= kth[:, None], axis=1) > kk)
    for r in overfull:
        candidates = np.flatnonzero(v[r] <= kth[r])  # ascending index
        part[r] = candidates[np.argsort(v[r, candidates], kind="stable")[:kk]]
    pv = np.take_along_axis(v, part, axis=1)
    order = np.lexsort((part, pv), axis=1)
    return np.take_along_axis(part, order, axis=1)


def to_record_batch(
    user_ids: Sequence[str] | pa.Array, scored: Scored, item_ids: np.ndarray | pa.Array, model_version: str
) -> pa.RecordBatch:
    """One row per user in :data:`OUTPUT_SCHEMA`; lists hold only the valid entries."""
    n = len(scored)
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks()
    if len(user_ids) != n:
        raise ValueError(f"{len(user_ids)} user ids for {n} scored rows")
    vocab = item_ids if isinstance(item_ids, pa.Array) else pa.array(np.asarray(item_ids, dtype=object), pa.string())
    valid = np.arange(scored.item_idx.shape[1])[None, :] < scored.count[:, None]
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(scored.count, out=offsets[1:])
    items = pa.ListArray.from_arrays(pa.array(offsets), vocab.take(pa.array(scored.item_idx[valid])))
    scores = pa.ListArray.from_arrays(pa.array(offsets), pa.array(scored.scores[valid], pa.float32()))
    users = user_ids if isinstance(user_ids, pa.Array) else pa.array(list(user_ids), pa.string())
    columns = [
        users.cast(pa.string()),
        items.cast(OUTPUT_SCHEMA.field("item_ids").type),
        scores,
        pa.array([model_version] * n, pa.string()),
        pa.array(scored.source.tolist(), pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=OUTPUT_SCHEMA)
