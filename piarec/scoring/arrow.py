"""Arrow in and out of scoring, shared by both engines and the pyfunc model: the
histories and output schemas, histories mapped onto a model's vocabulary, the A/B arm
assignment, and scored rows as Arrow record batches.

The scoring itself (exact top-K) is :mod:`piarec.scoring.scorer`; this module only converts.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from piarec.data.csr import CSR
from piarec.scoring.scorer import MODEL, POPULARITY, Scored



OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("item_ids", pa.list_(pa.string())),  # rank order, best first
        pa.field("scores", pa.list_(pa.float32())),  # aligned with item_ids
        pa.field("model_version", pa.string()),
        pa.field("source", pa.string()),  # "model" | "popularity"
    ]
)
# The same columns with item ids dictionary-encoded against the model's vocabulary: what
# the local engine hands to the Parquet writer (the file is the same list<string>; the
# writer takes the dictionary as it is instead of hashing every string again).
WRITE_SCHEMA = OUTPUT_SCHEMA.set(1, pa.field("item_ids", pa.list_(pa.dictionary(pa.int32(), pa.string()))))
# Histories, the input of both engines: one row per active user at day D.
HISTORY_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("history", pa.list_(pa.string())),  # positives in the window
        pa.field("seen", pa.list_(pa.string())),  # titles of a seen event type in the window
    ]
)


# -- histories onto the model's vocabulary ----------------------------------------------
def map_arrow_lists(lists: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> tuple[CSR, np.ndarray]:
    """Map an Arrow ``list<string>`` column onto the model's vocabulary.

    ``vocab`` is the model's item_ids as an Arrow string array (position = item index).
    Returns the binary CSR [len(lists), len(vocab)] (duplicates collapse) and the entries
    per row the model does not know, int64 [B]; those are ignored. Null rows are empty,
    null entries count as unknown. Dictionary-encoded values (read with
    ``dictionary_columns``) are mapped through their dictionary: one lookup per distinct
    title instead of one per entry.
    """
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks() if lists.num_chunks != 1 else lists.chunk(0)
    n_rows = len(lists)
    if lists.null_count:
        lists = lists.fill_null(pa.scalar([], lists.type))
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    flat = lists.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    offsets = offsets - offsets[0]  # a sliced array's offsets start where the slice starts
    if pa.types.is_dictionary(flat.type):
        # Position of each dictionary word in the vocabulary (-1: unknown), then per entry.
        where = _index_in(flat.dictionary, vocab).fill_null(-1).to_numpy(zero_copy_only=False)
        codes = flat.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        cols = np.where(codes >= 0, where[np.maximum(codes, 0)] if len(where) else -1, -1)
    else:
        cols = _index_in(flat, vocab).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    known = cols >= 0
    row_of = np.repeat(np.arange(n_rows), np.diff(offsets))
    unknown = np.bincount(row_of[~known], minlength=n_rows).astype(np.int64)
    return _binary_csr(row_of[known], cols[known], n_rows, len(vocab)), unknown


def _binary_csr(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> CSR:
    """``CSR.from_pairs`` (duplicates collapse, indices sorted per row) by one sort and an
    adjacent-duplicate mask: ``np.unique`` is ~50x slower on this numpy (2.4)."""
    keys = rows.astype(np.int64) * n_cols + cols
    keys.sort()
    if len(keys) > 1:
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    r, c = np.divmod(keys, n_cols)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
    return CSR(indptr, c.astype(np.int32), int(n_cols))


def _index_in(values: pa.Array, vocab: pa.Array) -> pa.Array:
    if values.type != vocab.type:
        vocab = vocab.cast(values.type)
    return pc.index_in(values, value_set=vocab)  # null where unknown (or null)


def map_histories(
    lists: Sequence[Sequence[str] | None], item_index: Mapping[str, int], n_items: int
) -> tuple[CSR, int]:
    """:func:`map_arrow_lists` for Python lists and an ``item_id -> index`` mapping;
    returns the CSR [len(lists), n_items] and the total number of unknown entries."""
    vocab: list[str | None] = [None] * n_items
    for item, i in item_index.items():
        vocab[i] = item
    arrow = pa.array([None if x is None else [str(v) for v in x] for x in lists], pa.list_(pa.string()))
    csr, unknown = map_arrow_lists(arrow, pa.array(vocab, pa.string()))
    return csr, int(unknown.sum())


# -- A/B arm assignment -------------------------------------------------------------------
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def user_hash(user_ids: pa.Array | pa.ChunkedArray, salt: str) -> np.ndarray:
    """uint64 [B]: ``fmix64(fnv1a_64(salt + b"\\x00" + user_id))`` over UTF-8 bytes.

    FNV-1a 64 is the published FNV-1a; ``fmix64`` is MurmurHash3's 64-bit finalizer, which
    spreads the last bytes of similar ids (``u1``, ``u2``, ...) over all 64 bits. Depends on
    nothing but the salt and the id, so an assignment made with it is stable across days,
    engines and machines. Vectorised over the batch (one step per byte position).
    """
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks() if user_ids.num_chunks != 1 else user_ids.chunk(0)
    arr = user_ids.cast(pa.string()).fill_null("")
    n = len(arr)
    h = np.uint64(_FNV_OFFSET)
    with np.errstate(over="ignore"):
        for byte in salt.encode() + b"\x00":
            h = (h ^ np.uint64(byte)) * _FNV_PRIME
    out = np.full(n, h, np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[arr.offset : arr.offset + n + 1].astype(np.int64)
    lengths = np.diff(offsets)
    if n and lengths.max() > 0:
        data = np.frombuffer(data_buf, np.uint8)
        starts = offsets[:-1]
        for j in range(int(lengths.max())):
            active = np.flatnonzero(lengths > j)
            out[active] = (out[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
    return _fmix64(out)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB93E53CA1A)
    return h ^ (h >> np.uint64(33))


def in_share(user_ids: pa.Array | pa.ChunkedArray, salt: str, share: float) -> np.ndarray:
    """bool [B]: users whose hash falls in the first ``share`` of the uint64 range."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if share >= 1.0:
        return np.ones(len(user_ids), bool)
    return user_hash(user_ids, salt) < np.uint64(int(share * 2.0**64))


