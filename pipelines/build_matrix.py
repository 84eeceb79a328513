"""Weekly snapshot job (and daily histories): viewing events -> binary user-item matrix.

    spark-submit pipelines/build_matrix.py --window-end 2024-06-03 [--events URI] [--out URI]
    spark-submit pipelines/build_matrix.py --daily --date 2024-06-03 [--events URI] [--out URI]

Weekly: read the window's partitions, drop and count dirty events, keep positive (user,
item) pairs once per user, apply the training filters (bot cap, then minimum users per item,
then minimum positives per user), index items by popularity and users by a hash order, split
users by a salted hash, split held-out users' items into fold-in and held-out parts, and
publish ``<out>/window_end=YYYY-MM-DD/`` atomically (layout in :mod:`piarec.data.snapshot`).

Daily (``--daily``): the same reading and cleaning for ``[D - scoring.history_days, D + 1)``,
one row per active user ``user_id, history, seen`` (no training filter), published as
``<out>/dt=YYYY-MM-DD/`` (default ``<storage.root>/histories``) with ``_manifest.json``.

How it stays fast: one scan of the events and one shuffle of their positive rows, into one
row per user with the sorted array of their items (``user_id``, ``items``), partitioned by a
range of a hash of ``user_id``. That frame is kept in memory; every filter, index, split and
part is a per-row array operation or a small aggregate on it, and every count in the manifest
comes from those small aggregates or from metrics observed while the data flows (no recount
of written files). No Python UDFs: all work stays in the JVM.

Reading order: what both jobs share (opening and counting the events, the manifest, the
temporary prefix), then the weekly job's steps and :func:`run`, then :func:`run_daily`, then
the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

if __name__ == "__main__" and not __package__:
    # Run as a script (spark-submit pipelines/build_matrix.py from a checkout): make the
    # checkout's packages importable without installing them.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import Column, DataFrame, Observation, Row, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from piarec.cli.errors import run_command  # noqa: E402
from piarec.cli.options import parse_job_args  # noqa: E402
from piarec.config import (  # noqa: E402
    FilterConfig,
    PipelineConfig,
    PositiveRule,
    QualityConfig,
    SplitConfig,
    load_config,
)
from piarec.errors import InputDataError  # noqa: E402
from piarec.data.snapshot import (  # noqa: E402
    HISTORIES_SCHEMA_VERSION,
    SCHEMA_VERSION,
    code_version,
)
from piarec.data.storage import publish_dir, remove, resolve, temp_sibling  # noqa: E402
from piarec.data import layout
from pipelines.events import (  # noqa: E402
    DROP_REASONS,
    EventsInput,
    check_event_types,
    daily_window,
    drop_reason,
    event_metrics,
    histories,
    input_errors,
    open_events,
    positive_condition,
)
from pipelines.matrix_transforms import (  # noqa: E402
    PARTS,
    SPLITS,
    BUCKET,
    items_within,
    assign_parts,
    assign_split,
    bucket_bits,
    bucket_offsets,
    cap_users,
    index_items,
    index_users,
    item_user_counts,
    keep_items,
    min_positives,
    split_of,
    user_item_sets,
)
from pipelines.spark import get_spark, spark_path  # noqa: E402

log = logging.getLogger("piarec.build_matrix")


# --------------------------------------------------------------------------- shared by both jobs
@dataclass(frozen=True)
class _Window:
    """The days a job reads, ``[start, end)``; ``days`` is the configured length the manifest
    reports (``window_days`` weekly, ``scoring.history_days`` daily). Prints as in messages."""

    start: date
    end: date
    days: int

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


class _Clock:
    """Logs how long each step took (INFO on the ``piarec.build_matrix`` logger)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        log.info("build_matrix: %s took %.2f s", step, now - self.t)
        self.t = now


def _open(spark: SparkSession, cfg: PipelineConfig, uri: str, start: date, end: date) -> EventsInput:
    """The events of the dt partitions in ``[start, end)``: the (lazy) frame plus the
    partitions and number of files opened. Raises :class:`InputDataError` when no partition
    falls in the window, naming the first and last dt the dataset does have."""
    check_event_types(cfg)
    src = open_events(spark, uri, cfg.events, start, end,
                      require_watch=cfg.positive.min_watch_seconds > 0)
    if not src.partitions:
        first, last = src.available or ("?", "?")
        raise InputDataError(
            f"no events in the window [{start.isoformat()}, {end.isoformat()}) under {uri!r}: "
            f"no dt partition in it (the dataset has dt {first} .. {last})"
        )
    return src


