"""The output of a daily scoring run, either engine: part files written under a private
staging folder, the commit of the writers a run keeps, and the publication of every arm.

Output: ``<out>/dt=D/arm=<arm>/part-*.parquet`` (zstd) with ``_manifest.json`` and
``_SUCCESS``. Everything is written under ``<out>/_staging/<D>-<random>/`` first (a ``_``
folder without ``=``, so Spark and pyarrow readers of ``<out>`` skip it) and each arm is
published with :func:`piarec.data.storage.publish_dir` only when every arm is complete. A
failed or killed run publishes nothing; the previous output of the day stays as it was.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from piarec.daily.arms import ArmPlan
from piarec.data import layout
from piarec.data.layout import MANIFEST, VALIDATION
from piarec.data.storage import SUCCESS, Location, exists, publish_dir, remove, resolve
from piarec.scoring.arrow import MODEL, OUTPUT_SCHEMA, POPULARITY, WRITE_SCHEMA


def write_empty_part(loc: Location) -> None:
    """A zero-row Parquet file with the output schema, so an arm nobody fell into still
    reads as a (typed, empty) table."""
    loc.fs.create_dir(loc.path, recursive=True)
    pq.write_table(OUTPUT_SCHEMA.empty_table(), f"{loc.path}/part-empty.parquet", filesystem=loc.fs,
                   compression="zstd", store_schema=False)


@dataclass
class ArmCounts:
    users: dict[str, int] = field(default_factory=lambda: {MODEL: 0, POPULARITY: 0})
    unknown_titles: int = 0

    def add(self, model: int, popularity: int, unknown: int) -> None:
        self.users[MODEL] += int(model)
        self.users[POPULARITY] += int(popularity)
        self.unknown_titles += int(unknown)

    def summary(self) -> dict[str, Any]:
        return {"users": sum(self.users.values()), "by_source": dict(self.users)}


def publish_run(
    staging: str,
    out_root: str,
    day: date,
    plan: ArmPlan,
    counts: dict[str, ArmCounts],
    *,
    k: int,
    window: dict[str, str],
    source: dict[str, Any],
    engine: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Publish every arm of a finished staging folder; returns the manifests by arm.

    The day's validation marker (``dt=D/_SUCCESS``, ``_validation.json`` of the DAG)
    describes the old contents, so it is removed first: readers waiting for it never see
    the arms half replaced. Arms of an earlier run that this run lacks are removed; then
    each arm replaces ``dt=D/arm=<name>/`` atomically.
    """
    root = resolve(staging)
    arms = {
        a.name: {"model": a.model_info(), "counts": counts[a.name].summary(),
                 "unknown_titles": counts[a.name].unknown_titles}
        for a in plan.arms
    }
    common = {
        "date": day.isoformat(),
        "window": window,  # [start, end) in UTC
        "input": source,
        "k": k,
        "assignment": plan.assignment_info(),
        "arms": arms,
        "engine": engine,
        "schema": OUTPUT_SCHEMA.to_string(show_schema_metadata=False),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifests = {name: {**common, "arm": name, **arm} for name, arm in arms.items()}
    for a in plan.arms:  # an arm nobody fell into still gets a typed, empty table
        part = root.child(layout.arm_dir(a.name))
        if not any(i.base_name.endswith(".parquet") for i in _listing(part)):
            write_empty_part(part)
    day_loc = resolve(layout.day_uri(out_root, day))
    for marker in (SUCCESS, VALIDATION):
        remove(day_loc.child(marker))
    # A rerun replaces the whole day: an arm of an earlier run that this run does not have
    # (yesterday's challenger, say) goes, so every user appears once in the day.
    ours = {layout.arm_dir(a.name) for a in plan.arms}
    for info in _listing(day_loc):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(layout.ARM_PREFIX) and info.base_name not in ours:
            remove(day_loc.child(info.base_name))
    for a in plan.arms:
        publish_dir(root.child(layout.arm_dir(a.name)).uri, layout.arm_uri(out_root, day, a.name), manifests[a.name],
                    manifest_name=MANIFEST)
    remove(root)
    return manifests


def _listing(loc: Location) -> list:
    if not exists(loc):
        return []
    return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))


@contextlib.contextmanager
def staged(out_root: str, day: date):
    """Yield a fresh staging URI; remove it if the body fails (the old output stays)."""
    uri = layout.staging_uri(out_root, day, uuid.uuid4().hex[:12])
    try:
        yield uri
    except BaseException:
        with contextlib.suppress(OSError):  # keep the original error if cleanup fails too
            remove(resolve(uri))
        raise


def part_name(tag: str, n: int) -> str:
    return f"part-{tag}-{n:05d}.zstd.parquet"


def part_tag(name: str) -> str | None:
    """The writer tag of a :func:`part_name` file name, None for any other name."""
    if not (name.startswith("part-") and name.endswith(".zstd.parquet")):
        return None
    return name[len("part-"):].rsplit("-", 1)[0]


def keep_committed_parts(staging: str, arms: list[str], committed: set[str]) -> int:
    """Delete the part files under ``<staging>/arm=<name>/`` whose writer tag is not in
    ``committed`` (failed or duplicate task attempts); returns how many were deleted."""
    root, dropped = resolve(staging), 0
    for name in arms:
        for info in _listing(root.child(layout.arm_dir(name))):
            if info.type == pafs.FileType.File and part_tag(info.base_name) not in committed:
                root.fs.delete_file(info.path)
                dropped += 1
    return dropped


class PartWriter:
    """Parquet files ``<arm dir>/part-<tag>-<n>.zstd.parquet`` of one writer (a thread of
    this engine, a task attempt of the Spark job) and arm, rolled over every
    ``rows_per_file`` rows. Item ids arrive dictionary-encoded against the model's
    vocabulary (:data:`~piarec.scoring.arrow.WRITE_SCHEMA`), so the writer stores that dictionary
    instead of hashing strings; min/max statistics are kept only where a reader can use them."""

    def __init__(self, loc: Location, tag: str, rows_per_file: int):
        self.loc, self.tag, self.rows_per_file = loc, tag, rows_per_file
        self.writer: pq.ParquetWriter | None = None
        self.files = self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            self.loc.fs.create_dir(self.loc.path, recursive=True)
            path = f"{self.loc.path}/{part_name(self.tag, self.files)}"
            self.writer = pq.ParquetWriter(
                path, WRITE_SCHEMA, filesystem=self.loc.fs, compression="zstd",
                use_dictionary=["item_ids.list.element", "model_version", "source"],
                write_statistics=["user_id", "model_version", "source"],
                store_schema=False,  # readers see list<string>, the output contract
            )
            self.files += 1
        self.writer.write_batch(batch)
        self.rows += batch.num_rows
        if self.rows >= self.rows_per_file:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.rows = None, 0
