"""One atomic commit per partition: immutable versions, a pointer, and a lease.

A partition ``P`` -- a snapshot window, a histories day, a recommendations day with all
its arms -- is laid out the way table formats commit::

    P/_SUCCESS                  the commit pointer: JSON naming the committed version and
                                its files; a partition without it is not published
    P/_versions/<version>/...   the immutable data of one run (only the one named counts)
    P/_LEASE                    present while a run of P is live

A run of ``P`` (:class:`PartitionCommit`, a context manager):

1. takes the lease, or stops with :class:`PartitionBusy` when another run of ``P`` is
   live (local: an ``flock`` the kernel drops when the holder dies; S3: an object created
   with ``If-None-Match: *`` and renewed with ``If-Match`` by a heartbeat thread, taken
   over once it expires or its holder's process is gone);
2. removes the leftovers of dead runs (every version neither committed nor retained);
3. writes its files under ``P/_versions/<version>/`` (the caller does this);
4. commits: lists and validates the files, then replaces ``P/_SUCCESS`` in one step --
   one ``rename`` on a local filesystem, one conditional PUT on S3 (``If-Match`` the
   pointer it found, so a run that lost its lease cannot overwrite a newer commit);
5. deletes the versions retired more than ``grace_s`` ago, then releases the lease.

Before step 4 readers see the previous version complete; after it, the new one; never
neither, never a mix. A failure or kill at any point leaves the previous commit in force.

The reader rule (:mod:`piarec.data.reader`, with helpers for pyarrow, DuckDB and Spark):
read ``P/_SUCCESS`` and exactly the files it names. A glob of ``P/**/*.parquet`` is not
correct: it also matches retired versions and a live run's files.

Tests stop a run at each step with :func:`fault_point` (``PIAREC_FAULT_AT=<step>`` makes
the process SIGKILL itself there).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from piarec.config import StorageConfig
from piarec.data import storage
from piarec.data.storage import SUCCESS, Location, data_files, exists, is_s3, list_dir, read_bytes, remove, resolve
from piarec.errors import PiarecError

__all__ = ["FAULT_ENV", "FORMAT", "LEASE", "STEPS", "VERSIONS", "CommitConflict", "PartitionBusy",
           "PartitionCommit", "Pointer", "fault_point", "read_pointer"]

FORMAT = "piarec-commit/1"
VERSIONS = "_versions"
LEASE = "_LEASE"
FAULT_ENV = "PIAREC_FAULT_AT"
# The named steps of a run, in order, where a fault test can stop it.
STEPS = ("leased", "swept", "part-written", "written", "validated", "committed", "collected")


class PartitionBusy(PiarecError):
    """Another run of the partition is live; this one stopped before writing anything."""


class CommitConflict(PiarecError):
    """The partition changed under this run (its lease was lost); nothing of it is published."""


def fault_point(step: str) -> None:
    """SIGKILL this process when ``PIAREC_FAULT_AT`` names ``step`` (fault tests only)."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the pointer
