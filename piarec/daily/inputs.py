"""The input of a daily scoring run: the committed histories partition ``<root>/dt=D/``
(``user_id, history, seen``), its checks, and a streaming reader of its files."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from piarec.config import ScoringConfig
from piarec.data import layout
from piarec.data.layout import MANIFEST
from piarec.data.reader import open_committed
from piarec.data.storage import SUCCESS
from piarec.errors import InputDataError
from piarec.scoring.arrow import HISTORY_SCHEMA


def histories_partition(root: str, day: date) -> tuple[str, dict[str, Any] | None, list[str]]:
    """``<root>/dt=D``, its manifest and its committed files (paths on its filesystem);
    the partition must be published (``_SUCCESS``)."""
    uri = layout.histories_uri(root, day)
    got = open_committed(uri, legacy_manifest=MANIFEST)
    if got is None:
        raise InputDataError(
            f"histories {uri!r} are not published (no {SUCCESS}); build them first "
            f"(piarec build-matrix --daily --date {day.isoformat()})"
        )
    return uri, got.manifest, got.files


def check_history_columns(schema: pa.Schema, uri: str) -> None:
    """Raise :class:`InputDataError` unless ``schema`` has the histories' columns."""
    problems = []
    for want in HISTORY_SCHEMA:
        got = schema.field(want.name).type if want.name in schema.names else None
        ok = got is not None and (
            pa.types.is_string(got) or pa.types.is_large_string(got)
            if want.name == "user_id"
            else (pa.types.is_list(got) or pa.types.is_large_list(got))
        )
        if not ok:
            problems.append(f"{want.name} ({want.type}; found {got or 'nothing'})")
    if problems:
        raise InputDataError(f"histories at {uri!r} need columns {', '.join(problems)}")


def read_histories(fs: pafs.FileSystem, files: list[str], batch_size: int, uri: str) -> Iterator[pa.RecordBatch]:
    """``user_id, history, seen`` batches of at most ``batch_size`` rows, file by file and
    row group by row group.

    Read with the Parquet file reader, not a dataset scan: it decodes a row group page by
    page as batches are taken (no pre-buffering), so memory does not grow with the
    row-group size of the input. A batch never spans row groups: lists of dictionary-typed
    titles (files written from Arrow dictionaries) cannot be read across them.
    """
    for path in files:
        with fs.open_input_file(path) as handle:
            reader = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
            check_history_columns(reader.schema_arrow, uri)
            for group in range(reader.num_row_groups):
                yield from reader.iter_batches(batch_size, row_groups=[group], columns=list(HISTORY_SCHEMA.names),
                                               use_threads=False)


def window(scoring: ScoringConfig, day: date) -> dict[str, str]:
    """The scoring window ``[D - history_days, D + 1)`` (UTC days)."""
    return {"start": (day - timedelta(days=scoring.history_days)).isoformat(),
            "end": (day + timedelta(days=1)).isoformat()}
