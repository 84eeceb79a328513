"""Storage by URI and the commit protocol's basics, on a local folder and on a real
S3-protocol server (loopback); kills, races and readers are tests/test_commit.py."""

from __future__ import annotations

import pytest
from s3server import BUCKET, moto_s3

from piarec.data import storage
from piarec.data.commit import PartitionCommit, read_pointer


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


def _commit(uri: str, files: dict[str, bytes], manifest: dict, **kw) -> str:
    with PartitionCommit(uri, grace_s=0, **kw) as run:
        for name, data in files.items():
            storage.write_bytes(storage.resolve(run.data_uri).child(name), data)
        run.commit(manifest)
    return run.version


def _listing(uri: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    loc = storage.resolve(uri)
    out = {}
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            out[info.path[len(loc.path) + 1:]] = storage.read_bytes(storage.Location(loc.fs, info.path, ""))
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_commit_then_replace(where, tmp_path, s3):
    root = str(tmp_path / "local") if where == "local" else f"s3://{BUCKET}/{tmp_path.name}"
    final = f"{root}/dt=2026-04-30"
    assert not storage.is_published(final) and read_pointer(final) is None

    v1 = _commit(final, {"arm=a/part-0.parquet": b"old-0", "arm=a/part-1.parquet": b"old-1"}, {"run": 1})
    pointer = read_pointer(final)
    assert storage.is_published(final) and pointer.version == v1 and pointer.manifest == {"run": 1}
    assert [f["path"] for f in pointer.files] == [f"_versions/{v1}/arm=a/part-0.parquet",
                                                  f"_versions/{v1}/arm=a/part-1.parquet"]
    assert [f["size"] for f in pointer.files] == [5, 5]

    # A rerun replaces the whole partition: no file of the old run survives (no grace here).
    v2 = _commit(final, {"arm=a/part-0.parquet": b"new-0", "arm=b/part-9.parquet": b"new-9"}, {"run": 2})
    files = _listing(final)
    assert set(files) == {"_SUCCESS", f"_versions/{v2}/arm=a/part-0.parquet", f"_versions/{v2}/arm=b/part-9.parquet"}
    assert read_pointer(final).manifest == {"run": 2} and read_pointer(final).retired == [
        {"version": v1, "retired_at": read_pointer(final).committed_at}]
    # Nothing beside the partition either.
    assert set(_listing(root)) == {f"dt=2026-04-30/{k}" for k in files}


def test_a_failed_run_removes_its_files_and_keeps_the_commit(tmp_path):
    final = str(tmp_path / "dt=2026-04-30")
    v1 = _commit(final, {"part-0.parquet": b"old"}, {"run": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with PartitionCommit(final) as run:
            storage.write_bytes(storage.resolve(run.data_uri).child("part-0.parquet"), b"new")
            raise RuntimeError("boom")
    assert set(_listing(final)) == {"_SUCCESS", f"_versions/{v1}/part-0.parquet"}


def test_validation_refuses_the_files_and_nothing_is_committed(tmp_path):
    final = str(tmp_path / "dt=2026-04-30")
    v1 = _commit(final, {"part-0.parquet": b"old"}, {"run": 1})

    def refuse(paths):
        assert [p.rsplit("/", 1)[1] for p in paths] == ["part-0.parquet"]  # this run's files only
        raise ValueError("bad files")

    with pytest.raises(ValueError, match="bad files"):
        with PartitionCommit(final) as run:
            storage.write_bytes(storage.resolve(run.data_uri).child("part-0.parquet"), b"new")
            run.commit({"run": 2}, validate=refuse)
    assert read_pointer(final).version == v1 and set(_listing(final)) == {"_SUCCESS", f"_versions/{v1}/part-0.parquet"}


def test_s3_settings_come_from_the_aws_environment(s3, monkeypatch):
    loc = storage.resolve(f"s3a://{BUCKET}/x/y/")
    assert loc.uri == f"s3://{BUCKET}/x/y" and loc.path == f"{BUCKET}/x/y"
    storage.write_bytes(loc.child("f"), b"1")
    assert storage.read_bytes(loc.child("f")) == b"1"
    # Point the chain at a port where nothing listens: the same call now fails.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(OSError):
        storage.read_bytes(storage.resolve(f"s3://{BUCKET}/x/y/f"))


# ---------------------------------------------------------------- faults (issue: reliability)
# A proxy on loopback between the client and the S3 server injects 503s and stalls.
from s3server import FaultProxy  # noqa: E402


def test_transient_5xx_are_retried_and_the_commit_completes(s3, monkeypatch):
    files = {"part-0.parquet": b"a" * 1000, "part-1.parquet": b"b" * 10}
    final = f"s3://{BUCKET}/faults/5xx/dt=2026-04-30"
    with FaultProxy(s3, fail_first=4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        version = _commit(final, files, {"run": "5xx"})
        assert proxy.faults == 4 and proxy.requests > 4
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    assert read_pointer(final).manifest == {"run": "5xx"}
    listing = _listing(final)
    assert listing == {"_SUCCESS": listing["_SUCCESS"], **{f"_versions/{version}/{k}": v for k, v in files.items()}}


def test_stalled_requests_time_out_and_are_retried(s3, monkeypatch):
    final = f"s3://{BUCKET}/faults/timeout/dt=2026-04-30"
    version = _commit(final, {"part-0.parquet": b"payload"}, {})
    monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", 1.0)
    with FaultProxy(s3, fail_first=1, delay=4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        loc = storage.resolve(final).child("_versions", version, "part-0.parquet")
        assert storage.read_bytes(loc) == b"payload"
        assert proxy.faults == 1 and proxy.requests >= 2


def test_persistent_errors_fail_and_commit_nothing(s3, monkeypatch):
    final = f"s3://{BUCKET}/faults/down/dt=2026-04-30"
    with FaultProxy(s3, fail_first=None) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with pytest.raises(Exception, match="SlowDown|503|Service"):
            _commit(final, {"part-0.parquet": b"x"}, {})
        assert proxy.requests == storage.S3_MAX_ATTEMPTS  # gave up after the retries
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    assert not storage.is_published(final)


def test_a_failed_first_run_leaves_no_folder(tmp_path):
    final = tmp_path / "dt=2026-04-30"
    with pytest.raises(RuntimeError, match="boom"):
        with PartitionCommit(str(final)) as run:
            storage.write_bytes(storage.resolve(run.data_uri).child("part-0.parquet"), b"new")
            raise RuntimeError("boom")
    assert not final.exists()
