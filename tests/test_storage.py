"""The publish protocol on a local folder and on a real S3-protocol server (loopback)."""

from __future__ import annotations

import pytest
from s3server import BUCKET, moto_s3

from piarec.data import storage


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


def _write_run(root: str, final: str, files: dict[str, bytes]) -> str:
    tmp = storage.temp_sibling(final)
    for name, data in files.items():
        storage.write_bytes(storage.resolve(tmp).child(name), data)
    return tmp


def _listing(uri: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    loc = storage.resolve(uri)
    out = {}
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)):
        if info.type == pafs.FileType.File:
            out[info.path[len(loc.path) + 1:]] = storage.read_bytes(storage.Location(loc.fs, info.path, ""))
    return out


def _roots(tmp_path, s3):
    return [str(tmp_path / "local"), f"s3://{BUCKET}/{tmp_path.name}"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publish_then_replace(where, tmp_path, s3):
    root = str(tmp_path / "local") if where == "local" else f"s3://{BUCKET}/{tmp_path.name}"
    final = f"{root}/dt=2026-04-30/arm=champion"
    assert not storage.is_published(final)

    tmp = _write_run(root, final, {"part-0.parquet": b"old-0", "part-1.parquet": b"old-1"})
    storage.publish_dir(tmp, final, {"run": 1}, manifest_name="_manifest.json")
    assert storage.is_published(final)
    assert storage.read_json(storage.resolve(final).child("_manifest.json")) == {"run": 1}
    assert set(_listing(final)) == {"part-0.parquet", "part-1.parquet", "_manifest.json", "_SUCCESS"}

    # A rerun replaces the whole partition: no file of the old run survives.
    tmp = _write_run(root, final, {"part-0.parquet": b"new-0", "sub/part-9.parquet": b"new-9"})
    storage.publish_dir(tmp, final, {"run": 2}, manifest_name="_manifest.json")
    files = _listing(final)
    assert files == {"part-0.parquet": b"new-0", "sub/part-9.parquet": b"new-9",
                     "_manifest.json": files["_manifest.json"], "_SUCCESS": b""}
    assert storage.read_json(storage.resolve(final).child("_manifest.json")) == {"run": 2}
    # Nothing temporary is left beside the partition.
    parent = final.rsplit("/", 1)[0]
    assert set(_listing(parent)) == {f"arm=champion/{k}" for k in files}


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


def _staged(s3, name, files):
    final = f"s3://{BUCKET}/faults/{name}/dt=2026-04-30"
    tmp = _write_run("", final, files)
    return tmp, final


def test_transient_5xx_are_retried_and_publish_completes(s3, monkeypatch):
    files = {"part-0.parquet": b"a" * 1000, "part-1.parquet": b"b" * 10}
    tmp, final = _staged(s3, "5xx", files)
    with FaultProxy(s3, fail_first=4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage.publish_dir(tmp, final, {"run": "5xx"}, manifest_name="_manifest.json")
        assert proxy.faults == 4 and proxy.requests > 4
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    listing = _listing(final)
    assert storage.read_json(storage.resolve(final).child("_manifest.json")) == {"run": "5xx"}
    assert listing == {**files, "_manifest.json": listing["_manifest.json"], "_SUCCESS": b""}
    assert not storage.exists(storage.resolve(tmp))


def test_stalled_requests_time_out_and_are_retried(s3, monkeypatch):
    tmp, final = _staged(s3, "timeout", {"part-0.parquet": b"payload"})
    storage.publish_dir(tmp, final)
    monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", 1.0)
    with FaultProxy(s3, fail_first=1, delay=4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert storage.read_bytes(storage.resolve(final).child("part-0.parquet")) == b"payload"
        assert proxy.faults == 1 and proxy.requests >= 2


def test_persistent_errors_fail_and_publish_nothing(s3, monkeypatch):
    tmp, final = _staged(s3, "down", {"part-0.parquet": b"x"})
    with FaultProxy(s3, fail_first=None) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with pytest.raises(OSError, match="SlowDown|503|Service"):
            storage.publish_dir(tmp, final)
        assert proxy.requests == storage.S3_MAX_ATTEMPTS  # gave up after the retries
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    assert not storage.is_published(final)


def test_temporary_siblings_are_invisible_to_partition_discovery():
    # Spark and pyarrow skip "_" names, but Spark only when they hold no "=".
    tmp = storage.temp_sibling("s3://b/recs/dt=2026-04-30/arm=champion")
    parent, name = tmp.rsplit("/", 1)
    assert parent == "s3://b/recs/dt=2026-04-30"
    assert name.startswith("_tmp-arm-champion-") and "=" not in name
