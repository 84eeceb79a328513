"""The catalogue availability table: which titles may be served on a day, in every arm.

``scoring.availability`` names a Parquet file or folder (or a partition published with
``_SUCCESS``, read by the reader contract) with one row per availability window:

- ``item_id`` string, required;
- ``available_from``, ``available_to``: date (its 00:00 UTC) or timestamp (UTC when it
  has no time zone), null = open; the title is available in ``[available_from,
  available_to)``;
- ``region`` string, optional: with ``scoring.region`` set, rows of that region and rows
  with a null region apply; without it, only rows with a null region (or a table without
  the column).

The recommendations of day D hold a title only when one applicable row makes it available
throughout ``[D, D + scoring.availability_days)`` UTC: by default the scored day and the
day after it, when the lists are served. A title with no
applicable row is not served (the table is the catalogue of record). A withdrawn or
unreleased title is removed like a seen one (:class:`piarec.scoring.scorer.TopKScorer`'s
``exclude``), so a user still gets k titles. The day's manifest records the table and, per
arm, the titles removed from its vocabulary; validation checks none is served.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from piarec.config import ScoringConfig
from piarec.data import reader
from piarec.data.storage import is_published, resolve
from piarec.errors import InputDataError

COLUMNS = ("item_id", "available_from", "available_to")


@dataclass(frozen=True)
class Availability:
    """The titles available on one day, by the table at ``uri``."""

    uri: str
    day: dt.date
    region: str | None
    window: tuple[str, str]  # [start, end) UTC a title must be available throughout
    available: frozenset[str]
    listed: int  # distinct titles with an applicable row

    def withheld(self, item_ids: np.ndarray) -> np.ndarray:
        """int64: the indices of ``item_ids`` (a model's vocabulary) not available."""
        return np.flatnonzero([str(i) not in self.available for i in item_ids]).astype(np.int64)

    def info(self) -> dict[str, Any]:
        return {"uri": self.uri, "region": self.region, "window": list(self.window), "titles_listed": self.listed,
                "titles_available": len(self.available)}


def load_availability(scoring: ScoringConfig, day: dt.date) -> Availability | None:
    """The availability of day ``day`` by ``scoring.availability``; None when it is not set."""
    uri = scoring.availability
    if uri is None:
        return None
    table = _read(uri)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise InputDataError(f"availability table {uri} lacks column(s) {', '.join(missing)}; "
                             f"it needs {', '.join(COLUMNS)} (and optionally region)")
    if table.num_rows and table.column("item_id").null_count:
        raise InputDataError(f"availability table {uri} has rows without an item_id")
    if scoring.region is not None and "region" not in table.column_names:
        raise InputDataError(f"scoring.region is {scoring.region!r} but availability table {uri} has no region column")
    applies = pa.array(np.ones(table.num_rows, bool))
    if "region" in table.column_names:
        region = table.column("region")
        applies = pc.is_null(region)
        if scoring.region is not None:
            applies = pc.or_(applies, pc.fill_null(pc.equal(region, scoring.region), False))
    table = table.filter(applies)
    lo = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    hi = lo + dt.timedelta(days=scoring.availability_days)
    start, end = _as_utc(table, "available_from", uri), _as_utc(table, "available_to", uri)
    ts = pa.timestamp("us", tz="UTC")
    whole = pc.and_(pc.fill_null(pc.less_equal(start, pa.scalar(lo, ts)), True),
                    pc.fill_null(pc.greater_equal(end, pa.scalar(hi, ts)), True))
    ids = table.column("item_id").cast(pa.string())
    return Availability(uri, day, scoring.region, (lo.isoformat(), hi.isoformat()),
                        frozenset(pc.unique(ids.filter(whole)).to_pylist()), len(pc.unique(ids)))


def _read(uri: str) -> pa.Table:
    if is_published(uri):
        return reader.read_table(uri)
    loc = resolve(uri)
    try:
        return ds.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table()
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise InputDataError(f"availability table {uri} cannot be read: {exc}") from None


def _as_utc(table: pa.Table, column: str, uri: str) -> pa.ChunkedArray:
    """A date or timestamp column as UTC timestamps (a date at its 00:00 UTC; a timestamp
    without a time zone read as UTC)."""
    col = table.column(column)
    if pa.types.is_null(col.type) or pa.types.is_date(col.type):
        col = col.cast(pa.date32()).cast(pa.timestamp("us"))
    elif not pa.types.is_timestamp(col.type):
        raise InputDataError(f"availability table {uri}: {column} is {col.type}, not a date or timestamp")
    if col.type.tz is None:
        col = pc.assume_timezone(col, "UTC")
    return col.cast(pa.timestamp("us", tz="UTC"))


def withheld_by_arm(scoring: ScoringConfig, day: dt.date, vocabularies: dict[str, np.ndarray]
                    ) -> tuple[Availability | None, dict[str, np.ndarray]]:
    """Day ``day``'s availability and, per arm (its model's vocabulary in
    ``vocabularies``), the indices of the titles it must not serve (empty without a table)."""
    avail = load_availability(scoring, day)
    return avail, {name: avail.withheld(ids) if avail is not None else np.zeros(0, np.int64)
                   for name, ids in vocabularies.items()}