@dataclass(frozen=True)
class Pointer:
    """The content of ``P/_SUCCESS``. ``files`` are paths relative to ``P``. A legacy
    pointer (an empty ``_SUCCESS`` of the earlier layout) has ``version`` None: its data
    are the files directly under ``P``."""

    version: str | None
    files: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    committed_at: str | None = None
    run: dict[str, Any] = field(default_factory=dict)
    retired: list[dict[str, str]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        body = {"format": FORMAT, "version": self.version, "committed_at": self.committed_at, "run": self.run,
                "files": self.files, "manifest": self.manifest, "retired": self.retired}
        # Keys in insertion order: the manifest's arms stay in plan order (the control first).
        return json.dumps(body, indent=1, default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes, uri: str) -> "Pointer":
        if not data.strip():
            return cls(version=None)
        try:
            body = json.loads(data)
        except ValueError:
            raise PiarecError(f"{uri}/{SUCCESS} is not a commit pointer (not JSON)") from None
        if body.get("format") != FORMAT:
            raise PiarecError(f"{uri}/{SUCCESS} has format {body.get('format')!r}; this piarec reads {FORMAT!r}")
        return cls(body["version"], body["files"], body.get("manifest") or {}, body.get("committed_at"),
                   body.get("run") or {}, body.get("retired") or [])

    def kept_versions(self, now: dt.datetime, grace_s: float) -> set[str]:
        """The committed version and those retired less than ``grace_s`` ago."""
        keep = {r["version"] for r in self.retired
                if (now - dt.datetime.fromisoformat(r["retired_at"])).total_seconds() < grace_s}
        return keep | ({self.version} if self.version else set())


def read_pointer(uri: str) -> Pointer | None:
    """The commit pointer of partition ``uri``; None when it is not published."""
    loc = resolve(uri)
    try:
        data = read_bytes(loc.child(SUCCESS))
    except FileNotFoundError:
        return None
    return Pointer.from_bytes(data, loc.uri)


# --------------------------------------------------------------------------- leases and CAS
def _holder(run: dict[str, Any]) -> str:
    return f"run {run.get('id')} (host {run.get('host')}, pid {run.get('pid')}, since {run.get('started_at')})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LocalStore:
    """A local partition: the lease is an ``flock`` (the kernel drops it with its holder,
    so a killed run never blocks the next); the pointer is replaced by one ``rename``."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.fd: int | None = None

    def acquire(self, run: dict[str, Any], what: str) -> None:
        import fcntl

        os.makedirs(self.loc.path, exist_ok=True)
        path = self.loc.child(LEASE).path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = os.pread(fd, 4096, 0)
                os.close(fd)
                raise PartitionBusy(f"{what} {self.loc.uri} is being written by "
                                    f"{_holder(json.loads(held or b'{}'))}; nothing was written") from None
            try:  # a releasing run may have unlinked the file between our open and lock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(run).encode(), 0)
        self.fd = fd

    def check(self) -> None:  # the kernel holds the lock for as long as we live
        pass

    def release(self) -> None:
        if self.fd is not None:
            os.unlink(self.loc.child(LEASE).path)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def read_pointer(self) -> tuple[bytes | None, Any]:
        try:
            return read_bytes(self.loc.child(SUCCESS)), None
        except FileNotFoundError:
            return None, None

    def write_pointer(self, data: bytes, tag: Any) -> None:
        final = self.loc.child(SUCCESS).path
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)  # the commit: one rename
        dir_fd = os.open(self.loc.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _S3Store:
    """An S3 partition: the lease is an object created with ``If-None-Match: *`` and
    renewed with ``If-Match`` every ``ttl/3`` seconds; the pointer is one conditional PUT.
    The store must honour conditional writes (AWS S3 does; so does the loopback server the
    tests run)."""

    def __init__(self, loc: Location, ttl_s: float):
        import boto3
        from botocore.config import Config

        self.loc, self.ttl_s = loc, ttl_s
        self.bucket, _, self.prefix = loc.path.partition("/")
        self.s3 = boto3.client("s3", config=Config(
            retries={"total_max_attempts": storage.S3_MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=storage.S3_CONNECT_TIMEOUT_S, read_timeout=storage.S3_REQUEST_TIMEOUT_S))
        self.etag: str | None = None
        self.run: dict[str, Any] = {}
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @staticmethod
    def _refused(err: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in (
            "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")

    def _lease_body(self) -> bytes:
        expires = _now() + dt.timedelta(seconds=self.ttl_s)
        return json.dumps({**self.run, "expires_at": expires.isoformat()}).encode()

    def acquire(self, run: dict[str, Any], what: str) -> None:
        self.run = run
        key = self._key(LEASE)
        for _ in range(5):
            try:
                self.etag = self.s3.put_object(Bucket=self.bucket, Key=key, Body=self._lease_body(),
                                               IfNoneMatch="*")["ETag"]
                break
            except Exception as err:  # noqa: BLE001 - a refusal is expected; anything else goes up
                if not self._refused(err):
                    raise
            try:
                got = self.s3.get_object(Bucket=self.bucket, Key=key)
            except Exception as err:  # noqa: BLE001
                if self._refused(err):
                    continue  # released meanwhile: try to create it again
                raise
            held = json.loads(got["Body"].read() or b"{}")
            stale = (dt.datetime.fromisoformat(held.get("expires_at", "1970-01-01T00:00:00+00:00")) < _now()
                     or (held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", 0)))))
            if not stale:
                raise PartitionBusy(f"{what} {self.loc.uri} is being written by {_holder(held)}, lease until "
                                    f"{held.get('expires_at')}; nothing was written")
            try:  # take the dead run's lease over; of two takers one wins
                self.etag = self.s3.put_object(Bucket=self.bucket, Key=key, Body=self._lease_body(),
                                               IfMatch=got["ETag"])["ETag"]
                break
            except Exception as err:  # noqa: BLE001
                if not self._refused(err):
                    raise
        else:
            raise PartitionBusy(f"{what} {self.loc.uri}: could not take the lease; nothing was written")
        self._beat = threading.Thread(target=self._heartbeat, name="piarec-lease", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.etag = self.s3.put_object(Bucket=self.bucket, Key=self._key(LEASE), Body=self._lease_body(),
                                               IfMatch=self.etag)["ETag"]
            except Exception as err:  # noqa: BLE001 - a lost lease stops the run at commit
                if self._refused(err):
                    self.lost.set()
                    return

    def check(self) -> None:
        if self.lost.is_set():
            raise CommitConflict(f"{self.loc.uri}: this run lost its lease (another run took the partition "
                                 "over); nothing of it is published")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.etag and not self.lost.is_set():
            try:
                self.s3.delete_object(Bucket=self.bucket, Key=self._key(LEASE), IfMatch=self.etag)
            except Exception as err:  # noqa: BLE001 - someone else's lease is theirs to remove
                if not self._refused(err):
                    raise
        self.etag = None

    def read_pointer(self) -> tuple[bytes | None, Any]:
        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=self._key(SUCCESS))
        except Exception as err:  # noqa: BLE001
            if self._refused(err):
                return None, None
            raise
        return got["Body"].read(), got["ETag"]

    def write_pointer(self, data: bytes, tag: Any) -> None:
        cond = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._key(SUCCESS), Body=data, **cond)
        except Exception as err:  # noqa: BLE001
            if self._refused(err):
                raise CommitConflict(f"{self.loc.uri}/{SUCCESS} changed since this run started (another run "
                                     "committed); nothing of this run is published") from None
            raise


# --------------------------------------------------------------------------- a run
class PartitionCommit:
    """One run's write of partition ``uri``: ``with PartitionCommit(uri) as run:`` write
    under ``run.data_uri``, then ``run.commit(manifest, validate)``. Leaving the block
    without a commit removes this run's files; the previous commit stays in force."""

    def __init__(self, uri: str, *, what: str = "partition", grace_s: float = 3600.0, lease_ttl_s: float = 120.0):
        """``grace_s``: how long a retired version stays readable (for readers that read the
        old pointer just before this commit); ``lease_ttl_s``: how long an S3 lease outlives
        its last renewal (a run killed on another host blocks the partition that long)."""
        self.loc = resolve(uri)
        self.what, self.grace_s = what, grace_s
        started = _now()
        self.version = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        self.run = {"id": self.version, "host": socket.gethostname(), "pid": os.getpid(),
                    "started_at": _stamp(started)}
        self.store = _S3Store(self.loc, lease_ttl_s) if is_s3(uri) else _LocalStore(self.loc)
        self.data = self.loc.child(VERSIONS, self.version)
        self.pointer: Pointer | None = None
        self._tag: Any = None
        self.committed = False

    @classmethod
    def of(cls, storage: StorageConfig, uri: str, what: str) -> "PartitionCommit":
        """A run of ``uri`` with the retention and lease settings of ``storage``."""
        return cls(uri, what=what, grace_s=storage.retain_versions_s, lease_ttl_s=storage.lease_ttl_s)

    @property
    def data_uri(self) -> str:
        """Where this run writes its files: ``P/_versions/<version>``."""
        return self.data.uri

    def __enter__(self) -> "PartitionCommit":
        self.store.acquire(self.run, self.what)
        try:
            fault_point("leased")
            raw, self._tag = self.store.read_pointer()
            self.pointer = None if raw is None else Pointer.from_bytes(raw, self.loc.uri)
            self._sweep(self._kept(self.pointer))
            fault_point("swept")
        except BaseException:
            self.store.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed:
                remove(self.data)
        finally:
            self.store.release()
        if not self.committed and self.pointer is None:
            self._prune_empty()

    def _prune_empty(self) -> None:
        """A first run that committed nothing leaves no folder behind (none that is empty;
        a racing run's files are never touched)."""
        for loc in (self.loc.child(VERSIONS), self.loc):
            if exists(loc) and not list_dir(loc):
                try:
                    loc.fs.delete_dir(loc.path)
                except OSError:  # another run created something meanwhile: it stays
                    return

    def files(self) -> list[dict[str, Any]]:
        """This run's data files (relative to ``P``, sorted), Spark's markers and
        ``_``/``.`` names under the version excluded."""
        base = self.loc.path.rstrip("/") + "/"
        return sorted(({"path": i.path[len(base):], "size": int(i.size)} for i in data_files(self.data)),
                      key=lambda f: f["path"])

    def commit(self, manifest: dict[str, Any], validate: Callable[[list[str]], Any] | None = None) -> Pointer:
        """Validate this run's files (``validate(paths)`` raises to refuse them; what it
        returns is kept as the manifest's ``validation``), then make them the partition's
        committed version in one step. Returns the new pointer."""
        fault_point("written")
        files = self.files()
        if validate is not None:
            checked = validate([self.loc.child(f["path"]).path for f in files])
            if checked is not None:
                manifest = {**manifest, "validation": checked}
        fault_point("validated")
        self.store.check()
        now = _now()
        old = self.pointer
        retired = [] if old is None else [r for r in old.retired if r["version"] in old.kept_versions(now, self.grace_s)]
        if old is not None and old.version is not None:
            retired.insert(0, {"version": old.version, "retired_at": _stamp(now)})
        pointer = Pointer(self.version, files, manifest, _stamp(now), self.run, retired)
        self.store.write_pointer(pointer.to_bytes(), self._tag)
        self.committed, self.pointer = True, pointer
        fault_point("committed")
        self._sweep(self._kept(pointer))
        fault_point("collected")
        return pointer

    def _kept(self, pointer: Pointer | None) -> set[str]:
        return set() if pointer is None else pointer.kept_versions(_now(), self.grace_s)

    def _sweep(self, keep: set[str]) -> None:
        """Remove what no reader can reach: versions neither committed nor retained
        (leftovers of dead runs: we hold the lease, so no other run is live), stray files
        of a killed commit, and -- once a versioned commit is in force -- the data of the
        earlier unversioned layout."""
        legacy = self.pointer is not None and self.pointer.version is None
        for info in list_dir(self.loc):
            name = info.base_name
            if name in (SUCCESS, LEASE) or (legacy and name != VERSIONS and not name.startswith(f"{SUCCESS}.tmp-")):
                continue
            if name == VERSIONS:
                for v in list_dir(self.loc.child(VERSIONS)):
                    if v.base_name not in keep and v.base_name != self.version:
                        remove(self.loc.child(VERSIONS, v.base_name))
                continue
            remove(self.loc.child(name))
