"""Event transforms shared by the weekly matrix build and the daily histories / scoring jobs.

Both jobs must agree on what an event, a window, a positive and a seen title are, so
those rules live here once:

* :func:`open_events` / :func:`read_events` (from :mod:`pipelines.event_source`) read only
  the ``dt=YYYY-MM-DD`` partitions of a window (the folders are listed first and only those
  are handed to Spark) and rename the configured columns to the canonical ``user_id,
  item_id, event_type, ts, watch_seconds``; missing or mistyped columns fail with every
  problem named;
* :func:`drop_reason` / :func:`clean_events` drop tolerable dirt -- null or blank ids, a null
  ``ts``, a ``ts`` outside the window inside an in-window partition (a partition is a hint,
  ``ts`` decides), an unknown event type -- and :func:`event_metrics` counts it by reason;
* :func:`positive_condition` / :func:`positive_pairs` apply the positive rule;
* :func:`seen_condition` / :func:`seen_pairs` mark consumed titles;
* :func:`histories` / :func:`daily_histories` are the daily mode: one row per active user
  with their positive history and seen titles for scoring day D.

All dates and times are UTC (the session time zone is set by :mod:`pipelines.spark`).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Iterable, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from piarec.config import PipelineConfig, PositiveRule
from piarec.errors import ConfigError
from pipelines.event_source import (
    CANONICAL_COLUMNS,
    EventsInput,
    input_errors,
    open_events,
    read_events,
)

__all__ = [
    "CANONICAL_COLUMNS",
    "DROP_REASONS",
    "EventsInput",
    "open_events",
    "read_events",
    "input_errors",
    "drop_reason",
    "clean_events",
    "event_metrics",
    "in_window",
    "window_condition",
    "positive_condition",
    "positive_pairs",
    "seen_condition",
    "seen_pairs",
    "histories",
    "daily_histories",
    "daily_window",
    "check_event_types",
    "utc_midnight",
]

# Why an event read from an in-window partition is dropped; the first that applies wins.
DROP_REASONS = (
    "missing_user_id",  # null, empty or blank
    "missing_item_id",
    "missing_ts",
    "unknown_event_type",  # null, or not in quality.known_event_types
    "ts_before_window",
    "ts_after_window",
)



def utc_midnight(day: date) -> datetime:
    """00:00 UTC of ``day``: the edge of every window."""
    return datetime.combine(day, time.min, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- cleaning
def _ts_literal(value: datetime | date) -> Column:
    """A timestamp literal independent of the driver's local zone (naive = UTC)."""
    if not isinstance(value, datetime):
        value = utc_midnight(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    micros = (value - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    return F.timestamp_micros(F.lit(micros))


def _blank(col: str) -> Column:
    """Null, empty or spaces only. ``trim`` copies the string, so it only runs on the rare
    ids that start with a space (AND short-circuits)."""
    c = F.col(col)
    return c.isNull() | (F.length(c) == 0) | (c.startswith(" ") & (F.length(F.trim(c)) == 0))


def drop_reason(
    start_ts: datetime | date, end_ts: datetime | date, known_types: Sequence[str] | None
) -> Column:
    """int: 1-based index into :data:`DROP_REASONS` of the first reason to drop the event,
    0 when the event is clean (kept)."""
    checks = [
        _blank("user_id"),
        _blank("item_id"),
        F.col("ts").isNull(),
        (F.col("event_type").isNull() | ~F.col("event_type").isin(list(known_types)))
        if known_types is not None
        else F.col("event_type").isNull(),
        F.col("ts") < _ts_literal(start_ts),
        F.col("ts") >= _ts_literal(end_ts),
    ]
    out = F.when(checks[0], F.lit(1))
    for code, check in enumerate(checks[1:], start=2):
        out = out.when(check, F.lit(code))
    return out.otherwise(F.lit(0))


def clean_events(
    df: DataFrame,
    start_ts: datetime | date,
    end_ts: datetime | date,
    known_types: Sequence[str] | None = None,
) -> DataFrame:
    """Events with ``start_ts <= ts < end_ts``, non-blank ids and a known event type.

    ``dt`` partitions are written by the upstream owner and may hold late or early events;
    the timestamp is the authority. Dates mean 00:00 UTC; naive datetimes are UTC.
    ``known_types=None`` accepts any non-null type.
    """
    return df.filter(drop_reason(start_ts, end_ts, known_types) == 0)


def event_metrics(reason: Column, positive: Column) -> list[Column]:
    """Aggregates for an ``observe`` over events with a :func:`drop_reason` column.

    Names: ``events_read``, one per :data:`DROP_REASONS`, ``positive_events`` (clean events
    passing the positive rule).
    """
    return [
        F.count(F.lit(1)).alias("events_read"),
        *[F.count_if(reason == code).alias(name) for code, name in enumerate(DROP_REASONS, 1)],
        F.count_if((reason == 0) & positive).alias("positive_events"),
    ]


def window_condition(start_ts: datetime | date, end_ts: datetime | date) -> Column:
    """True for events with ``start_ts <= ts < end_ts`` and non-blank ids (any type)."""
    return drop_reason(start_ts, end_ts, None) == 0


def in_window(df: DataFrame, start_ts: datetime | date, end_ts: datetime | date) -> DataFrame:
    """Events with ``start_ts <= ts < end_ts`` and non-blank ids, whatever their type."""
    return df.filter(window_condition(start_ts, end_ts))


def check_event_types(cfg: PipelineConfig) -> None:
    """The positive and seen types must be known types, or every such event would be dirt."""
    known = cfg.quality.known_event_types
    if known is None:
        return
    unknown = sorted({*cfg.positive.event_types, *cfg.scoring.seen_types} - set(known))
    if unknown:
        raise ConfigError(
            f"positive.event_types / scoring.seen_types list {unknown} which are not in "
            f"quality.known_event_types {list(known)}"
        )


# --------------------------------------------------------------------------- positives, seen
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


# --------------------------------------------------------------------------- daily mode
def daily_window(cfg: PipelineConfig, day: date) -> tuple[date, date]:
    """``[D - scoring.history_days, D + 1)``: the days whose events define day D's users."""
    return day - timedelta(days=cfg.scoring.history_days), day + timedelta(days=1)


def histories(events: DataFrame, rule: PositiveRule, seen_types: Iterable[str]) -> DataFrame:
    """One row per user of (clean) ``events``: ``user_id, history, seen``.

    ``history`` array<string>: the user's positive item_ids, sorted and distinct; ``seen``
    array<string>: item_ids with an event of a type in ``seen_types``, sorted and distinct.
    Both may be empty; every user with any event has a row. One shuffle (group by user).
    """
    # collect_set skips nulls, so a non-matching event adds nothing but still makes the
    # user active (the group exists).
    return events.groupBy("user_id").agg(
        F.sort_array(F.collect_set(F.when(positive_condition(rule), F.col("item_id"))))
        .alias("history"),
        F.sort_array(F.collect_set(F.when(seen_condition(seen_types), F.col("item_id"))))
        .alias("seen"),
    )


def daily_histories(
    spark: SparkSession, events_uri: str, cfg: PipelineConfig, date: date
) -> DataFrame:
    """Histories for scoring day ``date`` (D).

    Window: ``[D - cfg.scoring.history_days days, D + 1 day)`` in UTC. One row per active
    user (any clean event in the window, see :func:`clean_events`)::

        user_id string, history array<string>, seen array<string>

    ``history``: the user's positive item_ids (``cfg.positive``), sorted and distinct;
    ``seen``: item_ids with an event of a type in ``cfg.scoring.seen_types``, sorted and
    distinct. Both may be empty. Training filters are not applied: every active user is
    scored. ``pipelines/build_matrix.py --daily`` publishes the same rows as a dataset.
    """
    start, end = daily_window(cfg, date)
    raw = read_events(
        spark, events_uri, cfg.events, start, end,
        require_watch=cfg.positive.min_watch_seconds > 0,
    )
    events = clean_events(raw, start, end, cfg.quality.known_event_types)
    return histories(events, cfg.positive, cfg.scoring.seen_types)
