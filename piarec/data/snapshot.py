"""Reading a published training snapshot, and the layouts ``pipelines/build_matrix.py`` writes.

Snapshot, ``<root>/window_end=YYYY-MM-DD/``::

    _versions/<version>/   the committed version (:mod:`piarec.data.commit`):
        interactions/   user_idx int32, item_idx int32, part string (train | fold_in | held_out)
        users/          user_idx int32, user_id string, split string (train | val | test)
        items/          item_idx int32, item_id string, n_users int32
    _SUCCESS        the commit pointer; its manifest: schema_version, window, input
                    partitions read, config used, counts at every step (events read, dropped
                    events by reason, positives, after each filter, dropped users / items /
                    pairs by reason, users / items / nnz per split and part), code_version,
                    created_at. A prefix without it is not a snapshot.

``item_idx`` ranks titles by users (descending) then item_id; ``user_idx`` ranks users by
``(zlib.crc32(user_id.encode()), user_id)``. Both are dense from 0.

Daily histories for scoring, ``<root>/dt=YYYY-MM-DD/`` (:func:`piarec.data.layout.histories_uri`)::

    _versions/<version>/*.parquet   user_id string, history list<string>, seen
                      list<string>; one row per user active in [D - scoring.history_days,
                      D + 1); lists sorted, distinct
    _SUCCESS          the commit pointer; its manifest: schema_version, date, window,
                      input, config, counts

Plain pyarrow + numpy (no Spark), through :mod:`piarec.data.storage`, so local folders and
``s3://`` read the same way. The files are checked against the manifest's counts, so a
damaged or hand-edited snapshot fails here rather than as a silently worse model.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from piarec.errors import InputDataError
from piarec.data.csr import CSR
from piarec.data.layout import SNAPSHOT_MANIFEST
from piarec.data.reader import open_committed
from piarec.data.storage import Location, exists

__all__ = [
    "SCHEMA_VERSION", "SPLITS", "PARTS", "Split", "TrainShard", "Snapshot", "load_snapshot",
    "HISTORIES_SCHEMA", "HISTORIES_SCHEMA_VERSION",
    "code_version",
]

SCHEMA_VERSION = 1
HISTORIES_SCHEMA_VERSION = 1
HISTORIES_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("history", pa.list_(pa.string())),
    ("seen", pa.list_(pa.string())),
])
SPLITS = ("train", "val", "test")
PARTS = ("train", "fold_in", "held_out")


@dataclass(frozen=True)
class Split:
    """Held-out users of one split (val or test); rows of all three fields are aligned."""

    user_ids: np.ndarray  # object (str) [U_s], in user_idx order
    fold_in: CSR  # [U_s, I] the model's input
    held_out: CSR  # [U_s, I] items to predict

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class TrainShard:
    """What a snapshot loaded for one of ``world`` processes holds of the training users:
    ``Snapshot.train`` rows are the training users ``rank, rank + world, rank + 2 world, ...``
    (in user_idx order); the rest describes all of them."""

    rank: int
    world: int
    n_users: int  # training users over every shard
    nnz: int  # their positives
    item_users: np.ndarray  # int64 [I]: training users per item, over every shard


@dataclass(frozen=True)
class Snapshot:
    """A training snapshot in memory. Item positions are ``item_idx`` everywhere."""

    uri: str
    manifest: dict[str, Any]
    item_ids: np.ndarray  # object (str) [I], position = item_idx
    item_popularity: np.ndarray  # int64 [I], users per item (descending by construction)
    train: CSR  # [U_train, I] all positives of train-split users
    train_user_ids: np.ndarray  # object (str) [U_train], rows of ``train``
    val: Split
    test: Split
    shard: TrainShard | None = None  # None: ``train`` holds every training user

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_train_users(self) -> int:
        """Training users over every shard."""
        return self.train.n_rows if self.shard is None else self.shard.n_users

    @property
    def train_nnz(self) -> int:
        """Training positives over every shard."""
        return self.train.nnz if self.shard is None else self.shard.nnz

    def train_popularity(self) -> np.ndarray:
        """float32 [I]: training users per item over every shard (the popularity baseline,
        :func:`piarec.models.baselines.train_popularity` of the whole training matrix)."""
        if self.shard is None:
            return np.bincount(self.train.indices, minlength=self.train.n_cols).astype(np.float32)
        return self.shard.item_users.astype(np.float32)

    def manifest_digest(self) -> str:
        """sha256 of the manifest (canonical JSON): which data a model was fitted on."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> dict[str, str | None]:
    """What wrote an output: ``{"piarec": __version__, "git_commit": sha or None}``.

    The commit comes from ``$PIAREC_GIT_COMMIT`` (set when an image is built) or from the
    checkout the package runs from; None when neither is available. Never raises.
    """
    from piarec import __version__

    commit = os.environ.get("PIAREC_GIT_COMMIT") or None
    if commit is None:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                capture_output=True, text=True, timeout=5, check=True,
            )
            commit = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"piarec": __version__, "git_commit": commit}


