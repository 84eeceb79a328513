"""One atomic commit per partition (piarec/data/commit.py) under kills, faults and
concurrent runs, on a local folder and on a real S3-protocol server (loopback), and the
reader contract checked with three real readers: pyarrow, DuckDB and Spark.

The publisher is ``tests/commit_driver.py``: a real process writing a two-arm day with the
engines' part writer; every row carries its run's tag, so a mix of runs is visible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from s3server import BUCKET, FaultProxy, moto_s3

import commit_driver
from piarec.data import reader, storage
from piarec.data.commit import LEASE, STEPS, VERSIONS, PartitionBusy, PartitionCommit, read_pointer

DRIVER = Path(__file__).with_name("commit_driver.py")
ROWS = 2000  # per arm


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A partition URI on a local folder or on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "recs" / "dt=2026-04-30")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{tmp_path.name}/recs/dt=2026-04-30"


def drive(uri: str, tag: str, fault: str | None = None, grace: float = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRIVER_GRACE_S": str(grace)}
    env.pop("PIAREC_FAULT_AT", None)
    if fault:
        env["PIAREC_FAULT_AT"] = fault
    return subprocess.run([sys.executable, str(DRIVER), uri, tag], env=env, capture_output=True, text=True,
                          timeout=120, cwd=DRIVER.parent)


def committed_tags(uri: str) -> Counter:
    """(arm, tag) -> rows, read by the reader rule."""
    table = reader.read_table(uri, columns=["model_version", "arm"])
    return Counter(zip(table.column("arm").to_pylist(), table.column("model_version").to_pylist()))


def whole(tag: str) -> Counter:
    return Counter({("champion", tag): ROWS, ("challenger", tag): ROWS})


def entries(uri: str) -> tuple[list[str], list[str]]:
    """The partition's top-level names and its versions."""
    loc = storage.resolve(uri)
    names = lambda sub: sorted(i.base_name for i in loc.fs.get_file_info(  # noqa: E731
        pafs.FileSelector(sub.path, allow_not_found=True)))
    return names(loc), names(loc.child(VERSIONS))