# -- output ---------------------------------------------------------------------------------
def to_record_batch(
    user_ids: Sequence[str] | pa.Array | pa.ChunkedArray,
    scored: Scored,
    item_ids: np.ndarray | pa.Array,
    model_version: str,
    *,
    dictionary: bool = False,
) -> pa.RecordBatch:
    """One row per user in :data:`OUTPUT_SCHEMA` (or :data:`WRITE_SCHEMA` with
    ``dictionary=True``); lists hold only the valid entries."""
    n = len(scored)
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks()
    if len(user_ids) != n:
        raise ValueError(f"{len(user_ids)} user ids for {n} scored rows")
    vocab = item_ids if isinstance(item_ids, pa.Array) else pa.array(np.asarray(item_ids, dtype=object), pa.string())
    valid = np.arange(scored.item_idx.shape[1])[None, :] < scored.count[:, None]
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(scored.count, out=offsets[1:])
    offsets = pa.array(offsets)
    chosen = pa.array(scored.item_idx[valid].astype(np.int32))
    values = pa.DictionaryArray.from_arrays(chosen, vocab) if dictionary else vocab.take(chosen)
    schema = WRITE_SCHEMA if dictionary else OUTPUT_SCHEMA
    users = user_ids if isinstance(user_ids, pa.Array) else pa.array(list(user_ids), pa.string())
    source = pa.DictionaryArray.from_arrays(
        pa.array((scored.source == POPULARITY).astype(np.int8)), pa.array([MODEL, POPULARITY])
    ).cast(pa.string())
    columns = [
        users.cast(pa.string()),
        pa.ListArray.from_arrays(offsets, values).cast(schema.field("item_ids").type),
        pa.ListArray.from_arrays(offsets, pa.array(scored.scores[valid], pa.float32())),
        pa.array([model_version] * n, pa.string()),
        source,
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)