def _dataset(loc: Location, name: str) -> ds.Dataset:
    """The Parquet files of the snapshot's ``name/`` folder (InputDataError without one)."""
    sub = loc.child(name)
    if not exists(sub):
        raise InputDataError(f"snapshot {loc.uri!r} has no {name}/ folder")
    # Spark's own markers (_SUCCESS, .crc files) are skipped by the default ignore_prefixes.
    return ds.dataset(sub.path, filesystem=loc.fs, format="parquet")


def _read(loc: Location, name: str, columns: list[str]) -> pa.Table:
    return _dataset(loc, name).to_table(columns=columns)


def _is(column: pa.Array | pa.ChunkedArray, value: str) -> np.ndarray:
    """bool [n]: ``column == value`` (null = False), vectorised in Arrow."""
    return pc.fill_null(pc.equal(column, value), False).to_numpy(zero_copy_only=False)


def _index(column: pa.Array, bound: int, uri: str) -> np.ndarray:
    """An interactions index column as int32 [n], checked to lie in [0, bound)."""
    if len(column):
        bounds = pc.min_max(column)
        if column.null_count or bounds["min"].as_py() < 0 or bounds["max"].as_py() >= bound:
            raise InputDataError(f"snapshot {uri!r}: interactions point outside users/ or items/")
    return column.to_numpy().astype(np.int32, copy=False)


def _dense(values: np.ndarray, what: str, uri: str) -> None:
    if not np.array_equal(values, np.arange(len(values))):
        raise InputDataError(f"snapshot {uri!r}: {what} is not a dense 0..{len(values) - 1} index")


def _items(loc: Location) -> tuple[np.ndarray, np.ndarray]:
    """items/: ids (object [I]) and training-user counts (int64 [I]) by dense item_idx."""
    items = _read(loc, "items", ["item_idx", "item_id", "n_users"]).sort_by("item_idx")
    _dense(items.column("item_idx").to_numpy(), "item_idx", loc.uri)
    return items.column("item_id").to_numpy().astype(object), items.column("n_users").to_numpy().astype(np.int64)


def _users(loc: Location) -> tuple[pa.Array, np.ndarray]:
    """users/: ids (an Arrow string array [U]) and split codes (int8 [U], the index in SPLITS)
    by user_idx. The ids stay in Arrow (about 17 bytes a user against about 70 as Python
    strings) until :func:`_interactions` takes the ones the process keeps."""
    users = _read(loc, "users", ["user_idx", "user_id", "split"]).sort_by("user_idx")
    _dense(users.column("user_idx").to_numpy(), "user_idx", loc.uri)
    user_ids = users.column("user_id").combine_chunks()
    split_col = users.column("split")
    user_split = np.full(len(user_ids), -1, dtype=np.int8)
    for code, name in enumerate(SPLITS):
        user_split[_is(split_col, name)] = code
    if (user_split < 0).any():
        raise InputDataError(f"snapshot {loc.uri!r}: users/ holds a split outside {SPLITS}")
    return user_ids, user_split


# (split code, part) -> where its pairs go; train users hold only "train" pairs, held-out users
# only "fold_in" and "held_out" ones.
_PIECES = ((0, "train"), (1, "fold_in"), (1, "held_out"), (2, "fold_in"), (2, "held_out"))


def _interactions(loc: Location, uri: str, user_ids: pa.Array, user_split: np.ndarray, n_items: int,
                  shard: tuple[int, int]):
    """interactions/ as the train CSR and the val/test splits, read one record batch at a
    time, with no read-ahead (the scanner otherwise decodes whole files ahead of the loop):
    only the int32 (row, item) pairs of each piece accumulate, never the whole table, an
    int64 copy or a Python object per positive (benchmarks/train_scale.py --load-users;
    docs/training-scale.md). Of the training users only the ``shard``
    (rank, world) is kept: training row t goes to row t // world of the rank t % world;
    every training pair is still counted (``counted``: nnz, and users per item when world > 1)."""
    rank, world = shard
    dataset = _dataset(loc, "interactions")
    local = np.full(len(user_ids), -1, dtype=np.int32)  # user_idx -> row within its split
    members = {code: np.flatnonzero(user_split == code) for code in range(len(SPLITS))}
    for rows in members.values():
        local[rows] = np.arange(len(rows), dtype=np.int32)
    counted = {"nnz": 0, "item_users": np.zeros(n_items, np.int64)}
    pieces: dict[tuple[int, str], tuple[list, list]] = {key: ([], []) for key in _PIECES}
    for batch in dataset.to_batches(columns=["user_idx", "item_idx", "part"], batch_size=1 << 22,
                                    batch_readahead=0, fragment_readahead=0):
        u = _index(batch.column(0), len(user_ids), uri)
        i = _index(batch.column(1), n_items, uri)
        part = {p: _is(batch.column(2), p) for p in PARTS}
        row_split = user_split[u]
        if (part["train"] != (row_split == 0)).any() or not (part["train"] | part["fold_in"] | part["held_out"]).all():
            raise InputDataError(f"snapshot {uri!r}: interaction parts contradict user splits")
        for (code, name), (r, c) in pieces.items():
            sel = part[name] & (row_split == code)
            rows, cols = local[u[sel]], i[sel]
            if code == 0:
                counted["nnz"] += len(cols)
                if world > 1:  # a shard's own rows cannot give these counts
                    counted["item_users"] += np.bincount(cols, minlength=n_items)
                    mine = rows % world == rank
                    rows, cols = rows[mine] // world, cols[mine]
            r.append(rows)
            c.append(cols)

    def csr(code: int, name: str, n_rows: int) -> CSR:
        r, c = pieces.pop((code, name))
        rows, cols = (np.concatenate(x) if x else np.zeros(0, np.int32) for x in (r, c))
        del r[:], c[:]
        return CSR.from_pairs(rows, cols, n_rows, n_items)

    pa.default_memory_pool().release_unused()  # the scan's buffers, before the CSRs are built

    def ids(rows: np.ndarray) -> np.ndarray:  # Python strings only for the users kept
        return user_ids.take(pa.array(rows)).to_numpy(zero_copy_only=False)

    train_ids = ids(members[0][rank::world])
    train = csr(0, "train", len(train_ids))
    splits = {name: Split(ids(members[code]), csr(code, "fold_in", len(members[code])),
                          csr(code, "held_out", len(members[code])))
              for code, name in ((1, "val"), (2, "test"))}
    return train_ids, train, splits, counted