# --------------------------------------------------------------------------- kills
@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_every_step_leaves_one_complete_version_and_the_rerun_cleans_up(where, step):
    assert drive(where, "old").returncode == 0
    old = read_pointer(where).version
    killed = drive(where, "new", fault=step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Before the commit step the old version is in force, from it on the new one: never
    # neither, never a mix of runs or arms.
    after_commit = STEPS.index(step) >= STEPS.index("committed")
    assert committed_tags(where) == whole("new" if after_commit else "old")
    assert (read_pointer(where).version != old) == after_commit
    rerun = drive(where, "rerun")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert committed_tags(where) == whole("rerun")
    # No leftovers: the killed run's version, its lease and stray files are gone.
    assert entries(where) == (["_SUCCESS", VERSIONS], [read_pointer(where).version])


def test_retired_versions_stay_readable_for_the_grace_then_go(where):
    assert drive(where, "one", grace=3600).returncode == 0
    first = read_pointer(where)
    assert drive(where, "two", grace=3600).returncode == 0
    second = read_pointer(where)
    assert [r["version"] for r in second.retired] == [first.version]
    assert entries(where)[1] == sorted([first.version, second.version])
    # A reader holding the old pointer still reads its files complete.
    loc = storage.resolve(where)
    assert sum(loc.fs.get_file_info(loc.child(f["path"]).path).size == f["size"] for f in first.files) == len(first.files)
    assert drive(where, "three", grace=0).returncode == 0
    assert entries(where) == (["_SUCCESS", VERSIONS], [read_pointer(where).version])


# --------------------------------------------------------------------------- concurrency
def test_a_live_run_refuses_a_second_with_one_line_and_its_files_are_never_touched(where):
    assert drive(where, "old").returncode == 0
    with PartitionCommit(where, what="recommendations day", grace_s=0) as live:
        storage.write_bytes(storage.resolve(live.data_uri).child("arm=champion", "part-x.parquet"), b"in flight")
        refused = drive(where, "second")
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "is being written by run" in lines[0] and "nothing was written" in lines[0]
        assert storage.exists(storage.resolve(live.data_uri).child("arm=champion", "part-x.parquet"))
        with pytest.raises(PartitionBusy):
            PartitionCommit(where).__enter__()
    assert committed_tags(where) == whole("old")
    assert entries(where) == (["_SUCCESS", VERSIONS], [read_pointer(where).version])  # lease released


@pytest.mark.slow
def test_two_processes_publishing_one_partition_never_mix(where):
    """20 rounds of two real processes started together: each ends committed or refused
    with one line; the partition holds one run's rows, both arms, and nothing else."""
    outcomes = Counter()
    for r in range(20):
        env = {**os.environ, "DRIVER_GRACE_S": "0", "DRIVER_START_AT": str(time.time() + 2.5)}
        procs = [subprocess.Popen([sys.executable, str(DRIVER), where, f"r{r}-{p}"], env=env, cwd=DRIVER.parent,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (0, 1)]
        done = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        for rc, err in done:
            assert rc in (0, 2), err[-2000:]
            if rc == 2:
                assert "is being written by run" in err and len(err.strip().splitlines()) == 1
        winners = [f"r{r}-{p}" for p, (rc, _) in enumerate(done) if rc == 0]
        assert winners, done
        outcomes["refused" if len(winners) == 1 else "serialized"] += 1
        tags = committed_tags(where)
        assert tags in [whole(w) for w in winners], tags  # one run, complete, both arms
        assert entries(where) == (["_SUCCESS", VERSIONS], [read_pointer(where).version])
    print(f"outcomes over 20 rounds: {dict(outcomes)}")


# --------------------------------------------------------------------------- S3 faults
def test_s3_failing_after_n_requests_loses_no_arm_and_mixes_none(s3, monkeypatch, tmp_path):
    """A store that stops answering after the N-th request of a two-arm publish, N spread
    over every step of it: the previous day stays complete each time (or, once the pointer
    PUT got through, the new one does), and a clean rerun commits with nothing left over."""
    uri = f"s3://{BUCKET}/{tmp_path.name}/recs/dt=2026-04-30"
    commit_driver.publish(uri, "old", ROWS, grace_s=0)
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 1)  # fail fast: the proxy never recovers
    ttl = 0.5
    with FaultProxy(s3, fail_first=0) as counting:
        monkeypatch.setenv("AWS_ENDPOINT_URL", counting.endpoint)
        commit_driver.publish(uri, "probe", ROWS, grace_s=0, lease_ttl_s=30)
        total = counting.requests
    assert total > 20
    # Stops spread over the whole publish, and every one of its last requests (the
    # pointer PUT, the sweep, the lease's release).
    stops = sorted(set(range(0, total, max(1, total // 12))) | set(range(max(0, total - 8), total)))
    previous = "probe"
    for n in stops:
        with FaultProxy(s3, fail_after=n) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            with pytest.raises(Exception):  # noqa: B017 - any error: the store is down
                commit_driver.publish(uri, f"n{n}", ROWS, grace_s=0, lease_ttl_s=ttl)
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
        tags = committed_tags(uri)
        assert tags in (whole(previous), whole(f"n{n}")), (n, previous, tags)
        if tags == whole(f"n{n}"):  # the pointer PUT went through; what failed came after it
            previous = f"n{n}"
        time.sleep(ttl + 0.1)  # a lease whose release failed expires
    time.sleep(ttl + 0.1)
    commit_driver.publish(uri, "clean", ROWS, grace_s=0)
    assert committed_tags(uri) == whole("clean")
    assert entries(uri) == (["_SUCCESS", VERSIONS], [read_pointer(uri).version])


def test_the_loopback_store_honours_conditional_writes(s3):
    """What the commit relies on: create-only (If-None-Match) and compare-and-swap (If-Match)."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3")
    first = client.put_object(Bucket=BUCKET, Key="cond/p", Body=b"1", IfNoneMatch="*")["ETag"]
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=BUCKET, Key="cond/p", Body=b"2", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=BUCKET, Key="cond/p", Body=b"3", IfMatch='"0"')
    client.put_object(Bucket=BUCKET, Key="cond/p", Body=b"4", IfMatch=first)
    assert client.get_object(Bucket=BUCKET, Key="cond/p")["Body"].read() == b"4"


# --------------------------------------------------------------------------- readers
@pytest.fixture
def day_with_leftovers(tmp_path):
    """A committed day with the leftovers of a killed run beside it (its files and lease)."""
    uri = str(tmp_path / "recs" / "dt=2026-04-30")
    assert drive(uri, "committed").returncode == 0
    assert drive(uri, "killed", fault="validated").returncode == -signal.SIGKILL
    assert len(entries(uri)[1]) == 2 and LEASE in entries(uri)[0]
    return uri


def _sorted_rows(rows) -> list[tuple]:
    return sorted((r["arm"], r["user_id"], r["model_version"]) for r in rows)


@pytest.mark.slow
def test_pyarrow_duckdb_and_spark_read_the_same_committed_rows(day_with_leftovers, tmp_path):
    import duckdb
    from pyspark.sql import SparkSession

    uri = day_with_leftovers
    want = _sorted_rows(reader.read_table(uri).to_pylist())
    assert len(want) == 2 * ROWS and {r[2] for r in want} == {"committed"}
    files = reader.uris(uri)
    got_duckdb = duckdb.sql(f"select arm, user_id, model_version from read_parquet({files}, "
                            "hive_partitioning = true)").fetchall()
    assert sorted(got_duckdb) == want
    # The naive glob is not the contract: it also reads the killed run's files.
    naive = duckdb.sql(f"select count(*) from read_parquet('{Path(uri).parent}/**/*.parquet', "
                       "hive_partitioning = true)").fetchall()[0][0]
    assert naive == 4 * ROWS
    spark = (SparkSession.builder.master("local[1]").appName("reader-contract")
             .config("spark.ui.enabled", "false").getOrCreate())
    try:
        base = reader.open_committed(uri).base
        frame = spark.read.option("basePath", base).parquet(*files)
        got_spark = [(r["arm"], r["user_id"], r["model_version"]) for r in frame.collect()]
    finally:
        spark.stop()
    assert sorted(got_spark) == want


def test_pyarrow_reads_the_committed_day_on_s3(s3, tmp_path):
    uri = f"s3://{BUCKET}/{tmp_path.name}/recs/dt=2026-04-30"
    assert drive(uri, "committed").returncode == 0
    assert drive(uri, "killed", fault="written").returncode == -signal.SIGKILL
    assert committed_tags(uri) == whole("committed")
    assert reader.read_arm(uri, "challenger").num_rows == ROWS


def test_a_partition_of_the_unversioned_layout_reads_and_is_replaced(tmp_path):
    """A day published before versioned commits (data beside an empty _SUCCESS) reads by
    the same rule; the first versioned commit replaces it whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from piarec.scoring.arrow import OUTPUT_SCHEMA

    uri = tmp_path / "recs" / "dt=2026-04-30"
    (uri / "arm=champion").mkdir(parents=True)
    rows = pa.Table.from_batches([commit_driver.rows("legacy", "champion", 10)]).cast(OUTPUT_SCHEMA)
    pq.write_table(rows, uri / "arm=champion" / "p.parquet")
    (uri / "arm=champion" / "_manifest.json").write_text("{}")
    (uri / "_SUCCESS").write_bytes(b"")
    assert reader.read_table(str(uri)).num_rows == 10
    assert drive(str(uri), "new").returncode == 0
    assert committed_tags(str(uri)) == whole("new")
    assert entries(str(uri)) == (["_SUCCESS", VERSIONS], [read_pointer(str(uri)).version])

