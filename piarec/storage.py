"""Storage by URI: local paths and ``s3://bucket/prefix`` through one pyarrow filesystem API.

Publishing is atomic for readers: a job writes into a temporary sibling prefix, and
:func:`publish_dir` replaces the final prefix and writes ``_SUCCESS`` last. Readers
treat a prefix without ``_SUCCESS`` as absent.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"


def _is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


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


def resolve(uri: str) -> Location:
    """Resolve a local path or ``s3://`` URI; S3 settings come from the AWS config chain."""
    if _is_s3(uri):
        norm = "s3://" + uri.split("://", 1)[1]
        fs, path = pafs.FileSystem.from_uri(norm)
        return Location(fs, path.rstrip("/"), norm.rstrip("/"))
    path = os.path.abspath(uri)
    return Location(pafs.LocalFileSystem(), path, path)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def is_published(uri: str) -> bool:
    """True when the prefix at ``uri`` holds a ``_SUCCESS`` marker."""
    return exists(resolve(uri).child(SUCCESS))


def write_bytes(loc: Location, data: bytes) -> None:
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as out:
        out.write(data)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as src:
        return src.read()


def write_json(loc: Location, obj: Any) -> None:
    write_bytes(loc, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


def temp_sibling(final_uri: str) -> str:
    """A fresh temporary prefix next to ``final_uri``, for write-then-publish."""
    base = final_uri.rstrip("/")
    parent, name = base.rsplit("/", 1)
    return f"{parent}/_tmp-{name}-{uuid.uuid4().hex[:12]}"


def remove(loc: Location) -> None:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def publish_dir(
    tmp_uri: str, final_uri: str, manifest: dict[str, Any] | None = None, manifest_name: str = "manifest.json"
) -> None:
    """Replace ``final_uri`` with the finished contents of ``tmp_uri``.

    The manifest (when given, as ``manifest_name``) and then ``_SUCCESS`` are written into the temporary
    prefix before it moves, so the published prefix is never visible without them.
    The old contents are first marked unpublished (their ``_SUCCESS`` removed), so a
    reader never mistakes a half-replaced prefix for a complete one.
    """
    tmp, final = resolve(tmp_uri), resolve(final_uri)
    if manifest is not None:
        write_json(tmp.child(manifest_name), manifest)
    write_bytes(tmp.child(SUCCESS), b"")
    if exists(final):
        remove(final.child(SUCCESS))
        old = resolve(temp_sibling(final_uri).replace("/_tmp-", "/_old-"))
        final.fs.move(final.path, old.path)
        final.fs.move(tmp.path, final.path)
        remove(old)
    else:
        final.fs.create_dir(final.path.rsplit("/", 1)[0], recursive=True)
        final.fs.move(tmp.path, final.path)
