"""The pieces of a daily scoring run that both engines share, so both write the same thing.

Used by the Spark job (``pipelines/score_users.py``) and the single-node engine
(:mod:`piarec.daily.local_engine`):

- the arms (:func:`plan_arms`): the control model and an optional challenger, users split
  by a salted hash of user_id; each arm's model travels as the bytes of its bundle files;
- the input: the published histories partition ``<root>/dt=D/`` and its checks;
- the output: :class:`PartWriter` files ``part-<writer tag>-<n>.zstd.parquet`` under a
  staging folder, the commit of the writers a run keeps (:func:`keep_committed_parts`),
  and the publication of every arm with its manifest (:func:`publish_run`).

Output, either engine: ``<out>/dt=D/arm=<arm>/part-*.parquet`` (zstd) with
``_manifest.json`` and ``_SUCCESS``. Everything is written under
``<out>/_staging/<D>-<random>/`` first (a ``_`` folder without ``=``, so Spark and pyarrow
readers of ``<out>`` skip it) and each arm is published with
:func:`piarec.data.storage.publish_dir` only when every arm is complete. A failed or killed run
publishes nothing; the previous output of the day stays as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from piarec.models.bundle import CONFIG_FILE, ITEMS_FILE, WEIGHTS_FILE, ModelBundle, load_bundle
from piarec.config import PipelineConfig
from piarec.errors import ConfigError, InputDataError
from piarec.registry.client import ModelRef, load_model
from piarec.scoring.arrow import HISTORY_SCHEMA, MODEL, OUTPUT_SCHEMA, POPULARITY, WRITE_SCHEMA, in_share
from piarec.data import layout
from piarec.data.layout import MANIFEST, VALIDATION
from piarec.data.storage import SUCCESS, Location, child_uri, exists, publish_dir, read_json, remove, resolve

ASSIGNMENT = 'arm = challenger when fmix64(fnv1a64(salt + "\\0" + user_id)) < share * 2^64'
_ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE)


# -- arms -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One arm of a run: its name, its model and the bytes executors load it from."""

    name: str
    bundle: ModelBundle = field(repr=False)
    ref: ModelRef
    files: dict[str, bytes] = field(repr=False)  # the bundle's files; weights load weights-only
    digest: str  # sha256 over the files

    @property
    def version(self) -> str:
        """What the rows' ``model_version`` says: the registry version, else a digest."""
        return self.ref.version or f"local-{self.digest[:12]}"

    def model_info(self) -> dict[str, Any]:
        return {**self.ref.info(), "version": self.version, "digest": self.digest, "n_items": self.bundle.n_items}


@dataclass(frozen=True)
class ArmPlan:
    """The arms of a run (``arms[0]`` is the control) and how users are split."""

    arms: list[Arm]
    salt: str
    challenger_share: float  # share of users in arms[1]; 0 with a single arm

    def assign(self, user_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int8 [B]: the index in :attr:`arms` of each user's arm."""
        if len(self.arms) == 1:
            return np.zeros(len(user_ids), np.int8)
        return in_share(user_ids, self.salt, self.challenger_share).astype(np.int8)

    def shares(self) -> dict[str, float]:
        if len(self.arms) == 1:
            return {self.arms[0].name: 1.0}
        return {self.arms[0].name: 1.0 - self.challenger_share, self.arms[1].name: self.challenger_share}

    def assignment_info(self) -> dict[str, Any]:
        return {"method": ASSIGNMENT, "salt": self.salt, "shares": self.shares()}


def bundle_files(ref: ModelRef) -> tuple[dict[str, bytes], str]:
    """The bytes of a resolved model's bundle files and their sha256 digest."""
    files = {name: Path(ref.local_dir, name).read_bytes() for name in BUNDLE_FILES}
    h = hashlib.sha256()
    for name in BUNDLE_FILES:
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return files, h.hexdigest()


def bundle_from_files(files: dict[str, bytes], info: dict[str, Any] | None = None) -> ModelBundle:
    """Load a bundle from its files' bytes through :func:`piarec.models.bundle.load_bundle` (the one
    loader: validation and a weights-only load), via a private temporary folder."""
    with tempfile.TemporaryDirectory(prefix="piarec-bundle-") as tmp:
        for name in BUNDLE_FILES:
            Path(tmp, name).write_bytes(files[name])
        return load_bundle(tmp, info)


def plan_arms(
    cfg: PipelineConfig,
    model_uri: str,
    arm: str,
    challenger_uri: str | None = None,
    challenger_share: float | None = None,
) -> ArmPlan:
    """Resolve and load the control model (and the challenger, when given)."""
    share = cfg.scoring.challenger_share if challenger_share is None else challenger_share
    names = [arm] + ([cfg.scoring.challenger_arm] if challenger_uri else [])
    for name in names:
        if not _ARM_NAME.match(name):
            raise ConfigError(f"arm {name!r} must be letters, digits, '_' or '-' (it names a folder)")
    if len(set(names)) != len(names):
        raise ConfigError(f"the control arm and scoring.challenger_arm are both {arm!r}; name them apart")
    if challenger_uri and not 0.0 < share <= 1.0:
        raise ConfigError(f"the challenger share must be in (0, 1], got {share}")
    arms = []
    for name, uri in zip(names, [model_uri, challenger_uri]):
        bundle, ref = load_model(cfg, uri)
        files, digest = bundle_files(ref)
        arms.append(Arm(name, bundle, ref, files, digest))
    return ArmPlan(arms, cfg.scoring.ab_salt, share if challenger_uri else 0.0)


# -- input ------------------------------------------------------------------------------------
def histories_partition(root: str, day: date) -> tuple[str, dict[str, Any] | None]:
    """``<root>/dt=D`` and its manifest; the partition must be published (``_SUCCESS``)."""
    uri = layout.histories_uri(root, day)
    loc = resolve(uri)
    if not exists(loc.child(SUCCESS)):
        raise InputDataError(
            f"histories {uri!r} are not published (no {SUCCESS}); build them first "
            f"(piarec build-matrix --daily --date {day.isoformat()})"
        )
    return uri, (read_json(loc.child(MANIFEST)) if exists(loc.child(MANIFEST)) else None)


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


def histories_files(loc: Location) -> list[str]:
    """The Parquet files of a histories partition (names starting with ``_`` or ``.``,
    such as ``_SUCCESS`` or ``_temporary/``, are not data)."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    hidden = lambda path: any(p.startswith(("_", ".")) for p in path[len(loc.path):].split("/") if p)  # noqa: E731
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and not hidden(i.path))


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


def window(cfg: PipelineConfig, day: date) -> dict[str, str]:
    """The scoring window ``[D - history_days, D + 1)`` (UTC days)."""
    return {"start": (day - timedelta(days=cfg.scoring.history_days)).isoformat(),
            "end": (day + timedelta(days=1)).isoformat()}


# -- staging and publishing ---------------------------------------------------------------------
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
    the arms half replaced. Then each arm replaces ``dt=D/arm=<name>/`` atomically.
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
        part = root.child(f"arm={a.name}")
        if not any(i.base_name.endswith(".parquet") for i in _listing(part)):
            write_empty_part(part)
    day_loc = resolve(layout.day_uri(out_root, day))
    for marker in (SUCCESS, VALIDATION):
        remove(day_loc.child(marker))
    for a in plan.arms:
        publish_dir(root.child(f"arm={a.name}").uri, layout.arm_uri(out_root, day, a.name), manifests[a.name],
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
        for info in _listing(root.child(f"arm={name}")):
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
