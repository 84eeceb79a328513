"""Weekly snapshot job (and daily histories): viewing events -> binary user-item matrix.

    spark-submit pipelines/build_matrix.py --window-end 2024-06-03 [--events URI] [--out URI]
    spark-submit pipelines/build_matrix.py --daily --date 2024-06-03 [--events URI] [--out URI]

Weekly: read the window's partitions, drop and count dirty events, keep positive (user,
item) pairs once per user, apply the training filters (bot cap, then minimum users per item,
then minimum positives per user), index items by popularity and users by a hash order, split
users by a salted hash, split held-out users' items into fold-in and held-out parts, and
commit ``<out>/window_end=YYYY-MM-DD/`` in one step (:mod:`piarec.data.commit`; layout in
:mod:`piarec.data.snapshot`).

Daily (``--daily``): the same reading and cleaning for ``[D - scoring.history_days, D + 1)``,
one row per active user ``user_id, history, seen`` (no training filter), committed as
``<out>/dt=YYYY-MM-DD/`` (default ``<storage.root>/histories``), the manifest in its pointer.

How it stays fast: one scan of the events and one shuffle of their positive rows, into one
row per user with the sorted array of their items (``user_id``, ``items``), partitioned by a
range of a hash of ``user_id``. That frame is kept in memory; every filter, index, split and
part is a per-row array operation or a small aggregate on it, and every count in the manifest
comes from those small aggregates or from metrics observed while the data flows (no recount
of written files). No Python UDFs: all work stays in the JVM.

Reading order: :func:`run` (its steps in :mod:`pipelines.snapshot_steps`), then
:func:`run_daily`, then the command line; what both share (opening and counting the events,
the manifest) is :mod:`pipelines.build_common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import date, timedelta
from typing import Any, Mapping, Sequence

from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from piarec.cli.errors import run_command
from piarec.cli.options import parse_job_args
from piarec.config import PipelineConfig, PositiveRule, load_config
from piarec.data.snapshot import HISTORIES_SCHEMA_VERSION, SCHEMA_VERSION
from piarec.data.commit import PartitionCommit
from piarec.data.storage import resolve
from piarec.data import layout
from piarec.errors import InputDataError
from pipelines.events import DROP_REASONS, histories, input_errors, positive_condition
from pipelines.matrix_transforms import bucket_bits, user_item_sets
from pipelines import build_common as common
from pipelines import snapshot_steps as steps
from pipelines.spark import get_spark, spark_path

log = logging.getLogger("piarec.build_matrix")


def run(
    spark: SparkSession, cfg: PipelineConfig, events_uri: str, window_end: date, out_root: str
) -> dict[str, Any]:
    """Build and publish the snapshot for the window ``[window_end - window_days, window_end)``.

    Writes ``<out_root>/window_end=YYYY-MM-DD/`` (interactions/, users/, items/ under a new
    version, the manifest in the commit pointer ``_SUCCESS``), replacing an older snapshot
    of the same window in one step. Returns the manifest (plus ``uri``). Raises
    :class:`InputDataError` -- and publishes nothing -- when the window holds no events, too
    many are dirty, a file cannot be read, or nothing survives the positive rule and filters.
    """
    window = common.Window(window_end - timedelta(days=cfg.window_days), window_end, cfg.window_days)
    clock = common.Clock()
    src = common.open_window(spark, cfg, events_uri, window.start, window.end)
    clock.lap(f"listing {len(src.partitions)} partitions")
    bits = bucket_bits(int(spark.conf.get("spark.sql.shuffle.partitions")))

    # 1. One scan: classify every event, count by reason on the way, keep clean positives,
    #    one shuffle into a row per user. Kept in memory: everything else starts here.
    events, observed, exprs = common.observed_events(spark, src, cfg, window.start, window.end)
    positives = events.filter((F.col("_drop") == 0) & positive_condition(cfg.positive))
    users = user_item_sets(positives, bits).persist()
    final = None
    try:
        with input_errors(events_uri):
            users.count()
        clock.lap("scan, clean, positives, one row per user")
        event_counts = steps.weekly_event_counts(common.observed_metrics(observed, events, exprs), cfg.quality,
                                            cfg.positive, window, events_uri, src)
        # 2. Items that survive the bot cap and the minimum users per item.
        kept_items = steps.kept_items(users, cfg.filters, clock)
        rules = steps.user_rules(cfg.filters, kept_items)
        # 3. Per-bucket user counts at every step (manifest counts, user index offsets).
        stats = steps.bucket_stats(users, rules)
        clock.lap("user counts per bucket")
        totals = steps.step_totals(stats, cfg.filters, window)
        # 4. The final users: filtered, indexed, split -- kept for the two writes below.
        final = steps.final_users(users, cfg.filters, cfg.split, kept_items, stats).persist()
        # 5. Per item: counts at every step and per split, and the item index.
        item_rows = steps.item_rows(users, rules, kept_items, cfg.split)
        clock.lap("item counts and index")
        items = steps.item_index(spark, item_rows)
        # 6. Load: everything under this run's version, then one commit (manifest in _SUCCESS).
        final_uri = layout.snapshot_uri(out_root, window_end)
        with PartitionCommit.of(cfg.storage, final_uri, "snapshot") as run:
            with input_errors(events_uri):
                seen = steps.write_snapshot(run.data_uri, final, items, cfg.split, clock)
            counts = {**event_counts,
                      **steps.filter_counts(event_counts["positive_events"], totals, item_rows),
                      "splits": steps.split_counts(*seen, item_rows)}
            config = {"window_days": cfg.window_days, "filters": cfg.filters.model_dump(),
                      "split": cfg.split.model_dump()}
            manifest = common.build_manifest(SCHEMA_VERSION, cfg, window, events_uri, src, config, counts)
            run.commit(manifest)
            clock.lap("commit")
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
    ``events``: the clean events of :meth:`pipelines.build_common.DailyEvents.clean`."""
    rows = histories(events, positive, seen_types)
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
    """Commit day ``day``'s histories: ``<out_root>/dt=YYYY-MM-DD/`` (Parquet; the manifest in ``_SUCCESS``).

    One row per user active in ``[day - scoring.history_days, day + 1)`` (any clean event):
    ``user_id`` string, ``history`` list<string> (positives), ``seen`` list<string> (events
    of ``scoring.seen_types``), both sorted and distinct -- the rows of
    :func:`pipelines.events.daily_histories`. Training filters do not apply. Returns the
    manifest (plus ``uri``); raises :class:`InputDataError` like :func:`run`.
    """
    daily = common.open_daily(spark, cfg, events_uri, day)
    out, written = _history_rows(daily.clean(), cfg.positive, cfg.scoring.seen_types)
    final_uri = layout.histories_uri(out_root, day)
    with PartitionCommit.of(cfg.storage, final_uri, "histories day") as run:
        with input_errors(events_uri):
            out.write.parquet(spark_path(run.data_uri))
        metrics = daily.metrics()
        rows_seen = _history_counts(written, metrics)
        event_counts = daily.counts(metrics, cfg.quality, int(rows_seen["users"]))
        counts = {**event_counts, **{k: int(rows_seen[k] or 0) for k in _HISTORY_COUNTS}}
        config = {"seen_types": list(cfg.scoring.seen_types),
                  "history_days": cfg.scoring.history_days}
        manifest = common.build_manifest(HISTORIES_SCHEMA_VERSION, cfg, daily.window, events_uri, daily.src, config,
                                         counts, date=day.isoformat())
        run.commit(manifest, validate=lambda files: _check_rows(files, counts["users"], final_uri))
    manifest["uri"] = final_uri
    return manifest


def _check_rows(files: list[str], users: int, uri: str) -> dict[str, int]:
    """The histories' files hold one row per counted user (from their footers), or the
    day is not committed."""
    import pyarrow.parquet as pq

    fs = resolve(uri).fs
    rows = 0
    for path in files:
        with fs.open_input_file(path) as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    if rows != users:
        raise InputDataError(f"histories {uri}: the files hold {rows} rows for {users} users; nothing was committed")
    return {"rows": rows, "files": len(files)}


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
