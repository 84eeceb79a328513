"""Storage by URI: local paths and ``s3://bucket/prefix`` through one pyarrow filesystem API.

A prefix without ``_SUCCESS`` is not published; how a partition is committed, and what
``_SUCCESS`` then holds, is :mod:`piarec.data.commit`.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from piarec.errors import PathEscapeError

SUCCESS = "_SUCCESS"


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or an ``s3://`` URI (segments from code, not
    from users: those go through :func:`child_uri`)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class Location:
    """A resolved URI: the pyarrow filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def child(self, *parts: str) -> "Location":
        path = "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts)])
        uri = "/".join([self.uri.rstrip("/"), *(p.strip("/") for p in parts)])
        return Location(self.fs, path, uri)


# Transient S3 errors (5xx, throttling, timeouts) are retried with exponential back-off.
S3_MAX_ATTEMPTS = 6
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0  # a stalled request is abandoned (and retried) after this


def resolve(uri: str) -> Location:
    """Resolve a local path or ``s3://`` URI.

    S3 endpoint, region and credentials come from the standard AWS configuration chain
    (environment, profiles, instance roles), never from code or pipeline config.
    """
    if is_s3(uri):
        norm = "s3://" + uri.split("://", 1)[1].rstrip("/")
        # The AWS SDK reads region and credentials itself; the endpoint variables of the
        # AWS configuration (used for S3-compatible stores) are passed on explicitly.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint or None,
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            request_timeout=S3_REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        )
        return Location(fs, norm[len("s3://"):], norm)
    path = os.path.abspath(uri)
    return Location(pafs.LocalFileSystem(), path, path)


_SEGMENT = re.compile(r"^[A-Za-z0-9_.=-]+$")


def safe_segment(seg: str) -> str:
    """``seg`` when it is a single path component built from an identifier (a date, an arm,
    a window): never ``..``, ``.``, empty, absolute or holding a separator. Raises
    :class:`PathEscapeError` otherwise."""
    if not _SEGMENT.match(seg) or seg in (".", "..") or seg.startswith(".."):
        raise PathEscapeError(f"{seg!r} is not a safe path segment: use letters, digits, '_', '-', '.', '='")
    return seg


def child_uri(root: str, *segments: str) -> str:
    """``root/seg1/seg2...`` with every segment checked by :func:`safe_segment`, so values
    from configuration, the command line or DAG params cannot leave ``root``."""
    return "/".join([root.rstrip("/"), *map(safe_segment, segments)])


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def list_dir(loc: Location) -> list[pafs.FileInfo]:
    """The entries directly under ``loc`` (none when it does not exist)."""
    if not exists(loc):
        return []
    return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))


def data_files(loc: Location) -> list[pafs.FileInfo]:
    """The files under ``loc``, recursively, except those with a ``_`` or ``.`` name on
    their path below ``loc`` (markers, manifests, Spark's and writers' temporaries)."""
    if not exists(loc):
        return []
    base = loc.path.rstrip("/") + "/"
    return [i for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
            if i.type == pafs.FileType.File
            and not any(part.startswith(("_", ".")) for part in i.path[len(base):].split("/"))]


def is_published(uri: str) -> bool:
    """True when the prefix at ``uri`` holds a ``_SUCCESS`` marker."""
    return exists(resolve(uri).child(SUCCESS))


def write_bytes(loc: Location, data: bytes) -> None:
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as out:
        out.write(data)


def replace_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` at ``loc`` so that a reader sees the old object or the new one, never
    a torn write: a local file is written beside it and renamed over it; an S3 PUT is
    already all-or-nothing."""
    if is_s3(loc.uri):
        write_bytes(loc, data)
        return
    suffix = f".tmp-{uuid.uuid4().hex[:8]}"
    tmp = Location(loc.fs, loc.path + suffix, loc.uri + suffix)
    write_bytes(tmp, data)
    loc.fs.move(tmp.path, loc.path)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as src:
        return src.read()


def write_json(loc: Location, obj: Any) -> None:
    write_bytes(loc, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


def remove(loc: Location) -> None:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)