def _observed_events(
    spark: SparkSession, src: EventsInput, cfg: PipelineConfig, start: date, end: date
) -> tuple[DataFrame, Observation, list[Column]]:
    """Events with a ``_drop`` reason code, counted (by reason) as they flow through."""
    metrics = event_metrics(F.col("_drop"), positive_condition(cfg.positive))
    observed = Observation()
    events = src.df.withColumn("_drop", drop_reason(start, end, cfg.quality.known_event_types))
    return events.observe(observed, *metrics), observed, metrics


def _metrics(observed: Observation, events: DataFrame, exprs: list[Column]) -> dict[str, Any]:
    """The observed event counts. Spark loses observed metrics when adaptive execution finds
    everything after them empty (all events dropped); only then, count again."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    try:
        return dict(observed.get)
    except (Py4JJavaError, PySparkException):
        return events.agg(*exprs).first().asDict()


def _dirt(metrics: Mapping[str, int], what: str, max_fraction: float) -> tuple[dict[str, int], float]:
    """Dropped events by reason and their share of the events read; too much is an error."""
    dropped = {r: int(metrics[r]) for r in DROP_REASONS}
    read = int(metrics["events_read"])
    fraction = sum(dropped.values()) / read if read else 0.0
    if fraction > max_fraction:
        worst = ", ".join(f"{r} {n}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1]) if n)
        raise InputDataError(
            f"{fraction:.2%} of the {read} events read in {what} are dirty ({worst}); "
            f"above quality.max_dirty_fraction = {max_fraction:.2%}"
        )
    return dropped, round(fraction, 6)


def _event_counts(
    metrics: Mapping[str, int], quality: QualityConfig, window: _Window
) -> dict[str, Any]:
    """The counts both manifests start with, from the observed event ``metrics``:
    ``events_read``, ``dropped_events`` ({reason: n}), ``dirty_fraction``,
    ``events_in_window`` (read and not dropped) and ``positive_events``.

    Raises :class:`InputDataError` when more than ``quality.max_dirty_fraction`` is dirt.
    """
    n_read = int(metrics["events_read"])
    dropped, dirty = _dirt(metrics, f"the window {window}", quality.max_dirty_fraction)
    return {
        "events_read": n_read,
        "dropped_events": dropped,
        "dirty_fraction": dirty,
        "events_in_window": n_read - sum(dropped.values()),
        "positive_events": int(metrics["positive_events"]),
    }


def _all_dropped(
    window: _Window, uri: str, src: EventsInput, counts: Mapping[str, Any]
) -> InputDataError:
    """The error (returned, for the caller to raise) for a window whose partitions hold
    events but every one of them was dirt; ``counts`` as from :func:`_event_counts`."""
    return InputDataError(
        f"no events in the window {window} under {uri!r} ({counts['events_read']} events read "
        f"from its {len(src.partitions)} dt partition(s), all dropped: {counts['dropped_events']})"
    )


def _input(uri: str, src: EventsInput, start: date, end: date) -> dict[str, Any]:
    """The manifest's ``input``: ``events_uri``, the dt ``partitions`` and ``files`` read,
    and the ``missing_days`` of ``[start, end)`` that had no partition."""
    read = set(src.partitions)
    days = [start + timedelta(days=i) for i in range((end - start).days)]
    return {
        "events_uri": uri,
        "partitions": src.partitions,
        "files": src.files,
        "missing_days": [d.isoformat() for d in days if d.isoformat() not in read],
    }


def _manifest(
    schema_version: int, cfg: PipelineConfig, window: _Window, uri: str, src: EventsInput,
    config: Mapping[str, Any], counts: Mapping[str, Any], **head: Any,
) -> dict[str, Any]:
    """The manifest either job publishes, as a new dict.

    Keys: ``schema_version``, then the job's own ``head`` keys (the daily job's ``date``),
    ``window`` ({start, end, days}), ``events_uri``, ``input`` (:func:`_input`), ``config``
    (the ``events``, ``positive`` and ``quality`` sections both jobs use, around the job's
    own ``config`` keys), ``counts`` (as given), ``code_version`` and ``created_at`` (UTC,
    to the second). Call it once the outputs are written: ``created_at`` is taken here.
    """
    return {
        "schema_version": schema_version,
        **head,
        "window": {"start": window.start.isoformat(), "end": window.end.isoformat(),
                   "days": window.days},
        "events_uri": uri,
        "input": _input(uri, src, window.start, window.end),
        "config": {
            "events": cfg.events.model_dump(),
            "positive": cfg.positive.model_dump(),
            **config,
            "quality": cfg.quality.model_dump(),
        },
        "counts": dict(counts),
        "code_version": code_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@contextmanager
def _temporary(final_uri: str) -> Iterator[str]:
    """A fresh temporary sibling of ``final_uri`` (its URI) to write into and publish from.

    If anything fails inside the ``with`` -- a write, a check, the publish itself -- the
    temporary prefix is removed and the error goes on: no half-written prefix stays behind.
    """
    tmp = temp_sibling(final_uri)
    try:
        yield tmp
    except BaseException:
        remove(resolve(tmp))  # leave no half-written prefix behind
        raise


# --------------------------------------------------------------------------- the weekly job
def _weekly_event_counts(
    metrics: Mapping[str, int], quality: QualityConfig, positive: PositiveRule,
    window: _Window, uri: str, src: EventsInput,
) -> dict[str, Any]:
    """:func:`_event_counts` for the training window, which must keep at least one clean
    event and one positive event (else :class:`InputDataError`)."""
    counts = _event_counts(metrics, quality, window)
    if not counts["events_in_window"]:
        raise _all_dropped(window, uri, src, counts)
    if not counts["positive_events"]:
        raise InputDataError(
            f"no positive events in the window {window} among {counts['events_in_window']} events "
            f"(positive rule: {positive.model_dump()})"
        )
    return counts


def _kept_items(users: DataFrame, f: FilterConfig, clock: _Clock) -> list[str] | None:
    """The item ids (sorted) that at least ``f.min_item_users`` users hold once the bot cap
    has gone; None -- keep every item, nothing is computed -- when ``min_item_users`` is 1.

    ``users``: one row per user with ``items``. One small aggregate, collected.
    """
    if f.min_item_users <= 1:
        return None
    counts = item_user_counts(cap_users(users, f.max_user_positives))
    kept = sorted(r.item_id for r in counts.filter(
        F.col("n_users") >= f.min_item_users).select("item_id").collect())
    clock.lap("item filter")
    return kept


class _UserRules(NamedTuple):
    """The filters as columns over the one-row-per-user frame (``items``)."""

    n0: Column  # int: the user's positive items
    capped: Column  # bool: within the bot cap (all true without one)
    n1: Column  # int: the user's items that survive the item filter
    keep: Column  # bool: a final user -- capped, and enough items left


def _user_rules(f: FilterConfig, kept_items: Sequence[str] | None) -> _UserRules:
    """The columns of :class:`_UserRules` for ``f`` and the items :func:`_kept_items` kept."""
    n0 = F.size("items")
    capped = n0 <= f.max_user_positives if f.max_user_positives is not None else F.lit(True)
    n1 = F.size(items_within(kept_items))
    return _UserRules(n0, capped, n1, capped & (n1 >= f.min_user_positives))


# Users (u) and (user, item) pairs (p) after each step: 0 the positives, 1 the bot cap,
# 2 the item filter (u: users with an item left), 3 the minimum positives per user.
_STEPS = ("u0", "p0", "u1", "p1", "u2", "p2", "u3", "p3")


def _bucket_stats(users: DataFrame, rules: _UserRules) -> list[Row]:
    """One row per user bucket: ``_bucket`` and the counts of :data:`_STEPS` in it (the
    ``p`` ones None for a bucket where nothing is left). Both the manifest's user and pair
    counts and the user index offsets (``u3``) come from this one small aggregate."""
    n0, capped, n1, keep = rules
    return users.groupBy(BUCKET).agg(
        F.count(F.lit(1)).alias("u0"), F.sum(n0).alias("p0"),
        F.count_if(capped).alias("u1"), F.sum(F.when(capped, n0)).alias("p1"),
        F.count_if(capped & (n1 > 0)).alias("u2"), F.sum(F.when(capped, n1)).alias("p2"),
        F.count_if(keep).alias("u3"), F.sum(F.when(keep, n1)).alias("p3"),
    ).collect()


def _step_totals(stats: Sequence[Row], f: FilterConfig, window: _Window) -> dict[str, int]:
    """``{step: total}`` over the buckets of :func:`_bucket_stats`. Raises
    :class:`InputDataError` when no interaction survives the filters ``f``."""
    tot = {k: sum(int(r[k] or 0) for r in stats) for k in _STEPS}
    if not tot["p3"]:
        raise InputDataError(
            f"no interactions left after filters {f.model_dump()} in the window {window} "
            f"({tot['p0']} positive pairs of {tot['u0']} users before)"
        )
    return tot


def _final_users(
    users: DataFrame, f: FilterConfig, split: SplitConfig, kept_items: Sequence[str] | None,
    stats: Sequence[Row],
) -> DataFrame:
    """The snapshot's users: ``users`` through the filters, items restricted to the kept
    ones, plus ``user_idx`` (dense, in user order; each bucket's offset from the ``u3``
    of ``stats``) and ``split``. Lazy: the caller persists it for the two writes."""
    survivors = min_positives(keep_items(cap_users(users, f.max_user_positives), kept_items),
                              f.min_user_positives)
    offsets = bucket_offsets({r[BUCKET]: r["u3"] for r in stats if r["u3"]})
    return assign_split(index_users(survivors, offsets), split)


def _item_rows(
    users: DataFrame, rules: _UserRules, kept_items: Sequence[str] | None, split: SplitConfig
) -> list[Row]:
    """One row per item any user holds, collected (the catalogue is small): ``item_idx``,
    ``item_id``, ``n_users`` (final users holding it), users holding it at each step --
    ``c0`` positives, ``c1`` within the bot cap, ``c2`` also past the item filter -- and
    ``n_train`` / ``n_val`` / ``n_test``, final users of each split. ``item_idx`` as in
    :func:`index_items`, so items no final user keeps sort last. One small aggregate."""
    _, capped, _, keep = rules
    item_in = F.lit(True) if kept_items is None else F.col("item_id").isin(kept_items)
    per_user = users.select(  # per-user flags first: the split hash once per user
        "items", capped.alias("_capped"), keep.alias("_keep"),
        F.when(keep, split_of(split)).alias("_split"))
    pairs = per_user.select("_capped", "_keep", "_split", F.explode("items").alias("item_id"))
    is_final = F.col("_keep") & item_in
    return index_items(pairs.groupBy("item_id").agg(
        F.count_if(is_final).cast("int").alias("n_users"),
        F.count(F.lit(1)).alias("c0"),
        F.count_if("_capped").alias("c1"),
        F.count_if(F.col("_capped") & item_in).alias("c2"),
        *[F.count_if(is_final & (F.col("_split") == s)).alias(f"n_{s}") for s in SPLITS],
    )).collect()


def _item_index(spark: SparkSession, item_rows: Sequence[Row]) -> DataFrame:
    """The snapshot's items, ``[item_idx int, item_id string, n_users int]``: those of
    :func:`_item_rows` that a final user holds."""
    # Items nobody keeps sort last, so the kept ones hold indices 0..I-1.
    return spark.createDataFrame(
        [(r.item_idx, r.item_id, r.n_users) for r in item_rows if r.n_users],
        "item_idx int, item_id string, n_users int",
    )


def _write_snapshot(
    tmp: str, final: DataFrame, items: DataFrame, split: SplitConfig, clock: _Clock
) -> tuple[Observation, Observation]:
    """Write ``users/`` (user_idx, user_id, split), ``interactions/`` (user_idx, item_idx,
    part) and ``items/`` (one file, by item_idx) as Parquet under ``tmp``.

    Returns what was observed during the writes, to read after them: users per split
    (``{split: n}``) and interactions per split and part (``{"split.part": n}``).
    """
    users_seen = Observation()
    users_out = final.select("user_idx", "user_id", "split").observe(
        users_seen, *[F.count_if(F.col("split") == s).alias(s) for s in SPLITS])
    nnz_seen = Observation()
    interactions = (
        assign_parts(final.select("user_idx", "user_id", "items", "split"), split)
        .join(F.broadcast(items.select("item_id", "item_idx")), "item_id")
        .observe(nnz_seen, *[
            F.count_if((F.col("split") == s) & (F.col("part") == p)).alias(f"{s}.{p}")
            for s in SPLITS for p in PARTS])
        .select("user_idx", "item_idx", "part")
    )
    users_out.write.parquet(spark_path(f"{tmp}/users"))
    clock.lap("write users")
    interactions.write.parquet(spark_path(f"{tmp}/interactions"))
    clock.lap("write interactions")
    (items.coalesce(1).sortWithinPartitions("item_idx")  # small: one file
     .write.parquet(spark_path(f"{tmp}/items")))
    clock.lap("write items")
    return users_seen, nnz_seen


def _stage(users: int, pairs: int, items: int) -> dict[str, int]:
    return {"pairs": int(pairs), "users": int(users), "items": int(items)}


def _filter_counts(
    positive_events: int, tot: Mapping[str, int], item_rows: Sequence[Row]
) -> dict[str, Any]:
    """The weekly manifest's counts of what each step kept and dropped:
    ``duplicate_positive_events`` (positive events beyond one per user and item), users,
    pairs and items at each stage (``positive``, ``after_user_cap``, ``after_item_filter``,
    ``after_user_filter``), and ``dropped_users`` / ``dropped_items`` / ``dropped_pairs``
    by cause. ``tot`` from :func:`_step_totals`, ``item_rows`` from :func:`_item_rows`."""
    n_items = {c: sum(1 for r in item_rows if r[c]) for c in ("c0", "c1", "c2", "n_users")}
    return {
        "duplicate_positive_events": positive_events - tot["p0"],
        "positive": _stage(tot["u0"], tot["p0"], n_items["c0"]),
        "after_user_cap": _stage(tot["u1"], tot["p1"], n_items["c1"]),
        "after_item_filter": _stage(tot["u2"], tot["p2"], n_items["c2"]),
        "after_user_filter": _stage(tot["u3"], tot["p3"], n_items["n_users"]),
        "dropped_users": {
            "over_max_positives": tot["u0"] - tot["u1"],
            "under_min_positives": tot["u1"] - tot["u3"],
        },
        "dropped_items": {
            "under_min_users": n_items["c1"] - n_items["c2"],
            "no_users_left": n_items["c2"] - n_items["n_users"],
        },
        "dropped_pairs": {
            "over_max_positives": tot["p0"] - tot["p1"],
            "under_min_item_users": tot["p1"] - tot["p2"],
            "under_min_positives": tot["p2"] - tot["p3"],
        },
    }


def _split_counts(
    users_seen: Observation, nnz_seen: Observation, item_rows: Sequence[Row]
) -> dict[str, dict[str, int]]:
    """The manifest's ``splits``: per split, ``users``, ``items`` (with a user of the
    split), ``nnz`` and nnz per part (train, fold_in, held_out). The observations are those
    :func:`_write_snapshot` returns, read once the writes are done."""
    n_users, nnz = users_seen.get, nnz_seen.get
    splits = {}
    for s in SPLITS:
        parts = {p: int(nnz[f"{s}.{p}"]) for p in PARTS}
        splits[s] = {"users": int(n_users[s]), "items": sum(1 for r in item_rows if r[f"n_{s}"]),
                     "nnz": sum(parts.values()), **parts}
    return splits


def run(
    spark: SparkSession, cfg: PipelineConfig, events_uri: str, window_end: date, out_root: str
) -> dict[str, Any]:
    """Build and publish the snapshot for the window ``[window_end - window_days, window_end)``.

    Writes ``<out_root>/window_end=YYYY-MM-DD/`` (interactions/, users/, items/,
    manifest.json, _SUCCESS) through a temporary sibling, replacing an older snapshot of the
    same window atomically. Returns the manifest (plus ``uri``). Raises
    :class:`InputDataError` -- and publishes nothing -- when the window holds no events, too
    many are dirty, a file cannot be read, or nothing survives the positive rule and filters.
    """
    window = _Window(window_end - timedelta(days=cfg.window_days), window_end, cfg.window_days)
    clock = _Clock()
    src = _open(spark, cfg, events_uri, window.start, window.end)
    clock.lap(f"listing {len(src.partitions)} partitions")
    bits = bucket_bits(int(spark.conf.get("spark.sql.shuffle.partitions")))

    # 1. One scan: classify every event, count by reason on the way, keep clean positives,
    #    one shuffle into a row per user. Kept in memory: everything else starts here.
    events, observed, exprs = _observed_events(spark, src, cfg, window.start, window.end)
    positives = events.filter((F.col("_drop") == 0) & positive_condition(cfg.positive))
    users = user_item_sets(positives, bits).persist()
    final = None
    try:
        with input_errors(events_uri):
            users.count()
        clock.lap("scan, clean, positives, one row per user")
        event_counts = _weekly_event_counts(_metrics(observed, events, exprs), cfg.quality,
                                            cfg.positive, window, events_uri, src)
        # 2. Items that survive the bot cap and the minimum users per item.
        kept_items = _kept_items(users, cfg.filters, clock)
        rules = _user_rules(cfg.filters, kept_items)
        # 3. Per-bucket user counts at every step (manifest counts, user index offsets).
        stats = _bucket_stats(users, rules)
        clock.lap("user counts per bucket")
        totals = _step_totals(stats, cfg.filters, window)
        # 4. The final users: filtered, indexed, split -- kept for the two writes below.
        final = _final_users(users, cfg.filters, cfg.split, kept_items, stats).persist()
        # 5. Per item: counts at every step and per split, and the item index.
        item_rows = _item_rows(users, rules, kept_items, cfg.split)
        clock.lap("item counts and index")
        items = _item_index(spark, item_rows)
        # 6. Load: everything under a temporary sibling, then publish (manifest, _SUCCESS).
        final_uri = layout.snapshot_uri(out_root, window_end)
        with _temporary(final_uri) as tmp:
            with input_errors(events_uri):
                seen = _write_snapshot(tmp, final, items, cfg.split, clock)
            counts = {**event_counts,
                      **_filter_counts(event_counts["positive_events"], totals, item_rows),
                      "splits": _split_counts(*seen, item_rows)}
            config = {"window_days": cfg.window_days, "filters": cfg.filters.model_dump(),
                      "split": cfg.split.model_dump()}
            manifest = _manifest(SCHEMA_VERSION, cfg, window, events_uri, src, config, counts)
            publish_dir(tmp, final_uri, manifest, manifest_name=layout.SNAPSHOT_MANIFEST)
            clock.lap("publish")
        manifest["uri"] = final_uri
        return manifest
    finally:
        users.unpersist()
        if final is not None:
            final.unpersist()


# --------------------------------------------------------------------------- the daily job
# The histories' own counts, observed while they are written.
_HISTORY_COUNTS = ("users", "users_with_history", "history_items", "seen_items")


def _history_rows(
    events: DataFrame, positive: PositiveRule, seen_types: Sequence[str]
) -> tuple[DataFrame, Observation]:
    """The histories to write -- ``[user_id string, history array<string>, seen
    array<string>]``, one row per user with a clean event, sorted by user_id within each
    partition -- and the observation that counts :data:`_HISTORY_COUNTS` as they are written.
    ``events``: as from :func:`_observed_events` (dirt is dropped here)."""
    rows = histories(events.filter(F.col("_drop") == 0), positive, seen_types)
    written = Observation()
    out = (
        rows.select("user_id",
                    F.col("history").cast("array<string>"), F.col("seen").cast("array<string>"))
        .observe(written, F.count(F.lit(1)).alias("users"),
                 F.count_if(F.size("history") > 0).alias("users_with_history"),
                 F.sum(F.size("history")).alias("history_items"),
                 F.sum(F.size("seen")).alias("seen_items"))
        .sortWithinPartitions("user_id")
    )
    return out, written


def _history_counts(written: Observation, metrics: Mapping[str, int]) -> Mapping[str, Any]:
    """The counts ``written`` observed (:data:`_HISTORY_COUNTS`, the sums None when empty);
    just ``{"users": 0}`` when every event was dropped -- then Spark may never report the
    observation (adaptive execution skips the empty plan), so it is not asked."""
    if int(metrics["events_read"]) > sum(int(metrics[r]) for r in DROP_REASONS):
        return written.get
    return {"users": 0}


def run_daily(
    spark: SparkSession, cfg: PipelineConfig, events_uri: str, day: date, out_root: str
) -> dict[str, Any]:
    """Publish day ``day``'s histories: ``<out_root>/dt=YYYY-MM-DD/`` (Parquet + ``_manifest.json``).

    One row per user active in ``[day - scoring.history_days, day + 1)`` (any clean event):
    ``user_id`` string, ``history`` list<string> (positives), ``seen`` list<string> (events
    of ``scoring.seen_types``), both sorted and distinct -- the rows of
    :func:`pipelines.events.daily_histories`. Training filters do not apply. Returns the
    manifest (plus ``uri``); raises :class:`InputDataError` like :func:`run`.
    """
    window = _Window(*daily_window(cfg, day), cfg.scoring.history_days)
    src = _open(spark, cfg, events_uri, window.start, window.end)
    events, observed, exprs = _observed_events(spark, src, cfg, window.start, window.end)
    out, written = _history_rows(events, cfg.positive, cfg.scoring.seen_types)
    final_uri = layout.histories_uri(out_root, day)
    with _temporary(final_uri) as tmp:
        with input_errors(events_uri):
            out.write.parquet(spark_path(tmp))
        metrics = _metrics(observed, events, exprs)
        rows_seen = _history_counts(written, metrics)
        event_counts = _event_counts(metrics, cfg.quality, window)
        if not int(rows_seen["users"]):
            raise _all_dropped(window, events_uri, src, event_counts)
        counts = {**event_counts, **{k: int(rows_seen[k] or 0) for k in _HISTORY_COUNTS}}
        config = {"seen_types": list(cfg.scoring.seen_types),
                  "history_days": cfg.scoring.history_days}
        manifest = _manifest(HISTORIES_SCHEMA_VERSION, cfg, window, events_uri, src, config, counts,
                             date=day.isoformat())
        publish_dir(tmp, final_uri, manifest, manifest_name=layout.MANIFEST)
    manifest["uri"] = final_uri
    return manifest


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``spark-submit pipelines/build_matrix.py ...``: the options of ``piarec build-matrix``
    (:mod:`piarec.cli.options`), then :func:`run_from_args`; one summary or error line."""
    args = parse_job_args("build-matrix", argv, prog="build_matrix")
    return run_command(lambda: run_from_args(args), args.debug, prog="build_matrix")


def run_from_args(args: argparse.Namespace) -> int:
    """Load config, build the session, run the weekly or daily build, print its summary
    (also what ``piarec build-matrix`` runs)."""
    cfg = load_config(args.config)
    spark = get_spark(cfg.spark)
    events = args.events or layout.events_root(cfg.storage)
    if args.daily:
        m = run_daily(spark, cfg, events, args.date, args.out or layout.histories_root(cfg.storage))
    else:
        m = run(spark, cfg, events, args.window_end, args.out or layout.snapshots_root(cfg.storage))
    c = m["counts"]
    if args.daily:
        print(
            f"histories {m['uri']}: window [{m['window']['start']}, {m['window']['end']}), "
            f"{c['users']} active users ({c['users_with_history']} with a history), "
            f"{c['events_read']} events read, {sum(c['dropped_events'].values())} dropped"
        )
        return 0
    s = c["splits"]
    print(
        f"snapshot {m['uri']}: window [{m['window']['start']}, {m['window']['end']}), "
        f"{sum(v['users'] for v in s.values())} users "
        f"(train {s['train']['users']}, val {s['val']['users']}, test {s['test']['users']}), "
        f"{c['after_user_filter']['items']} items, {sum(v['nnz'] for v in s.values())} interactions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
