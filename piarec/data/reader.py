"""The reader contract of every dataset piarec publishes, and helpers that follow it.

A partition ``P`` (``snapshots/window_end=D/``, ``histories/dt=D/``,
``recommendations/dt=D/``) is published when ``P/_SUCCESS`` exists. That file is the commit
pointer (:mod:`piarec.data.commit`): JSON whose ``files`` lists the committed data files
(``path`` relative to ``P``, ``size`` in bytes) and whose ``manifest`` describes them.
**Read exactly the files it lists.** A glob such as ``P/**/*.parquet`` is not correct:
during the retention grace it also matches the retired version's files, and while a run is
live its files. For example, the recommendations of day D in DuckDB::

    files = reader.uris("recommendations/dt=2026-03-10")        # or read _SUCCESS yourself
    duckdb.sql(f"select * from read_parquet({files}, hive_partitioning = true)")

Paths inside a version keep their Hive folders (``arm=<arm>/``), so ``hive_partitioning``
gives an ``arm`` column (and ``dt`` from the partition's own folder).

A partition written before versioned commits has an empty ``_SUCCESS``; its files are the
Parquet files under ``P`` outside ``_``/``.`` names. The helpers read both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from piarec.data.commit import read_pointer
from piarec.data.layout import ARM_PREFIX
from piarec.data.storage import Location, data_files, exists, is_s3, read_json, resolve

__all__ = ["Committed", "dataset", "open_committed", "read_arm", "read_table", "uris"]


@dataclass(frozen=True)
class Committed:
    """A published partition: where it is, its committed files and its manifest."""

    loc: Location
    version: str | None  # None: the unversioned layout
    files: list[str]  # paths on loc.fs, sorted
    manifest: dict[str, Any] | None
    committed_at: str | None

    @property
    def base(self) -> str:
        """The folder the files' Hive paths (``arm=...``) are relative to."""
        return self.loc.child("_versions", self.version).path if self.version else self.loc.path


def open_committed(uri: str, legacy_manifest: str | None = None) -> Committed | None:
    """The committed state of partition ``uri``; None when it is not published.
    ``legacy_manifest``: the manifest's file name in the unversioned layout."""
    pointer = read_pointer(uri)
    if pointer is None:
        return None
    loc = resolve(uri)
    if pointer.version is not None:
        return Committed(loc, pointer.version, sorted(loc.child(f["path"]).path for f in pointer.files),
                         pointer.manifest, pointer.committed_at)
    files = sorted(i.path for i in data_files(loc) if i.path.endswith(".parquet"))
    legacy = loc.child(legacy_manifest) if legacy_manifest else None
    manifest = read_json(legacy) if legacy is not None and exists(legacy) else None
    return Committed(loc, None, files, manifest, None)


def _require(uri: str) -> Committed:
    got = open_committed(uri)
    if got is None:
        raise FileNotFoundError(f"{uri} is not published (no _SUCCESS)")
    return got


def dataset(uri: str) -> ds.Dataset:
    """A pyarrow dataset of the committed files of ``uri`` (Hive folders inside the
    version, such as ``arm=``, become columns)."""
    got = _require(uri)
    return ds.dataset(got.files, filesystem=got.loc.fs, format="parquet",
                      partitioning=ds.partitioning(flavor="hive"), partition_base_dir=got.base)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The committed rows of partition ``uri`` as one table."""
    return dataset(uri).to_table(columns=columns)


def read_arm(day_uri: str, arm: str, columns: list[str] | None = None) -> pa.Table:
    """One arm's committed rows of a recommendations day ``day_uri`` (``.../dt=D``),
    without the ``arm`` column."""
    got = _require(day_uri)
    return ds.dataset(_arm_files(got, arm), filesystem=got.loc.fs, format="parquet",
                      schema=None).to_table(columns=columns)


def _arm_files(got: Committed, arm: str) -> list[str]:
    """The committed files of one arm: those under ``arm=<arm>/`` inside the version."""
    folder = f"/{ARM_PREFIX}{arm}/"
    return [f for f in got.files if folder in f[len(got.base):] + "/"]


def uris(uri: str, arm: str | None = None) -> list[str]:
    """The committed files of ``uri`` (of one ``arm`` of a recommendations day, when given)
    as URIs other engines open (``s3://...`` or local paths): for DuckDB's
    ``read_parquet([...])`` or Spark's ``read.parquet(*files)``."""
    got = _require(uri)
    files = got.files if arm is None else _arm_files(got, arm)
    return [f"s3://{p}" if is_s3(uri) else p for p in files]
