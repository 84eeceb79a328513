"""The output of a daily scoring run, either engine: the part files, the commit of the
writers a run keeps, validation, and the one commit of the day with every arm.

Output: one partition ``<out>/dt=D/`` committed with :class:`piarec.data.commit.PartitionCommit`.
A run takes the day's lease, writes ``_versions/<version>/arm=<arm>/part-*.zstd.parquet``
for every arm, validates every arm's files (:func:`piarec.daily.validate.validate_arm_files`),
then replaces ``dt=D/_SUCCESS`` -- the commit pointer naming the files and holding the day's
manifest -- in one step. A failed, refused or killed run commits nothing: the previous output
of the day stays as it was, all arms of it, and the next run removes the leftovers. A rerun
replaces the whole day: no arm of an earlier run survives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from piarec.config import PipelineConfig, StorageConfig
from piarec.daily.arms import ArmPlan
from piarec.daily.availability import Availability
from piarec.daily.validate import seen_on_sample, validate_arm_files
from piarec.data import layout
from piarec.data.commit import PartitionCommit, Pointer, fault_point
from piarec.data.storage import Location, list_dir, resolve
from piarec.scoring.arrow import MODEL, OUTPUT_SCHEMA, POPULARITY, WRITE_SCHEMA

WHAT = "recommendations day"


def open_day(storage: StorageConfig, out_root: str, day: date) -> PartitionCommit:
    """The run of ``<out_root>/dt=D`` (a context manager): write under ``run.data_uri``,
    then :func:`publish_run`."""
    return PartitionCommit.of(storage, layout.day_uri(out_root, day), WHAT)


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
    run: PartitionCommit,
    cfg: PipelineConfig,
    day: date,
    plan: ArmPlan,
    counts: dict[str, ArmCounts],
    *,
    k: int,
    window: dict[str, str],
    source: dict[str, Any],
    engine: dict[str, Any],
    seen: Callable[[list[str]], dict[str, set[str]]] | None = None,
    sample: int = 1000,
    availability: Availability | None = None,
    withheld: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Validate every arm of a finished run and commit the day; returns the manifests by arm.

    The day's manifest (the pointer's ``manifest``) holds what the arms share and, under
    ``arms``, each arm's model and counts; :func:`arm_manifests` gives the per-arm view.
    Its ``validation`` is what the checks found; ``seen(users)`` gives sampled users' seen
    titles as the scoring input had them (default: read from the event partitions). No
    timestamp enters the manifest: the commit time is the pointer's ``committed_at``.
    With an ``availability`` table the manifest records it and, per arm, the titles
    ``withheld`` from its vocabulary (count and ids), which validation checks are not served.
    """
    if seen is None:
        seen = lambda users: seen_on_sample(cfg, day, users)  # noqa: E731
    root = resolve(run.data_uri)
    arms = {
        a.name: {"model": a.model_info(), "share": a.share, "counts": counts[a.name].summary(),
                 "unknown_titles": counts[a.name].unknown_titles}
        for a in plan.arms
    }
    if availability is not None:
        for a in plan.arms:
            ids = sorted(str(a.bundle.item_ids[i]) for i in (withheld or {}).get(a.name, []))
            arms[a.name]["withheld"] = {"titles": len(ids), "item_ids": ids}
    manifest = {
        "date": day.isoformat(),
        "window": window,  # [start, end) in UTC
        "input": source,
        "k": k,
        "assignment": plan.assignment_info(),
        "availability": availability.info() if availability is not None else None,
        "arms": arms,
        "engine": engine,
        "schema": OUTPUT_SCHEMA.to_string(show_schema_metadata=False),
    }
    for a in plan.arms:  # an arm nobody fell into still gets a typed, empty table
        part = root.child(layout.arm_dir(a.name))
        if not any(i.base_name.endswith(".parquet") for i in list_dir(part)):
            write_empty_part(part)
    views = arm_manifests(manifest)

    def validate(paths: list[str]) -> dict[str, Any]:
        by_arm = _by_arm(paths)
        return {name: validate_arm_files(root.fs, by_arm.get(name, []), views[name], where=run.loc.uri, day=day,
                                         arm=name, k=k, sample=sample, seen=seen)
                for name in views}

    pointer = run.commit(manifest, validate)
    return {name: {**view, "version": pointer.version, "committed_at": pointer.committed_at}
            for name, view in views.items()}


def arm_manifests(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-arm view of a day's manifest: the shared fields (every arm's summary under
    ``arms`` among them) plus ``arm`` and that arm's ``model``, ``counts`` and ``unknown_titles``."""
    common = {k: v for k, v in manifest.items() if k != "validation"}
    return {name: {**common, "arm": name, **arm} for name, arm in manifest.get("arms", {}).items()}


def arm_files(pointer: Pointer, loc: Location) -> dict[str, list[str]]:
    """The committed files of each arm of a day (paths on ``loc``'s filesystem)."""
    return _by_arm([loc.child(f["path"]).path for f in pointer.files])


def _by_arm(paths: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted(paths):
        arm = next((p[len(layout.ARM_PREFIX):] for p in path.split("/") if p.startswith(layout.ARM_PREFIX)), None)
        if arm is not None:
            out.setdefault(arm, []).append(path)
    return out


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
        for info in list_dir(root.child(layout.arm_dir(name))):
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
            fault_point("part-written")
