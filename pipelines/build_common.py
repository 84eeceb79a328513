"""What the weekly snapshot job and the daily histories job (:mod:`pipelines.build_matrix`)
share: the window, the events read with every dirty event classified and counted on the
way, the manifest, and the temporary prefix a partition is written under before it is
published."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Mapping

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from piarec.config import PipelineConfig, QualityConfig
from piarec.errors import InputDataError
from piarec.data.snapshot import code_version
from pipelines.events import (
    DROP_REASONS,
    EventsInput,
    check_event_types,
    daily_window,
    drop_reason,
    event_metrics,
    open_events,
    positive_condition,
)

log = logging.getLogger("piarec.build_matrix")


@dataclass(frozen=True)
class Window:
    """The days a job reads, ``[start, end)``; ``days`` is the configured length the manifest
    reports (``window_days`` weekly, ``scoring.history_days`` daily). Prints as in messages."""

    start: date
    end: date
    days: int

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


class Clock:
    """Logs how long each step took (INFO on the ``piarec.build_matrix`` logger)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        log.info("build_matrix: %s took %.2f s", step, now - self.t)
        self.t = now


def open_window(spark: SparkSession, cfg: PipelineConfig, uri: str, start: date, end: date) -> EventsInput:
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


def observed_events(
    spark: SparkSession, src: EventsInput, cfg: PipelineConfig, start: date, end: date
) -> tuple[DataFrame, Observation, list[Column]]:
    """Events with a ``_drop`` reason code, counted (by reason) as they flow through."""
    metrics = event_metrics(F.col("_drop"), positive_condition(cfg.positive))
    observed = Observation()
    events = src.df.withColumn("_drop", drop_reason(start, end, cfg.quality.known_event_types))
    return events.observe(observed, *metrics), observed, metrics


def observed_metrics(observed: Observation, events: DataFrame, exprs: list[Column]) -> dict[str, Any]:
    """The observed event counts. Spark loses observed metrics when adaptive execution finds
    everything after them empty (all events dropped); only then, count again."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    try:
        return dict(observed.get)
    except (Py4JJavaError, PySparkException):
        return events.agg(*exprs).first().asDict()


def dirt_counts(metrics: Mapping[str, int], what: str, max_fraction: float) -> tuple[dict[str, int], float]:
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


def counted_events(
    metrics: Mapping[str, int], quality: QualityConfig, window: Window
) -> dict[str, Any]:
    """The counts both manifests start with, from the observed event ``metrics``:
    ``events_read``, ``dropped_events`` ({reason: n}), ``dirty_fraction``,
    ``events_in_window`` (read and not dropped) and ``positive_events``.

    Raises :class:`InputDataError` when more than ``quality.max_dirty_fraction`` is dirt.
    """
    n_read = int(metrics["events_read"])
    dropped, dirty = dirt_counts(metrics, f"the window {window}", quality.max_dirty_fraction)
    return {
        "events_read": n_read,
        "dropped_events": dropped,
        "dirty_fraction": dirty,
        "events_in_window": n_read - sum(dropped.values()),
        "positive_events": int(metrics["positive_events"]),
    }


def all_dropped_error(
    window: Window, uri: str, src: EventsInput, counts: Mapping[str, Any]
) -> InputDataError:
    """The error (returned, for the caller to raise) for a window whose partitions hold
    events but every one of them was dirt; ``counts`` as from :func:`counted_events`."""
    return InputDataError(
        f"no events in the window {window} under {uri!r} ({counts['events_read']} events read "
        f"from its {len(src.partitions)} dt partition(s), all dropped: {counts['dropped_events']})"
    )


def input_summary(uri: str, src: EventsInput, start: date, end: date) -> dict[str, Any]:
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


def build_manifest(
    schema_version: int, cfg: PipelineConfig, window: Window, uri: str, src: EventsInput,
    config: Mapping[str, Any], counts: Mapping[str, Any], **head: Any,
) -> dict[str, Any]:
    """The manifest either job publishes, as a new dict.

    Keys: ``schema_version``, then the job's own ``head`` keys (the daily job's ``date``),
    ``window`` ({start, end, days}), ``events_uri``, ``input`` (:func:`input_summary`), ``config``
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
        "input": input_summary(uri, src, window.start, window.end),
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


@dataclass
class DailyEvents:
    """Day D's events for both daily paths (``build_matrix --daily`` and scoring from raw
    events): the window ``[D - scoring.history_days, D + 1)``, its partitions, and the
    events with their ``_drop`` reason, counted as they flow through the first action."""

    window: Window
    uri: str
    src: EventsInput
    events: DataFrame
    observed: Observation
    exprs: list[Column]

    def clean(self) -> DataFrame:
        """The events that are not dirt (canonical columns plus ``_drop``)."""
        return self.events.filter(F.col("_drop") == 0)

    def metrics(self) -> dict[str, Any]:
        """The observed event counts; call after an action has consumed the events."""
        return observed_metrics(self.observed, self.events, self.exprs)

    def counts(self, metrics: Mapping[str, int], quality: QualityConfig, users: int) -> dict[str, Any]:
        """:func:`counted_events` of ``metrics`` (raises when too dirty); raises
        :func:`all_dropped_error` when no user is left."""
        counts = counted_events(metrics, quality, self.window)
        if not users:
            raise all_dropped_error(self.window, self.uri, self.src, counts)
        return counts


def open_daily(spark: SparkSession, cfg: PipelineConfig, uri: str, day: date) -> DailyEvents:
    """Day ``day``'s events under the checks of :func:`open_window` (no partition in the
    window, missing or mistyped columns fail here)."""
    window = Window(*daily_window(cfg, day), cfg.scoring.history_days)
    src = open_window(spark, cfg, uri, window.start, window.end)
    return DailyEvents(window, uri, src, *observed_events(spark, src, cfg, window.start, window.end))
