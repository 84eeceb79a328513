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
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

if __name__ == "__main__" and not __package__:
    # Run as a script (spark-submit pipelines/build_matrix.py from a checkout): make the
    # checkout's packages importable without installing them.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import Column, DataFrame, Observation, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from piarec.cli.errors import run_command  # noqa: E402
from piarec.cli.options import parse_job_args  # noqa: E402
from piarec.config import PipelineConfig, load_config  # noqa: E402
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

# --------------------------------------------------------------------------- the weekly job
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


def _open(spark: SparkSession, cfg: PipelineConfig, uri: str, start: date, end: date) -> EventsInput:
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


def _input(uri: str, src: EventsInput, start: date, end: date) -> dict[str, Any]:
    read = set(src.partitions)
    days = [start + timedelta(days=i) for i in range((end - start).days)]
    return {
        "events_uri": uri,
        "partitions": src.partitions,
        "files": src.files,
        "missing_days": [d.isoformat() for d in days if d.isoformat() not in read],
    }


class _Clock:
    """Logs how long each step took (INFO on the ``piarec.build_matrix`` logger)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        log.info("build_matrix: %s took %.2f s", step, now - self.t)
        self.t = now


def _stage(users: int, pairs: int, items: int) -> dict[str, int]:
    return {"pairs": int(pairs), "users": int(users), "items": int(items)}


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
    start = window_end - timedelta(days=cfg.window_days)
    window = f"[{start.isoformat()}, {window_end.isoformat()})"
    clock = _Clock()
    src = _open(spark, cfg, events_uri, start, window_end)
    clock.lap(f"listing {len(src.partitions)} partitions")
    f, q = cfg.filters, cfg.quality
    bits = bucket_bits(int(spark.conf.get("spark.sql.shuffle.partitions")))

    # 1. One scan: classify every event, count by reason on the way, keep clean positives,
    #    one shuffle into a row per user. Kept in memory: everything else starts here.
    events, observed, exprs = _observed_events(spark, src, cfg, start, window_end)
    positives = events.filter((F.col("_drop") == 0) & positive_condition(cfg.positive))
    users0 = user_item_sets(positives, bits).persist()
    final = None
    try:
        with input_errors(events_uri):
            users0.count()
        clock.lap("scan, clean, positives, one row per user")
        metrics = _metrics(observed, events, exprs)
        n_read = int(metrics["events_read"])
        dropped, dirty = _dirt(metrics, f"the window {window}", q.max_dirty_fraction)
        n_window = n_read - sum(dropped.values())
        if not n_window:
            raise InputDataError(
                f"no events in the window {window} under {events_uri!r} ({n_read} events read "
                f"from its {len(src.partitions)} dt partition(s), all dropped: {dropped})"
            )
        n_positive = int(metrics["positive_events"])
        if not n_positive:
            raise InputDataError(
                f"no positive events in the window {window} among {n_window} events "
                f"(positive rule: {cfg.positive.model_dump()})"
            )

        # 2. Items that survive the bot cap and the minimum users per item (small aggregate).
        n0 = F.size("items")
        capped = n0 <= f.max_user_positives if f.max_user_positives is not None else F.lit(True)
        kept_items = None
        if f.min_item_users > 1:
            counts = item_user_counts(cap_users(users0, f.max_user_positives))
            kept_items = sorted(r.item_id for r in counts.filter(
                F.col("n_users") >= f.min_item_users).select("item_id").collect())
            clock.lap("item filter")

        # 3. Per-bucket user counts at every step: the manifest's user/pair counts and the
        #    offsets of the user index, in one small aggregate.
        n1 = F.size(items_within(kept_items))
        keep = capped & (n1 >= f.min_user_positives)
        stats = users0.groupBy(BUCKET).agg(
            F.count(F.lit(1)).alias("u0"), F.sum(n0).alias("p0"),
            F.count_if(capped).alias("u1"), F.sum(F.when(capped, n0)).alias("p1"),
            F.count_if(capped & (n1 > 0)).alias("u2"), F.sum(F.when(capped, n1)).alias("p2"),
            F.count_if(keep).alias("u3"), F.sum(F.when(keep, n1)).alias("p3"),
        ).collect()
        clock.lap("user counts per bucket")
        tot = {k: sum(int(r[k] or 0) for r in stats) for k in
               ("u0", "p0", "u1", "p1", "u2", "p2", "u3", "p3")}
        if not tot["p3"]:
            raise InputDataError(
                f"no interactions left after filters {f.model_dump()} in the window {window} "
                f"({tot['p0']} positive pairs of {tot['u0']} users before)"
            )

        # 4. The final users: filtered, indexed, split -- kept for the two writes below.
        survivors = min_positives(keep_items(cap_users(users0, f.max_user_positives), kept_items),
                                  f.min_user_positives)
        offsets = bucket_offsets({r[BUCKET]: r["u3"] for r in stats if r["u3"]})
        final = assign_split(index_users(survivors, offsets), cfg.split).persist()

        # 5. Per item: users at every step and per split of the final users, and the item
        #    index -- one small aggregate, collected (the catalogue is small).
        item_in = F.lit(True) if kept_items is None else F.col("item_id").isin(kept_items)
        per_user = users0.select(  # per-user flags first: the split hash once per user
            "items", capped.alias("_capped"), keep.alias("_keep"),
            F.when(keep, split_of(cfg.split)).alias("_split"))
        pairs = per_user.select("_capped", "_keep", "_split", F.explode("items").alias("item_id"))
        is_final = F.col("_keep") & item_in
        item_rows = index_items(pairs.groupBy("item_id").agg(
            F.count_if(is_final).cast("int").alias("n_users"),
            F.count(F.lit(1)).alias("c0"),
            F.count_if("_capped").alias("c1"),
            F.count_if(F.col("_capped") & item_in).alias("c2"),
            *[F.count_if(is_final & (F.col("_split") == s)).alias(f"n_{s}") for s in SPLITS],
        )).collect()
        clock.lap("item counts and index")
        n_items = {c: sum(1 for r in item_rows if r[c]) for c in ("c0", "c1", "c2", "n_users")}
        split_items = {s: sum(1 for r in item_rows if r[f"n_{s}"]) for s in SPLITS}
        # Items nobody keeps sort last, so the kept ones hold indices 0..I-1.
        items = spark.createDataFrame(
            [(r.item_idx, r.item_id, r.n_users) for r in item_rows if r.n_users],
            "item_idx int, item_id string, n_users int",
        )

        # 6. Load: everything under a temporary sibling, then publish (manifest, _SUCCESS).
        final_uri = layout.snapshot_uri(out_root, window_end)
        tmp = temp_sibling(final_uri)
        users_seen = Observation()
        users_out = final.select("user_idx", "user_id", "split").observe(
            users_seen, *[F.count_if(F.col("split") == s).alias(s) for s in SPLITS])
        nnz_seen = Observation()
        interactions = (
            assign_parts(final.select("user_idx", "user_id", "items", "split"), cfg.split)
            .join(F.broadcast(items.select("item_id", "item_idx")), "item_id")
            .observe(nnz_seen, *[
                F.count_if((F.col("split") == s) & (F.col("part") == p)).alias(f"{s}.{p}")
                for s in SPLITS for p in PARTS])
            .select("user_idx", "item_idx", "part")
        )
        try:
            with input_errors(events_uri):
                users_out.write.parquet(spark_path(f"{tmp}/users"))
                clock.lap("write users")
                interactions.write.parquet(spark_path(f"{tmp}/interactions"))
                clock.lap("write interactions")
                (items.coalesce(1).sortWithinPartitions("item_idx")  # small: one file
                 .write.parquet(spark_path(f"{tmp}/items")))
                clock.lap("write items")
            n_users, nnz = users_seen.get, nnz_seen.get
            splits = {}
            for s in SPLITS:
                parts = {p: int(nnz[f"{s}.{p}"]) for p in PARTS}
                splits[s] = {"users": int(n_users[s]), "items": split_items[s],
                             "nnz": sum(parts.values()), **parts}
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "window": {"start": start.isoformat(), "end": window_end.isoformat(),
                           "days": cfg.window_days},
                "events_uri": events_uri,
                "input": _input(events_uri, src, start, window_end),
                "config": {
                    "events": cfg.events.model_dump(),
                    "window_days": cfg.window_days,
                    "positive": cfg.positive.model_dump(),
                    "filters": cfg.filters.model_dump(),
                    "split": cfg.split.model_dump(),
                    "quality": cfg.quality.model_dump(),
                },
                "counts": {
                    "events_read": n_read,
                    "dropped_events": dropped,
                    "dirty_fraction": dirty,
                    "events_in_window": n_window,
                    "positive_events": n_positive,
                    "duplicate_positive_events": n_positive - tot["p0"],
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
                    "splits": splits,
                },
                "code_version": code_version(),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            publish_dir(tmp, final_uri, manifest)
            clock.lap("publish")
        except BaseException:
            remove(resolve(tmp))  # leave no half-written prefix behind
            raise
        manifest["uri"] = final_uri
        return manifest
    finally:
        users0.unpersist()
        if final is not None:
            final.unpersist()


# --------------------------------------------------------------------------- the daily job
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
    start, end = daily_window(cfg, day)
    window = f"[{start.isoformat()}, {end.isoformat()})"
    src = _open(spark, cfg, events_uri, start, end)
    events, observed, exprs = _observed_events(spark, src, cfg, start, end)
    rows = histories(events.filter(F.col("_drop") == 0), cfg.positive, cfg.scoring.seen_types)
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
    final_uri = layout.histories_uri(out_root, day)
    tmp = temp_sibling(final_uri)
    try:
        with input_errors(events_uri):
            out.write.parquet(spark_path(tmp))
        metrics = _metrics(observed, events, exprs)
        counts = written.get if int(metrics["events_read"]) > sum(
            int(metrics[r]) for r in DROP_REASONS) else {"users": 0}
        n_read = int(metrics["events_read"])
        dropped, dirty = _dirt(metrics, f"the window {window}", cfg.quality.max_dirty_fraction)
        if not int(counts["users"]):
            raise InputDataError(
                f"no events in the window {window} under {events_uri!r} ({n_read} events read "
                f"from its {len(src.partitions)} dt partition(s), all dropped: {dropped})"
            )
        manifest = {
            "schema_version": HISTORIES_SCHEMA_VERSION,
            "date": day.isoformat(),
            "window": {"start": start.isoformat(), "end": end.isoformat(),
                       "days": cfg.scoring.history_days},
            "events_uri": events_uri,
            "input": _input(events_uri, src, start, end),
            "config": {
                "events": cfg.events.model_dump(),
                "positive": cfg.positive.model_dump(),
                "seen_types": list(cfg.scoring.seen_types),
                "history_days": cfg.scoring.history_days,
                "quality": cfg.quality.model_dump(),
            },
            "counts": {
                "events_read": n_read,
                "dropped_events": dropped,
                "dirty_fraction": dirty,
                "events_in_window": n_read - sum(dropped.values()),
                "positive_events": int(metrics["positive_events"]),
                **{k: int(counts[k] or 0) for k in
                   ("users", "users_with_history", "history_items", "seen_items")},
            },
            "code_version": code_version(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        publish_dir(tmp, final_uri, manifest, manifest_name=layout.MANIFEST)
    except BaseException:
        remove(resolve(tmp))
        raise
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
