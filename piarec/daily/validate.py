"""Validation of a recommendations day before it is committed (and of a committed one).

:func:`validate_arm_files` streams one arm's Parquet files once, batch by batch, so memory
does not grow with the day but for the uniqueness check's 64-bit hash per user, and checks
them against the arm's manifest: the schema, counts, each user once, at most k titles
(exactly k unless the user has seen nearly everything), finite scores in rank order for
every user, the manifest's model version, and no seen title on a sample of users (their
seen events read back from the event partitions).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from piarec.config import PipelineConfig
from piarec.data import layout
from piarec.data.storage import exists, resolve
from piarec.errors import ValidationFailed
from piarec.scoring import arrow
from piarec.scoring.arrow import OUTPUT_SCHEMA

__all__ = ["days", "seen_in_histories", "seen_on_sample", "validate_arm_files"]

BATCH_ROWS = 65_536


def days(start: dt.date, end: dt.date) -> list[dt.date]:
    """Every day in ``[start, end)``."""
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


def seen_on_sample(cfg: PipelineConfig, day: dt.date, users: list[str]) -> dict[str, set[str]]:
    """Seen titles of ``users`` at ``day``: every event of a seen type in
    ``[day - history_days, day + 1)`` (the scoring window), read from the event partitions."""
    start, end = day - dt.timedelta(days=cfg.scoring.history_days), day + dt.timedelta(days=1)
    ec = cfg.events
    loc = resolve(layout.events_root(cfg.storage))
    paths = [loc.child(layout.day_dir(d)).path for d in days(start, end) if exists(loc.child(layout.day_dir(d)))]
    if not paths or not users:
        return {}
    data = ds.dataset([ds.dataset(p, filesystem=loc.fs, format="parquet") for p in paths])
    lo = pa.scalar(dt.datetime.combine(start, dt.time(), dt.timezone.utc))
    hi = pa.scalar(dt.datetime.combine(end, dt.time(), dt.timezone.utc))
    ts = ds.field(ec.ts_col)
    ts_type = data.schema.field(ec.ts_col).type
    if pa.types.is_timestamp(ts_type):
        lo, hi = lo.cast(ts_type), hi.cast(ts_type)
    table = data.to_table(
        columns=[ec.user_col, ec.item_col],
        filter=ds.field(ec.user_col).isin(users) & ds.field(ec.type_col).isin(cfg.scoring.seen_types)
        & (ts >= lo) & (ts < hi),
    )
    seen: dict[str, set[str]] = {}
    for user, item in zip(table.column(ec.user_col).to_pylist(), table.column(ec.item_col).to_pylist()):
        seen.setdefault(str(user), set()).add(str(item))
    return seen


def seen_in_histories(fs: pafs.FileSystem, files: list[str], users: list[str]) -> dict[str, set[str]]:
    """Seen titles of ``users`` as the scoring input had them: the ``seen`` lists of a
    histories partition's ``files`` (a filtered scan; memory holds only those users)."""
    if not users or not files:
        return {}
    wanted = pa.array(users, pa.string())

    def scan(path: str) -> dict[str, set[str]]:  # one batch at a time: memory does not grow with the day
        found = {}
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle, pre_buffer=False).iter_batches(
                    BATCH_ROWS, columns=["user_id", "seen"], use_threads=False):
                hit = batch.filter(pc.is_in(batch.column("user_id"), value_set=wanted))
                for u, seen in zip(hit.column("user_id").to_pylist(), hit.column("seen").to_pylist()):
                    found[str(u)] = set(seen or ())
        return found

    out: dict[str, set[str]] = {}
    with concurrent.futures.ThreadPoolExecutor(min(len(files), os.cpu_count() or 1)) as pool:
        for found in pool.map(scan, files):
            out.update(found)
    return out


@dataclass
class _DayStats:
    """What :func:`validate_arm` gathers while it streams an arm's files once."""

    rows: int = 0
    by_source: dict[str, int] = field(default_factory=lambda: {"model": 0, "popularity": 0})
    versions: set = field(default_factory=set)
    max_len: int = 0
    short: int = 0  # users with fewer than min(k, n_items) titles
    ragged: int = 0  # users whose item_ids and scores differ in length
    bad_scores: int = 0  # users with a non-finite score or scores out of rank order
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # one uint64 per row, filled in place
    sample: dict[str, list] = field(default_factory=lambda: {"user_id": [], "item_ids": []})


