"""Event transforms shared by the weekly matrix build and the daily scoring job.

Both jobs must agree on what an event, a window, a positive and a seen title are, so
those rules live here once:

* :func:`read_events` reads only the ``dt=YYYY-MM-DD`` partitions of a window and renames
  the configured columns to the canonical ``user_id, item_id, event_type, ts,
  watch_seconds``;
* :func:`in_window` keeps ``start <= ts < end`` (a partition is a hint, ``ts`` decides);
* :func:`positive_condition` / :func:`positive_pairs` apply the positive rule;
* :func:`seen_condition` / :func:`seen_pairs` mark consumed titles;
* :func:`daily_histories` is the daily mode: one row per active user with their positive
  history and seen titles for scoring day D.

All dates and times are UTC (the session time zone is set by :mod:`pipelines.spark`).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Iterable

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from piarec.config import EventsSchema, PipelineConfig, PositiveRule
from piarec.errors import InputDataError
from pipelines.spark import spark_path

__all__ = [
    "CANONICAL_COLUMNS",
    "read_events",
    "in_window",
    "window_condition",
    "positive_condition",
    "positive_pairs",
    "seen_condition",
    "seen_pairs",
    "daily_histories",
    "utc_midnight",
]

CANONICAL_COLUMNS = ("user_id", "item_id", "event_type", "ts", "watch_seconds")
PARTITION_COL = "dt"


def utc_midnight(day: date) -> datetime:
    """00:00 UTC of ``day``: the edge of every window."""
    return datetime.combine(day, time.min, tzinfo=timezone.utc)


def read_events(
    spark: SparkSession,
    uri: str,
    schema: EventsSchema,
    start: date,
    end: date,
    *,
    require_watch: bool = True,
) -> DataFrame:
    """Events of the partitions ``dt`` in ``[start, end)``, with canonical column names.

    Output: ``user_id`` string, ``item_id`` string, ``event_type`` string, ``ts`` timestamp
    (UTC), ``watch_seconds`` int. Only the window's partitions are scanned: the filter is on
    the partition column, so Spark prunes the others before opening a file.

    ``require_watch=False`` lets a source without a watch-time column through (its
    ``watch_seconds`` is null); callers pass it when the positive rule ignores watch time.

    Raises :class:`InputDataError` when the path does not exist or holds no Parquet, when it
    is not partitioned by ``dt``, or when configured columns are missing (all are named).
    """
    path = spark_path(uri)
    try:
        raw = spark.read.parquet(path)
    except AnalysisException as exc:
        condition = exc.getCondition() or ""
        if condition == "PATH_NOT_FOUND":
            raise InputDataError(f"events path {uri!r} does not exist") from None
        if condition == "UNABLE_TO_INFER_SCHEMA":
            raise InputDataError(f"events path {uri!r} holds no Parquet files") from None
        raise

    found = raw.columns
    if PARTITION_COL not in found:
        raise InputDataError(
            f"events at {uri!r} are not partitioned by {PARTITION_COL}=YYYY-MM-DD folders "
            f"(columns found: {', '.join(found)})"
        )
    wanted = {
        "user_id": schema.user_col,
        "item_id": schema.item_col,
        "event_type": schema.type_col,
        "ts": schema.ts_col,
    }
    if require_watch:
        wanted["watch_seconds"] = schema.watch_col
    missing = [f"{src!r} (for {canon})" for canon, src in wanted.items() if src not in found]
    if missing:
        raise InputDataError(
            f"events at {uri!r} lack configured column(s) {', '.join(missing)}; "
            f"columns found: {', '.join(found)} (fix the `events` section of the config)"
        )

    ts_type = raw.schema[schema.ts_col].dataType
    if not isinstance(ts_type, (T.TimestampType, T.TimestampNTZType)):
        raise InputDataError(
            f"events column {schema.ts_col!r} must be a timestamp, found {ts_type.simpleString()}"
        )

    in_partitions = raw.filter(_partition_range(raw, start, end))
    watch = (
        F.col(schema.watch_col).cast("int")
        if schema.watch_col in found
        else F.lit(None).cast("int")
    )
    return in_partitions.select(
        F.col(schema.user_col).cast("string").alias("user_id"),
        F.col(schema.item_col).cast("string").alias("item_id"),
        F.col(schema.type_col).cast("string").alias("event_type"),
        # A timestamp without zone is read as UTC wall-clock time (session zone is UTC).
        F.col(schema.ts_col).cast("timestamp").alias("ts"),
        watch.alias("watch_seconds"),
    )


def _partition_range(raw: DataFrame, start: date, end: date) -> Column:
    """``start <= dt < end`` in whatever type Spark inferred for ``dt``."""
    dt_type = raw.schema[PARTITION_COL].dataType
    if isinstance(dt_type, T.DateType):
        lo, hi = F.lit(start), F.lit(end)
    else:
        # Partition values that do not all parse as dates stay strings; ISO dates sort
        # lexicographically, so the same range still selects the right folders.
        lo, hi = F.lit(start.isoformat()), F.lit(end.isoformat())
    return (F.col(PARTITION_COL) >= lo) & (F.col(PARTITION_COL) < hi)


def _ts_literal(value: datetime | date) -> Column:
    """A timestamp literal independent of the driver's local zone (naive = UTC)."""
    if not isinstance(value, datetime):
        value = utc_midnight(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    micros = (value - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    return F.timestamp_micros(F.lit(micros))


def window_condition(start_ts: datetime | date, end_ts: datetime | date) -> Column:
    """True for events kept by :func:`in_window` (also used to count them in one pass)."""
    valid_id = lambda c: F.col(c).isNotNull() & (F.length(F.trim(F.col(c))) > 0)  # noqa: E731
    return (
        (F.col("ts") >= _ts_literal(start_ts))
        & (F.col("ts") < _ts_literal(end_ts))
        & valid_id("user_id")
        & valid_id("item_id")
    )


def in_window(df: DataFrame, start_ts: datetime | date, end_ts: datetime | date) -> DataFrame:
    """Events with ``start_ts <= ts < end_ts`` and non-empty ids.

    ``dt`` partitions are written by the upstream owner and may hold late or early events;
    the timestamp is the authority, so an event in an in-window partition whose ``ts`` falls
    outside is dropped. Dates mean 00:00 UTC; naive datetimes are UTC.
    """
    return df.filter(window_condition(start_ts, end_ts))


def positive_condition(rule: PositiveRule) -> Column:
    """True for an event that counts as a positive under ``rule``.

    A null watch time passes only when the rule does not look at watch time
    (``min_watch_seconds == 0``).
    """
    cond = F.col("event_type").isin(list(rule.event_types))
    if rule.min_watch_seconds > 0:
        cond = cond & (F.coalesce(F.col("watch_seconds"), F.lit(0)) >= rule.min_watch_seconds)
    return cond


def positive_pairs(df: DataFrame, rule: PositiveRule) -> DataFrame:
    """Distinct ``[user_id, item_id]`` with at least one positive event (binary matrix)."""
    return df.filter(positive_condition(rule)).select("user_id", "item_id").distinct()


def seen_condition(seen_types: Iterable[str]) -> Column:
    """True for an event of a consumption type (a seen title, positive or not)."""
    return F.col("event_type").isin(list(seen_types))


def seen_pairs(df: DataFrame, seen_types: Iterable[str]) -> DataFrame:
    """Distinct ``[user_id, item_id]`` with at least one event of a type in ``seen_types``."""
    return df.filter(seen_condition(seen_types)).select("user_id", "item_id").distinct()


def daily_histories(
    spark: SparkSession, events_uri: str, cfg: PipelineConfig, date: date
) -> DataFrame:
    """Histories for scoring day ``date`` (D).

    Window: ``[D - cfg.scoring.history_days days, D + 1 day)`` in UTC. One row per active
    user (any event of any type in the window)::

        user_id string, history array<string>, seen array<string>

    ``history``: the user's positive item_ids (``cfg.positive``), sorted and distinct;
    ``seen``: item_ids with an event of a type in ``cfg.scoring.seen_types``, sorted and
    distinct. Both may be empty. Training filters are not applied: every active user is
    scored. One shuffle: a single group-by of the window's events by user.
    """
    start = date - timedelta(days=cfg.scoring.history_days)
    end = date + timedelta(days=1)
    raw = read_events(
        spark,
        events_uri,
        cfg.events,
        start,
        end,
        require_watch=cfg.positive.min_watch_seconds > 0,
    )
    events = in_window(raw, start, end)
    # collect_set skips nulls, so a non-matching event adds nothing but still makes the
    # user active (the group exists); an inactive user has no row at all.
    return events.groupBy("user_id").agg(
        F.sort_array(
            F.collect_set(F.when(positive_condition(cfg.positive), F.col("item_id")))
        ).alias("history"),
        F.sort_array(
            F.collect_set(F.when(seen_condition(cfg.scoring.seen_types), F.col("item_id")))
        ).alias("seen"),
    )
