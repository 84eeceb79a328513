"""The checks the DAG tasks run in the project environment: ``piarec ops <command>``.

    piarec ops events-ready --window-end 2026-04-06   (or --day D, or --start S --end E)
    piarec ops snapshot-uri --window-end 2026-04-06 [--require-published]
    piarec ops validate --date 2026-04-09 --arms champion,challenger [--k 100] [--sample N]
    piarec ops mark-done --date 2026-04-09 --arms champion

Airflow itself never imports piarec (its environment has no torch or pyspark); these
commands read the pipeline configuration exactly as the jobs do (``PIAREC_CONFIG``,
``PIAREC__*``) and use piarec's own storage, scorer schema and event rules. The options
live in :mod:`piarec.cli.options`; here are the functions, which print their result line
and return the exit status.

Exit codes: 0 = done / ready / valid; 1 = not ready yet (``events-ready``, so a sensor
pokes again); 2 = an error or a failed validation (:class:`PiarecError`, raised here and
reported in one line by the CLI).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from piarec.config import EventsSchema, PipelineConfig, StorageConfig
from piarec.errors import PiarecError
from piarec.scoring import arrow
from piarec.scoring.arrow import OUTPUT_SCHEMA
from piarec.data.storage import SUCCESS, exists, is_published, read_json, resolve, write_bytes, write_json
from piarec.data import layout
from piarec.data.layout import MANIFEST, VALIDATION

__all__ = ["NOT_READY", "PiarecError", "ValidationFailed", "days", "events_ready", "mark_done",
           "missing_partitions", "recs_uri", "snapshot_uri", "validate", "validate_arm"]

NOT_READY = 1  # events-ready: a sensor pokes again


class ValidationFailed(PiarecError):
    """The published recommendations break a contract; the message lists every problem."""


def days(start: dt.date, end: dt.date) -> list[dt.date]:
    """Every day in ``[start, end)``."""
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


def missing_partitions(storage: StorageConfig, events: EventsSchema, start: dt.date, end: dt.date) -> list[str]:
    """The ``dt=YYYY-MM-DD`` event partitions of ``[start, end)`` that are not complete yet:
    no ``events.done_marker`` file in them (the folder alone may still be being written)."""
    root = resolve(layout.events_root(storage))
    return [layout.day_dir(d) for d in days(start, end) if not exists(root.child(layout.day_dir(d), events.done_marker))]


def recs_uri(storage: StorageConfig, day: dt.date, arm: str | None = None) -> str:
    """The recommendations of ``day``: one arm's folder, or the day's."""
    root = layout.recommendations_root(storage)
    return layout.arm_uri(root, day, arm) if arm else layout.day_uri(root, day)


# --------------------------------------------------------------------------- validation
def _seen_on_sample(cfg: PipelineConfig, day: dt.date, users: list[str]) -> dict[str, set[str]]:
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


def validate_arm(cfg: PipelineConfig, day: dt.date, arm: str, k: int | None, sample: int) -> dict[str, Any]:
    """Check one published arm partition; returns a summary, raises ValidationFailed.

    The files are streamed batch by batch (memory does not grow with the day's size but for
    the uniqueness check's 64-bit hash per user): schema, counts against the manifest, each
    user once, at most k titles (exactly k unless the user has seen nearly everything),
    finite scores in rank order for every user, the manifest's model version, and no seen
    title on a sample of users."""
    uri = recs_uri(cfg.storage, day, arm)
    if not is_published(uri):
        raise ValidationFailed(f"{uri} is not published (no {SUCCESS})")
    loc = resolve(uri)
    if not exists(loc.child(MANIFEST)):
        raise ValidationFailed(f"{uri} has no {MANIFEST}")
    manifest = read_json(loc.child(MANIFEST))
    data = ds.dataset(loc.path, filesystem=loc.fs, format="parquet")
    if not data.schema.remove_metadata().equals(OUTPUT_SCHEMA, check_metadata=False):
        raise ValidationFailed(f"{uri}: schema {data.schema.remove_metadata()} differs from {OUTPUT_SCHEMA}")

    def batches():
        # File by file with the Parquet reader, no pre-buffering: it decodes a row group
        # page by page as batches are taken, so memory does not grow with row-group size.
        for path in sorted(data.files):
            with loc.fs.open_input_file(path) as handle:
                reader = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
                yield from reader.iter_batches(65_536, use_threads=False)

    want_k = int(k if k is not None else manifest.get("k", cfg.scoring.k))
    n_items = int(manifest.get("model", {}).get("n_items", 0))
    n = data.count_rows()
    rng = np.random.default_rng(int(day.strftime("%Y%m%d")))
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
    stats = _DayStats(hashes=np.empty(n, np.uint64))
    for batch in batches():
        lo = stats.rows
        picks = rows[(rows >= lo) & (rows < lo + batch.num_rows)] - lo
        _scan_batch(stats, batch, min(want_k, n_items) if n_items else 0, picks)
    problems = _problems(manifest, stats, day, arm, want_k, _duplicate_users(stats, batches))
    part = stats.sample
    seen = _seen_on_sample(cfg, day, part["user_id"])
    overlap = [u for u, items in zip(part["user_id"], part["item_ids"]) if seen.get(u, set()) & set(items)]
    if overlap:
        problems.append(f"{len(overlap)} of {len(rows)} sampled users get titles they have seen, e.g. {overlap[:3]}")
    if problems:
        raise ValidationFailed(f"{uri}: " + "; ".join(problems))
    versions = sorted(stats.versions)
    return {"arm": arm, "uri": uri, "users": stats.rows, "by_source": stats.by_source, "k": want_k,
            "model_version": versions[0] if versions else None, "sampled": int(len(rows))}


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
    if stats.short > 0.01 * max(n, 1):
        problems.append(f"{stats.short} users get fewer than k={want_k} titles")
    if sorted(stats.versions) != ([str(manifest.get("model", {}).get("version"))] if n else []):
        problems.append(f"model_version {sorted(stats.versions)} differs from the manifest's")
    if stats.bad_scores:
        problems.append(f"{stats.bad_scores} users have non-finite or unordered scores")
    return problems


# --------------------------------------------------------------------------- commands
def events_ready(cfg: PipelineConfig, *, day: dt.date | None = None, window_end: dt.date | None = None,
                 start: dt.date | None = None, end: dt.date | None = None) -> int:
    """0 when every event partition of the range is complete (holds ``events.done_marker``),
    else :data:`NOT_READY`.

    The range: ``day`` -> ``[day, day + 1)`` (the daily run of day D needs D's partition);
    ``window_end`` -> the training window ``[window_end - window_days, window_end)``;
    otherwise ``[start, end)``.
    """
    if day:
        start, end = day, day + dt.timedelta(days=1)
    elif window_end:
        start, end = window_end - dt.timedelta(days=cfg.window_days), window_end
    if not (start and end):
        raise PiarecError("events-ready needs --day, --window-end, or --start and --end")
    missing = missing_partitions(cfg.storage, cfg.events, start, end)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(f"waiting for {len(missing)} event partition(s) under {layout.events_root(cfg.storage)} "
              f"to be complete ({cfg.events.done_marker}): {shown}")
        return NOT_READY
    print(f"all {len(days(start, end))} event partitions of [{start}, {end}) are complete")
    return 0


def snapshot_uri(cfg: PipelineConfig, window_end: dt.date, *, require_published: bool = False) -> int:
    """Print the snapshot URI of ``window_end`` (the last line: Airflow pushes it to XCom)."""
    uri = layout.snapshot_uri(layout.snapshots_root(cfg.storage), window_end)
    if require_published and not is_published(uri):
        raise PiarecError(f"snapshot {uri} is not published")
    print(uri)
    return 0


def validate(cfg: PipelineConfig, day: dt.date, arms: Sequence[str], *, k: int | None = None,
             sample: int = 1000) -> int:
    """Validate every arm of ``day``; write and print the day's ``_validation.json``."""
    results = [validate_arm(cfg, day, arm, k, sample) for arm in arms]
    report = {"date": day.isoformat(), "arms": results,
              "validated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(resolve(recs_uri(cfg.storage, day)).child(VALIDATION), report)
    print(json.dumps(report))
    return 0


def mark_done(cfg: PipelineConfig, day: dt.date, arms: Sequence[str]) -> int:
    """Write ``recommendations/dt=D/_SUCCESS`` once every arm of ``arms`` was validated."""
    loc = resolve(recs_uri(cfg.storage, day))
    validation = loc.child(VALIDATION)
    if not exists(validation):
        raise PiarecError(f"{loc.uri} has no {VALIDATION}; run validate first")
    validated = {a["arm"] for a in read_json(validation).get("arms", [])}
    if not set(arms) <= validated:
        raise PiarecError(f"arms {sorted(set(arms) - validated)} of {loc.uri} were not validated")
    write_bytes(loc.child(SUCCESS), b"")
    print(f"{loc.uri}/{SUCCESS}")
    return 0