def _scan_batch(stats: _DayStats, batch: pa.RecordBatch, floor: int, picks: np.ndarray) -> None:
    """Fold one record batch of an arm into ``stats``; ``picks`` are the batch's rows sampled
    for the seen-titles check."""
    n = batch.num_rows
    source = batch.column("source")
    for s in stats.by_source:
        stats.by_source[s] += int(pc.sum(pc.equal(source, s)).as_py() or 0)
    stats.versions.update(pc.unique(batch.column("model_version")).to_pylist())
    items, scores = batch.column("item_ids"), batch.column("scores")
    lens = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    score_lens = pc.list_value_length(scores).to_numpy(zero_copy_only=False)
    stats.ragged += int((lens != score_lens).sum())
    stats.max_len = max(stats.max_len, int(lens.max(initial=0)))
    stats.short += int((lens < floor).sum())
    # Scores finite and non-increasing inside each user's list, every row checked.
    flat = pc.list_flatten(scores).to_numpy(zero_copy_only=False).astype(np.float64)
    owner = np.repeat(np.arange(n), score_lens)
    bad = ~np.isfinite(flat)
    rising = np.flatnonzero((np.diff(flat) > 0) & (owner[1:] == owner[:-1]))
    stats.bad_scores += len(np.union1d(owner[bad], owner[rising + 1]))
    stats.hashes[stats.rows : stats.rows + n] = arrow.user_hash(batch.column("user_id"), "")
    if len(picks):
        taken = batch.take(pa.array(picks)).to_pydict()
        stats.sample["user_id"] += taken["user_id"]
        stats.sample["item_ids"] += taken["item_ids"]
    stats.rows += n


def _duplicate_users(stats: _DayStats, batches) -> int:
    """How many user ids appear more than once. Sorting the 64-bit hashes in place finds
    candidates in 8 bytes a user; only rows whose hash repeats are compared by id (a second
    pass), so a hash collision is never reported as a duplicate."""
    h = stats.hashes[: stats.rows]
    h.sort()
    repeated = np.unique(h[1:][h[1:] == h[:-1]])
    if not len(repeated):
        return 0
    ids: list[str] = []
    for batch in batches():
        ids += pc.filter(batch.column("user_id"), pa.array(np.isin(arrow.user_hash(batch.column("user_id"), ""), repeated))).to_pylist()
    return len(ids) - len(set(ids))


def _row_groups(fs: pafs.FileSystem, path: str, where: str) -> list[tuple[str, int, int, pq.FileMetaData]]:
    """``(path, row group, rows, footer)`` of each row group of an output file, whose schema
    must be the output contract. The footer is read once here and handed to the scans."""
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle)
        schema = meta.schema_arrow.remove_metadata()
        if not schema.equals(OUTPUT_SCHEMA, check_metadata=False):
            raise ValidationFailed(f"{where}: {path} has schema {schema}, not {OUTPUT_SCHEMA}")
        return [(path, g, meta.metadata.row_group(g).num_rows, meta.metadata) for g in range(meta.num_row_groups)]


