"""Reading the events dataset: only the ``dt=YYYY-MM-DD`` partitions of a window, with the
configured columns renamed to the canonical ``user_id, item_id, event_type, ts,
watch_seconds`` and checked (every missing or mistyped column named), and read failures
(a corrupt or vanished file) turned into one clear :class:`~piarec.errors.InputDataError`.

The rules applied to the events once read live in :mod:`pipelines.events`, which also
re-exports :func:`open_events`, :func:`read_events` and :func:`input_errors`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any, Iterator

from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from piarec.config import EventsSchema
from piarec.errors import InputDataError
from pipelines.spark import spark_path

CANONICAL_COLUMNS = ("user_id", "item_id", "event_type", "ts", "watch_seconds")
# Where a recommendation was shown or acted on (docs/ab-logging.md): read only when asked
# (A/B analysis), null when the source has no such column; the weekly and daily builds never need them.
EXPOSURE_COLUMNS = ("surface", "slot")
PARTITION_COL = "dt"

_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_NUMERIC = (*_INTEGRAL, T.FloatType, T.DoubleType, T.DecimalType)
_TIMESTAMP = (T.TimestampType, T.TimestampNTZType)


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class EventsInput:
    """The events of a window as read: the frame and what was opened to get it."""

    df: DataFrame  # canonical columns (see read_events)
    partitions: list[str]  # ISO dates of the dt= folders opened, sorted
    files: int  # data files in them
    available: tuple[str, str] | None  # first and last dt of the whole dataset


def _hadoop_fs(spark: SparkSession, path: str) -> tuple[Any, Any]:
    """The Hadoop FileSystem and Path Spark itself uses for ``path`` (local, s3a, ...)."""
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def _list_partitions(spark: SparkSession, uri: str) -> dict[date, str]:
    """``{day: folder}`` for every ``dt=YYYY-MM-DD`` folder directly under ``uri``.

    One listing of the dataset root (a single LIST on object stores), so a run touches only
    the folders of its window instead of discovering every partition the dataset ever had.
    """
    fs, root = _hadoop_fs(spark, spark_path(uri))
    if not fs.exists(root):
        raise InputDataError(f"events path {uri!r} does not exist")
    found: dict[date, str] = {}
    other = 0
    for status in fs.listStatus(root):
        name = status.getPath().getName()
        if not status.isDirectory() or name.startswith(("_", ".")):
            continue
        if name.startswith(f"{PARTITION_COL}="):
            try:
                found[date.fromisoformat(name[len(PARTITION_COL) + 1:])] = status.getPath().toString()
                continue
            except ValueError:
                pass
        other += 1
    if not found:
        raise InputDataError(
            f"events at {uri!r} are not partitioned by {PARTITION_COL}=YYYY-MM-DD folders "
            f"({other} other folder(s) found)"
        )
    return found


def _check_columns(raw: DataFrame, uri: str, wanted: dict[str, str]) -> None:
    """Every configured column present with a usable type; all problems in one message."""
    found = [c for c in raw.columns if c != PARTITION_COL] + [PARTITION_COL]
    missing = [f"{src!r} (for {canon})" for canon, src in wanted.items() if src not in raw.columns]
    if missing:
        raise InputDataError(
            f"events at {uri!r} lack configured column(s) {', '.join(missing)}; "
            f"columns found: {', '.join(found)} (fix the `events` section of the config)"
        )
    expect = {
        "user_id": ((T.StringType, *_INTEGRAL), "a string or an integer"),
        "item_id": ((T.StringType, *_INTEGRAL), "a string or an integer"),
        "event_type": ((T.StringType,), "a string"),
        "ts": (_TIMESTAMP, "a timestamp"),
        "watch_seconds": (_NUMERIC, "a number"),
        "surface": ((T.StringType,), "a string"),
        "slot": (_INTEGRAL, "an integer"),
    }
    wrong = []
    for canon, src in wanted.items():
        dtype = raw.schema[src].dataType
        types, what = expect[canon]
        if not isinstance(dtype, types):
            wrong.append(f"{src!r} (for {canon}) must be {what}, found {dtype.simpleString()}")
    if wrong:
        raise InputDataError(f"events at {uri!r} have mistyped column(s): {'; '.join(wrong)}")


def open_events(
    spark: SparkSession,
    uri: str,
    schema: EventsSchema,
    start: date,
    end: date,
    *,
    require_watch: bool = True,
    exposure: bool = False,
) -> EventsInput:
    """Events of the partitions ``dt`` in ``[start, end)``, with canonical column names.

    Output frame: ``user_id`` string, ``item_id`` string, ``event_type`` string, ``ts``
    timestamp (UTC), ``watch_seconds`` int. Only the window's folders are listed and scanned,
    and the filter on ``dt`` stays in the plan as a partition filter.

    ``require_watch=False`` lets a source without a watch-time column through (its
    ``watch_seconds`` is null); callers pass it when the positive rule ignores watch time.
    ``exposure=True`` adds :data:`EXPOSURE_COLUMNS` (``surface`` string, ``slot`` int; from
    ``events.surface_col`` / ``events.slot_col``, null when the source lacks them).

    Raises :class:`InputDataError` when the path does not exist, is not partitioned by
    ``dt``, or when configured columns are missing or mistyped (all are named). Corrupt files
    surface when the frame is computed: run actions under :func:`input_errors`.
    """
    parts = _list_partitions(spark, uri)
    chosen = sorted(d for d in parts if start <= d < end)
    reader = spark.read.option("ignoreCorruptFiles", "false")  # never skip data silently
    if exposure:  # partitions written before the exposure columns existed lack them
        reader = reader.option("mergeSchema", "true")
    with input_errors(uri):
        if chosen:
            raw = reader.option("basePath", spark_path(uri)).parquet(*[parts[d] for d in chosen])
        else:
            # Nothing to open in the window: read the root for its schema; the frame is empty.
            raw = reader.parquet(spark_path(uri))

    wanted = {
        "user_id": schema.user_col,
        "item_id": schema.item_col,
        "event_type": schema.type_col,
        "ts": schema.ts_col,
    }
    if require_watch:
        wanted["watch_seconds"] = schema.watch_col
    optional = {"surface": schema.surface_col, "slot": schema.slot_col} if exposure else {}
    _check_columns(raw, uri, {**wanted, **{c: src for c, src in optional.items() if src in raw.columns}})
    extra = [(F.col(src) if src in raw.columns else F.lit(None)).cast("string" if c == "surface" else "int").alias(c)
             for c, src in optional.items()]

    watch = (
        F.col(schema.watch_col).try_cast("int")  # an absurd value becomes null, not an error
        if schema.watch_col in raw.columns
        else F.lit(None).cast("int")
    )
    df = raw.filter(_partition_range(raw, start, end)).select(
        F.col(schema.user_col).cast("string").alias("user_id"),
        F.col(schema.item_col).cast("string").alias("item_id"),
        F.col(schema.type_col).alias("event_type"),
        # A timestamp without zone is read as UTC wall-clock time (session zone is UTC).
        F.col(schema.ts_col).cast("timestamp").alias("ts"),
        watch.alias("watch_seconds"),
        *extra,
    )
    days = sorted(parts)
    return EventsInput(
        df=df,
        partitions=[d.isoformat() for d in chosen],
        files=len(raw.inputFiles()) if chosen else 0,
        available=(days[0].isoformat(), days[-1].isoformat()),
    )


def read_events(spark: SparkSession, uri: str, schema: EventsSchema, start: date, end: date, **options) -> DataFrame:
    """The frame of :func:`open_events` (same arguments; canonical columns, window partitions only)."""
    return open_events(spark, uri, schema, start, end, **options).df


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


_READ_FAILURE = re.compile(r"\[(FAILED_READ_FILE|CANNOT_READ_FILE_FOOTER)[A-Z_.]*\]")
_FILE_IN_MESSAGE = re.compile(r"(?:reading file|footer for file|file) (\S+?)\.?(?:\s|$)")


def _root_cause(exc: BaseException) -> str:
    """The innermost Java cause's message of a Py4J / captured Spark error, when there is one."""
    java = getattr(exc, "java_exception", None) or getattr(exc, "_origin", None)
    cause, message = java, None
    try:
        while cause is not None:
            text = cause.getMessage()
            message = text or message
            nxt = cause.getCause()
            cause = None if nxt is None or nxt.equals(cause) else nxt
    except Exception:  # noqa: BLE001 - best effort: the first line of the error is enough
        message = None
    if message:
        return " ".join(str(message).split())[:300]
    return str(exc).strip().splitlines()[0][:300]


@contextmanager
def input_errors(uri: str) -> Iterator[None]:
    """Turn Spark's "cannot read this file" failures into one-line :class:`InputDataError`.

    A corrupt or truncated Parquet file (or one whose column types contradict the others)
    fails the Spark action that reads it with a long JVM stack trace; the operator needs the
    file and the reason.
    """
    from py4j.protocol import Py4JJavaError

    try:
        yield
    except (Py4JJavaError, PySparkException) as exc:
        text = str(exc)
        match = _READ_FAILURE.search(text)
        if not match:
            raise
        where = _FILE_IN_MESSAGE.search(text[match.end():])
        name = where.group(1) if where else "a file"
        raise InputDataError(
            f"cannot read events under {uri!r}: {name}: {_root_cause(exc)}"
        ) from None