def load_snapshot(uri: str, *, shard: tuple[int, int] | None = None) -> Snapshot:
    """Load the published snapshot at ``uri`` (local path or ``s3://``).

    ``shard=(rank, world)``: keep only that process's training users (rows rank, rank +
    world, ... of the training matrix; :class:`TrainShard`), as each rank of a data-parallel
    run does: the training matrix in memory shrinks by ``world``; validation and test users
    are loaded whole. The counts are still checked over every training user. A shard of one
    process is the whole snapshot (``shard`` None).

    Raises :class:`InputDataError` when the prefix is not published (no ``_SUCCESS``), the
    schema version is unknown, indices are not dense, parts contradict splits, or the
    files disagree with the manifest's counts.
    """
    got = open_committed(uri, legacy_manifest=SNAPSHOT_MANIFEST)
    if got is None:
        raise InputDataError(
            f"snapshot {uri!r} is not published (no _SUCCESS marker); "
            "build it with pipelines/build_matrix.py or pick a published window"
        )
    manifest = got.manifest or {}
    loc = got.loc if got.version is None else got.loc.child("_versions", got.version)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputDataError(
            f"snapshot {uri!r} has schema_version {manifest.get('schema_version')!r}; "
            f"this code reads version {SCHEMA_VERSION}"
        )

    rank, world = shard or (0, 1)
    if not 0 <= rank < world:
        raise ValueError(f"shard (rank, world) needs 0 <= rank < world, got {shard}")
    item_ids, popularity = _items(loc)
    n_items = len(item_ids)
    user_ids, user_split = _users(loc)

    train_ids, train, splits, counted = _interactions(loc, uri, user_ids, user_split, n_items, (rank, world))
    n_train = int((user_split == 0).sum())
    _check_counts(uri, manifest, n_items, {
        "train": (n_train, {"train": counted["nnz"], "fold_in": 0, "held_out": 0}),
        **{name: (s.n_users, {"train": 0, "fold_in": s.fold_in.nnz, "held_out": s.held_out.nnz})
           for name, s in splits.items()},
    })
    return Snapshot(
        uri=loc.uri,
        manifest=manifest,
        item_ids=item_ids,
        item_popularity=popularity,
        train=train,
        train_user_ids=train_ids,
        val=splits["val"],
        test=splits["test"],
        shard=TrainShard(rank, world, n_train, counted["nnz"], counted["item_users"]) if world > 1 else None,
    )


def _check_counts(
    uri: str, manifest: dict[str, Any], n_items: int, found: dict[str, tuple[int, dict[str, int]]]
) -> None:
    """Compare users and nnz per split and part (and the item count) with the manifest."""
    counts = manifest.get("counts", {})
    expected_items = counts.get("after_user_filter", {}).get("items")
    problems = []
    if expected_items != n_items:
        problems.append(f"items: manifest {expected_items}, files {n_items}")
    for name, (n_users, nnz) in found.items():
        want = counts.get("splits", {}).get(name, {})
        if want.get("users") != n_users:
            problems.append(f"{name} users: manifest {want.get('users')}, files {n_users}")
        for p, n in nnz.items():
            if want.get(p) != n:
                problems.append(f"{name} {p} nnz: manifest {want.get(p)}, files {n}")
    if problems:
        raise InputDataError(f"snapshot {uri!r} disagrees with its manifest: {'; '.join(problems)}")