def validate_arm_files(fs: pafs.FileSystem, files: list[str], manifest: dict[str, Any], *, where: str,
                       day: dt.date, arm: str, k: int | None, sample: int,
                       seen: Callable[[list[str]], dict[str, set[str]]]) -> dict[str, Any]:
    """Check one arm's files (paths on ``fs``) against its ``manifest`` (the day's common
    fields plus the arm's ``model``, ``counts``); returns a summary, raises
    :class:`ValidationFailed` naming ``where`` and every problem. ``k`` defaults to the
    manifest's; ``seen(users)`` gives the seen titles of the sampled users."""
    if not files:
        raise ValidationFailed(f"{where}: arm {arm} has no data files")

    def group_batches(path: str, group: int, footer: pq.FileMetaData):
        # With the Parquet reader, no pre-buffering: it decodes a row group page by page
        # as batches are taken, so memory does not grow with row-group size. Titles stay
        # dictionary-encoded as written: lengths and the sample need no strings (and such
        # lists cannot be read across row groups). The footer is _row_groups' (no re-read).
        with fs.open_input_file(path) as handle:
            reader = pq.ParquetFile(handle, metadata=footer, pre_buffer=False, buffer_size=1 << 20,
                                    read_dictionary=["item_ids.list.element"])
            yield from reader.iter_batches(BATCH_ROWS, row_groups=[group], use_threads=False)

    def batches():
        for path, group, _, footer in units:
            yield from group_batches(path, group, footer)

    want_k = int(k if k is not None else manifest.get("k", 0))
    n_items = int(manifest.get("model", {}).get("n_items", 0))
    units = [unit for path in files for unit in _row_groups(fs, path, where)]  # (path, group, rows, footer)
    starts = np.concatenate([[0], np.cumsum([u[2] for u in units])]).astype(np.int64)
    n = int(starts[-1])
    rng = np.random.default_rng(int(day.strftime("%Y%m%d")))
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
    hashes = np.empty(n, np.uint64)
    floor = min(want_k, n_items) if n_items else 0

    def scan(i: int) -> _DayStats:
        """One row group's stats; its rows' hashes go into its slice of ``hashes``."""
        lo, hi = starts[i], starts[i + 1]
        part = _DayStats(hashes=hashes[lo:hi])
        mine = rows[(rows >= lo) & (rows < hi)] - lo
        path, group, _, footer = units[i]
        for batch in group_batches(path, group, footer):
            at = part.rows
            _scan_batch(part, batch, floor, mine[(mine >= at) & (mine < at + batch.num_rows)] - at)
        return part

    # Row groups are scanned in parallel (Parquet decoding and numpy release the GIL).
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(units), os.cpu_count() or 1))) as pool:
        stats = _merge(list(pool.map(scan, range(len(units)))), hashes)
    problems = _problems(manifest, stats, day, arm, want_k, _duplicate_users(stats, batches))
    part = stats.sample
    seen_titles = seen(part["user_id"])
    withheld = set(manifest.get("withheld", {}).get("item_ids", []))
    overlap = [u for u, items in zip(part["user_id"], part["item_ids"]) if seen_titles.get(u, set()) & set(items)]
    if overlap:
        problems.append(f"{len(overlap)} of {len(rows)} sampled users get titles they have seen, e.g. {overlap[:3]}")
    unavailable = [u for u, items in zip(part["user_id"], part["item_ids"]) if withheld & set(items)]
    if unavailable:
        problems.append(f"{len(unavailable)} of {len(rows)} sampled users get titles the availability table "
                        f"withholds, e.g. {unavailable[:3]}")
    # Fewer than k titles only when the user has seen (or may not get) all the others.
    short = [u for u, items in zip(part["user_id"], part["item_ids"])
             if len(items) < want_k and len(seen_titles.get(u, set()) | withheld) < n_items - len(items)]
    if short:
        problems.append(f"{len(short)} of {len(rows)} sampled users get fewer than k={want_k} titles without having "
                        f"seen the rest, e.g. {short[:3]}")
    if problems:
        raise ValidationFailed(f"{where}: " + "; ".join(problems))
    versions = sorted(stats.versions)
    return {"arm": arm, "users": stats.rows, "by_source": stats.by_source, "k": want_k, "short": stats.short,
            "model_version": versions[0] if versions else None, "sampled": int(len(rows))}


def _merge(parts: list[_DayStats], hashes: np.ndarray) -> _DayStats:
    """The stats of an arm from those of its files, in file order."""
    out = _DayStats(hashes=hashes)
    for p in parts:
        out.rows += p.rows
        for s in out.by_source:
            out.by_source[s] += p.by_source[s]
        out.versions |= p.versions
        out.max_len = max(out.max_len, p.max_len)
        out.short += p.short
        out.ragged += p.ragged
        out.bad_scores += p.bad_scores
        for key in out.sample:
            out.sample[key] += p.sample[key]
    return out


def _problems(manifest: dict[str, Any], stats: _DayStats, day: dt.date, arm: str, want_k: int,
              duplicates: int) -> list[str]:
    """Every broken contract of a streamed arm, one phrase each."""
    problems = []
    counts, n = manifest.get("counts", {}), stats.rows
    if counts.get("users") != n:
        problems.append(f"{n} rows but the manifest counts {counts.get('users')} users")
    if counts.get("by_source") != stats.by_source:
        problems.append(f"rows by source {stats.by_source} differ from the manifest's {counts.get('by_source')}")
    if duplicates:
        problems.append(f"user_id is not unique ({duplicates} repeated rows)")
    if manifest.get("date") != day.isoformat() or manifest.get("arm") != arm:
        problems.append(f"manifest names date {manifest.get('date')} arm {manifest.get('arm')}")
    if manifest.get("k") != want_k:
        problems.append(f"the manifest's k {manifest.get('k')} is not the requested {want_k}")
    if stats.ragged:
        problems.append("item_ids and scores differ in length for some users")
    if stats.max_len > want_k:
        problems.append(f"some users get {stats.max_len} > k={want_k} titles")
    if sorted(stats.versions) != ([str(manifest.get("model", {}).get("version"))] if n else []):
        problems.append(f"model_version {sorted(stats.versions)} differs from the manifest's")
    if stats.bad_scores:
        problems.append(f"{stats.bad_scores} users have non-finite or unordered scores")
    return problems
