"""Weekly snapshot job, daily histories and the shared event transforms, on tiny hand-made
logs with known answers.

Expected rows are written out literally, derived by hand from the inputs. Where a hash
decides, its values are quoted in comments and pinned here on purpose (a user's split and
index must not drift from one week to the next):

* split / fold-in: ``int(sha256("\\x1f".join([salt, *values])).hexdigest()[:13], 16) / 2**52``
  with the default salt ``piarec-split-v1``;
* user order: ``zlib.crc32(user_id.encode())``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from piarec.config import (
    EventsSchema,
    FilterConfig,
    PipelineConfig,
    PositiveRule,
    QualityConfig,
    ScoringConfig,
    SparkConfig,
    SplitConfig,
)
from piarec.errors import ConfigError, InputDataError
from piarec.data import reader
from piarec.data.commit import read_pointer
from piarec.data.layout import histories_uri, snapshot_uri
from piarec.data.snapshot import load_snapshot

pyspark = pytest.importorskip("pyspark")
from pyspark.sql import Observation  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from pipelines import build_matrix as bm  # noqa: E402
from pipelines import matrix_transforms as mt  # noqa: E402
from pipelines.event_source import CANONICAL_COLUMNS  # noqa: E402
from pipelines.events import (  # noqa: E402
    DROP_REASONS,
    clean_events,
    daily_histories,
    drop_reason,
    event_metrics,
    in_window,
    open_events,
    positive_condition,
    positive_pairs,
    read_events,
    seen_pairs,
)
from pipelines.spark import get_spark  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPARK_CFG = SparkConfig(
    master="local[2]", app_name="piarec-tests", shuffle_partitions=2, driver_memory="1g"
)
PAIRS = "user_id string, item_id string"
USERS = "user_id string, items array<string>"


@pytest.fixture(scope="session")
def spark():
    session = get_spark(SPARK_CFG)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def write_events(root: Path, rows: list[tuple]) -> str:
    """rows: (user, item, type, 'YYYY-MM-DD HH:MM:SS' | None, watch[, dt]); dt defaults to
    ts's day."""
    ts = [None if r[3] is None else datetime.fromisoformat(r[3]).replace(tzinfo=timezone.utc)
          for r in rows]
    table = pa.table({
        "user_id": pa.array([r[0] for r in rows], pa.string()),
        "item_id": pa.array([r[1] for r in rows], pa.string()),
        "event_type": pa.array([r[2] for r in rows], pa.string()),
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "watch_seconds": pa.array([r[4] for r in rows], pa.int32()),
        "dt": [r[5] if len(r) > 5 else r[3][:10] for r in rows],
    })
    pq.write_to_dataset(table, str(root), partition_cols=["dt"])
    return str(root)


def rows(df, *cols) -> list[tuple]:
    return sorted(tuple(r) for r in df.select(*(cols or df.columns)).collect())


def committed_only(partition: Path) -> str:
    """The partition folder holds only the commit pointer and the committed version (no
    lease, no leftover of a run, no earlier version); returns that version."""
    pointer = read_pointer(str(partition))
    assert pointer is not None, f"{partition} is not published"
    assert sorted(p.name for p in partition.iterdir()) == ["_SUCCESS", "_versions"]
    assert [p.name for p in (partition / "_versions").iterdir()] == [pointer.version]
    return pointer.version


# ------------------------------------------------------------------ environment
def test_get_spark_settings(spark):
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    assert spark.conf.get("spark.sql.shuffle.partitions") == "2"
    assert spark.conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert spark.sparkContext.getConf().get("spark.ui.enabled") == "false"
    assert get_spark(SPARK_CFG) is spark  # getOrCreate: the active session comes back


def test_python_udf_runs(spark):
    """mapInArrow works: guards against the pyspark / pyspark-client packaging clash (a provider installing pyspark-client over pyspark breaks Python UDFs)."""

    def double(batches):
        for b in batches:
            xs = b.column("x").to_pylist()
            yield pa.RecordBatch.from_pydict({"x": xs, "y": [2 * v for v in xs]})

    out = spark.createDataFrame([(1,), (2,), (5,)], "x long").mapInArrow(double, "x long, y long")
    assert rows(out) == [(1, 2), (2, 4), (5, 10)]


# ------------------------------------------------------------------ reading
def test_read_events_renames_casts_and_prunes(spark, tmp_path):
    table = pa.table({
        "account": pa.array([7, 8, 9, 10], pa.int64()),
        "title": ["t1", "t2", "t3", "t4"],
        "kind": ["play", "click", "play", "play"],
        "when": pa.array([datetime(2024, 1, d, 12, tzinfo=timezone.utc) for d in (1, 2, 3, 4)],
                         pa.timestamp("us", tz="UTC")),
        "secs": pa.array([100, 0, 30, 3_000_000_000], pa.int64()),
        "dt": ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"],
    })
    pq.write_to_dataset(table, str(tmp_path / "ev"), partition_cols=["dt"])
    schema = EventsSchema(user_col="account", item_col="title", type_col="kind", ts_col="when",
                          watch_col="secs")
    src = open_events(spark, str(tmp_path / "ev"), schema, date(2024, 1, 2), date(2024, 1, 5))
    df = src.df
    assert (src.partitions, src.files) == (["2024-01-02", "2024-01-03", "2024-01-04"], 3)
    assert src.available == ("2024-01-01", "2024-01-04")

    assert df.dtypes == [("user_id", "string"), ("item_id", "string"), ("event_type", "string"),
                         ("ts", "timestamp"), ("watch_seconds", "int")]
    as_text = df.withColumn("ts", F.date_format("ts", "yyyy-MM-dd'T'HH:mm:ss"))
    got = sorted(tuple(r) for r in as_text.collect())
    assert got == [("10", "t4", "play", "2024-01-04T12:00:00", None),  # over int32: null
                   ("8", "t2", "click", "2024-01-02T12:00:00", 0),
                   ("9", "t3", "play", "2024-01-03T12:00:00", 30)]
    # Pruning: the filter is a partition filter and the scan opened three of four partitions.
    df.collect()  # run this very plan so its scan metrics are filled
    plan = df._jdf.queryExecution().executedPlan()
    assert "PartitionFilters: [isnotnull(dt" in plan.toString()
    leaves = plan.collectLeaves()
    scans = [leaves.apply(i) for i in range(leaves.size())
             if leaves.apply(i).getClass().getSimpleName() == "FileSourceScanExec"]
    assert len(scans) == 1
    assert scans[0].metrics().apply("numPartitions").value() == 3
    assert scans[0].metrics().apply("numFiles").value() == 3


def test_read_events_missing_columns_are_named(spark, tmp_path):
    path = write_events(tmp_path / "ev", [("u1", "a", "play", "2024-01-01 00:00:00", 100)])
    schema = EventsSchema(user_col="account", watch_col="watched")
    with pytest.raises(InputDataError) as err:
        read_events(spark, path, schema, date(2024, 1, 1), date(2024, 1, 2))
    msg = str(err.value)
    assert "'account' (for user_id)" in msg and "'watched' (for watch_seconds)" in msg
    assert "'item_id'" not in msg
    assert "columns found: user_id, item_id, event_type, ts, watch_seconds, dt" in msg
    assert "\n" not in msg
    # A rule that ignores watch time does not need the column.
    df = read_events(spark, path, EventsSchema(watch_col="watched"), date(2024, 1, 1),
                     date(2024, 1, 2), require_watch=False)
    assert rows(df, "user_id", "watch_seconds") == [("u1", None)]


def test_read_events_mistyped_columns_are_named(spark, tmp_path):
    table = pa.table({
        "user_id": pa.array([1.5]), "item_id": ["a"], "event_type": pa.array([3]),
        "ts": ["2024-01-01 10:00:00"], "watch_seconds": ["long"], "dt": ["2024-01-01"],
    })
    pq.write_to_dataset(table, str(tmp_path / "ev"), partition_cols=["dt"])
    with pytest.raises(InputDataError) as err:
        read_events(spark, str(tmp_path / "ev"), EventsSchema(), date(2024, 1, 1),
                    date(2024, 1, 2))
    assert str(err.value).endswith(
        "have mistyped column(s): 'user_id' (for user_id) must be a string or an integer, "
        "found double; 'event_type' (for event_type) must be a string, found bigint; "
        "'ts' (for ts) must be a timestamp, found string; "
        "'watch_seconds' (for watch_seconds) must be a number, found string")


def test_exposure_columns_are_read_only_when_asked_and_optional(spark, tmp_path):
    """surface / slot (docs/ab-logging.md): read for A/B analysis, null when absent, typed
    when present; the builds' frame never carries them."""
    day = [date(2024, 1, 1), date(2024, 1, 2)]
    base = {"user_id": ["u1", "u1"], "item_id": ["a", "b"], "event_type": ["impression", "play"],
            "ts": pa.array([datetime(2024, 1, 1, 9, tzinfo=timezone.utc)] * 2, pa.timestamp("us", tz="UTC")),
            "watch_seconds": pa.array([None, 600], pa.int32()), "dt": ["2024-01-01"] * 2}
    pq.write_to_dataset(pa.table({**base, "card": ["home_card", None], "pos": pa.array([3, None], pa.int16())}),
                        str(tmp_path / "with"), partition_cols=["dt"])
    schema = EventsSchema(surface_col="card", slot_col="pos")
    got = read_events(spark, str(tmp_path / "with"), schema, *day, exposure=True)
    assert got.dtypes[-2:] == [("surface", "string"), ("slot", "int")]
    assert rows(got, "event_type", "surface", "slot") == [("impression", "home_card", 3), ("play", None, None)]
    assert read_events(spark, str(tmp_path / "with"), schema, *day).columns == list(CANONICAL_COLUMNS)
    pq.write_to_dataset(pa.table(base), str(tmp_path / "without"), partition_cols=["dt"])
    got = read_events(spark, str(tmp_path / "without"), schema, *day, exposure=True)
    assert rows(got, "surface", "slot") == [(None, None), (None, None)]
    pq.write_to_dataset(pa.table({**base, "card": ["home_card", None], "pos": ["3", None]}),
                        str(tmp_path / "bad"), partition_cols=["dt"])
    with pytest.raises(InputDataError, match="'pos' \\(for slot\\) must be an integer, found string"):
        read_events(spark, str(tmp_path / "bad"), schema, *day, exposure=True)


def test_read_events_missing_path_and_unpartitioned(spark, tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_events(spark, str(tmp_path / "nope"), EventsSchema(), date(2024, 1, 1),
                    date(2024, 1, 2))
    flat = tmp_path / "flat"
    flat.mkdir()
    pq.write_table(pa.table({"user_id": ["u1"]}), str(flat / "part-0.parquet"))
    with pytest.raises(InputDataError, match="not partitioned by dt=YYYY-MM-DD folders"):
        read_events(spark, str(flat), EventsSchema(), date(2024, 1, 1), date(2024, 1, 2))


# ------------------------------------------------------------------ cleaning
EVENTS = "user_id string, item_id string, event_type string, ts timestamp, watch_seconds int"
T0 = datetime(2024, 1, 1, 12)
KNOWN = ["impression", "click", "play", "complete"]


def test_drop_reason_and_event_metrics(spark):
    start, end = date(2024, 1, 1), date(2024, 1, 3)
    df = spark.createDataFrame([
        ("u1", "a", "play", datetime(2024, 1, 1, 0, 0), 100),      # 0 kept, positive
        ("u1", "b", "click", datetime(2024, 1, 2, 23, 59), 0),     # 0 kept
        (None, "a", "play", T0, 100),                               # 1 missing user
        ("  ", "a", "play", T0, 100),                               # 1 blank user
        ("u2", "", None, None, None),                               # 2 missing item (first wins)
        ("u2", "a", "play", None, 100),                             # 3 missing ts
        ("u2", "a", "pause", T0, 100),                              # 4 unknown type
        ("u2", "a", None, T0, 100),                                 # 4 null type
        ("u3", "a", "play", datetime(2023, 12, 31, 23, 59), 100),   # 5 before the window
        ("u3", "a", "complete", datetime(2024, 1, 3, 0, 0), 100),   # 6 at the end
    ], EVENTS)
    reason = drop_reason(start, end, KNOWN)
    assert [r[0] for r in df.select(reason).collect()] == [0, 0, 1, 1, 2, 3, 4, 4, 5, 6]
    # Any type is welcome without a list of known types; a null type still is not.
    assert [r[0] for r in df.select(drop_reason(start, end, None)).collect()][6:8] == [0, 4]

    obs = Observation()
    rule = PositiveRule(event_types=["play", "complete"], min_watch_seconds=60)
    df.withColumn("_r", reason).observe(obs, *event_metrics(F.col("_r"), positive_condition(rule))) \
        .write.format("noop").mode("overwrite").save()
    assert obs.get == {
        "events_read": 10, "missing_user_id": 2, "missing_item_id": 1, "missing_ts": 1,
        "unknown_event_type": 2, "ts_before_window": 1, "ts_after_window": 1,
        "positive_events": 1,
    }
    assert list(DROP_REASONS) == list(obs.get)[1:7]
    assert rows(clean_events(df, start, end, KNOWN), "user_id", "item_id") == [
        ("u1", "a"), ("u1", "b")]


def test_in_window_edges(spark, tmp_path):
    path = write_events(tmp_path / "ev", [
        ("u1", "a", "play", "2024-01-02 00:00:00", 100),                  # exactly at start: kept
        ("u2", "b", "other", "2024-01-03 23:59:59", 100),                 # last second: kept
        ("u3", "c", "play", "2024-01-04 00:00:00", 100, "2024-01-03"),    # exactly at end: dropped
        ("u4", "d", "play", "2024-01-01 23:00:00", 100, "2024-01-02"),    # before start: dropped
        ("u5", "e", "play", "2024-01-01 12:00:00", 100),                  # dt outside: not read
        ("", "f", "play", "2024-01-02 10:00:00", 100),                    # empty user id: dropped
        ("u7", None, "play", "2024-01-02 10:00:00", 100),                 # null item id: dropped
    ])
    raw = read_events(spark, path, EventsSchema(), date(2024, 1, 2), date(2024, 1, 4))
    assert raw.count() == 6  # everything in dt 2024-01-02 and 2024-01-03
    kept = in_window(raw, date(2024, 1, 2), datetime(2024, 1, 4, tzinfo=timezone.utc))
    assert rows(kept, "user_id", "item_id") == [("u1", "a"), ("u2", "b")]  # any type


# ------------------------------------------------------------------ positives / seen
def test_positive_and_seen_pairs(spark):
    df = spark.createDataFrame([
        ("u1", "a", "play", T0, 60),         # positive (exactly min watch)
        ("u1", "a", "complete", T0, 300),    # duplicate pair
        ("u1", "b", "play", T0, 59),         # too short: seen, not positive
        ("u1", "c", "click", T0, 500),       # wrong type
        ("u2", "c", "complete", T0, 61),     # positive
        ("u2", "d", "play", T0, None),       # unknown watch time: seen, not positive
        ("u2", "e", "impression", T0, 0),
    ], EVENTS)
    rule = PositiveRule(event_types=["play", "complete"], min_watch_seconds=60)
    assert rows(positive_pairs(df, rule)) == [("u1", "a"), ("u2", "c")]
    assert rows(positive_pairs(df, PositiveRule(event_types=["play"], min_watch_seconds=0))) == [
        ("u1", "a"), ("u1", "b"), ("u2", "d")]
    assert rows(seen_pairs(df, ["play", "complete"])) == [
        ("u1", "a"), ("u1", "b"), ("u2", "c"), ("u2", "d")]


# ------------------------------------------------------------------ per-user frame, filters
def test_user_item_sets(spark):
    # crc32: u1 1112514422 (top 4 bits: 4), u2 3678850764 (13), u3 2890006106 (10)
    df = spark.createDataFrame([
        ("u2", "b"), ("u1", "c"), ("u1", "a"), ("u2", "b"), ("u1", "c"), ("u3", "z"),
    ], PAIRS)
    got = rows(mt.user_item_sets(df, 4))
    assert got == [(4, 1112514422, "u1", ["a", "c"]), (10, 2890006106, "u3", ["z"]),
                   (13, 3678850764, "u2", ["b"])]
    assert mt.user_item_sets(df, 4).columns == ["_bucket", "_order", "user_id", "items"]


def test_filters_cap_items_users(spark):
    users = spark.createDataFrame([
        ("u1", ["a", "b", "x"]), ("u2", ["a", "b"]), ("u3", ["a", "y"]),
        ("u4", ["a", "b", "c", "d"]), ("u5", ["c", "d"]),
    ], USERS)
    # Bot cap 3: u4 (4 items) goes first, so its items do not count for the item filter.
    capped = mt.cap_users(users, 3)
    assert rows(capped, "user_id") == [("u1",), ("u2",), ("u3",), ("u5",)]
    assert rows(mt.item_user_counts(capped)) == [
        ("a", 3), ("b", 2), ("c", 1), ("d", 1), ("x", 1), ("y", 1)]
    # Items with >= 2 users among those left: a, b. Rows stay; arrays shrink.
    kept = mt.keep_items(capped, ["a", "b"])
    assert rows(kept) == [("u1", ["a", "b"]), ("u2", ["a", "b"]), ("u3", ["a"]), ("u5", [])]
    # Users with >= 2 positives left: u1, u2.
    assert rows(mt.min_positives(kept, 2)) == [("u1", ["a", "b"]), ("u2", ["a", "b"])]
    assert mt.cap_users(users, None) is users and mt.keep_items(users, None) is users


def test_index_items_by_popularity_then_id(spark):
    counts = spark.createDataFrame([("c", 2), ("a", 3), ("d", 1), ("b", 2)],
                                   "item_id string, n_users int")
    items = mt.index_items(counts)
    assert items.dtypes == [("item_idx", "int"), ("item_id", "string"), ("n_users", "int")]
    assert rows(items) == [(0, "a", 3), (1, "b", 2), (2, "c", 2), (3, "d", 1)]


def test_bucket_offsets():
    assert mt.bucket_offsets({7: 2, 0: 3, 3: 1}) == [(0, 0), (3, 3), (7, 4)]
    with pytest.raises(InputDataError, match="do not fit an int32"):
        mt.bucket_offsets({0: 2**31, 1: 1})


def test_index_users_dense_and_independent_of_buckets(spark):
    # Expected order: crc32 ascending -- g 30677878, u4 841313273, u8 999499730,
    # u1 1112514422, u5 1159879535, u9 1284773700, carol 1782484163, b 1908338681,
    # ü1 1963331717, d 2564639436, u7 2871802435, u3 2890006106, u2 3678850764,
    # u6 3693808341, a 3904355907.
    ids = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9", "a", "b", "carol", "d", "g",
           "ü1"]
    want = [(n, u) for n, u in enumerate(
        ["g", "u4", "u8", "u1", "u5", "u9", "carol", "b", "ü1", "d", "u7", "u3", "u2", "u6", "a"])]
    pairs = spark.createDataFrame([(u, "x") for u in ids], PAIRS).repartition(3)
    old = spark.conf.get("spark.sql.shuffle.partitions")
    try:
        for bits, partitions in ((4, 2), (6, 5)):
            spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
            users = mt.user_item_sets(pairs, bits)
            sizes = {r[0]: r[1] for r in users.groupBy("_bucket").count().collect()}
            assert len(sizes) > 3  # several buckets, really spread over partitions
            indexed = mt.index_users(users, mt.bucket_offsets(sizes))
            assert indexed.select("user_idx").dtypes == [("user_idx", "int")]
            assert rows(indexed, "user_idx", "user_id") == want
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", old)


def test_unit_hash_and_user_order(spark):
    df = spark.createDataFrame([("u1", "A"), ("u3", "C"), ("ü1", "C")], PAIRS)
    got = rows(df.select("user_id", mt.unit_hash("piarec-split-v1", "user_id").alias("u"),
                         mt.unit_hash("piarec-split-v1", "user_id", F.col("item_id")).alias("v"),
                         mt.user_order().alias("crc")))
    assert got[0][0] == "u1" and got[0][1] == pytest.approx(0.4836, abs=1e-4)
    assert got[1][0] == "u3" and got[1][1] == pytest.approx(0.0910, abs=1e-4)
    assert got[1][2] == pytest.approx(0.0600, abs=1e-4)
    assert [r[3] for r in got] == [1112514422, 2890006106, 1963331717]
    assert all(0.0 <= r[1] < 1.0 for r in got)


def test_assign_split(spark):
    # u(user): g .0204, u8 .0347, u3 .0910, a .1596, carol .1624, u2 .2021, u5 .2492,
    #          d .2571, u1 .4836, u6 .9336
    ids = ["g", "u8", "u3", "a", "carol", "u2", "u5", "d", "u1", "u6"]
    users = spark.createDataFrame(list(enumerate(ids)), "user_idx int, user_id string")
    cfg = SplitConfig(val_fraction=0.1, test_fraction=0.15)
    assert rows(mt.assign_split(users, cfg), "user_id", "split") == [
        ("a", "test"), ("carol", "test"), ("d", "train"), ("g", "val"), ("u1", "train"),
        ("u2", "test"), ("u3", "val"), ("u5", "test"), ("u6", "train"), ("u8", "val")]
    none_held = SplitConfig(val_fraction=0.0, test_fraction=0.0)
    assert {r.split for r in mt.assign_split(users, none_held).collect()} == {"train"}


def test_assign_parts(spark):
    # u(user, item) order -- p: d .1671 < b .2051 < a .4939 < e .5200 < c .7504;
    # q: b .2120 < a .5310; s: i4 < i0 < i6 < i5 < i1 < i3 < i2 < i9 < i7 < i8.
    df = spark.createDataFrame(
        [(7, "p", list("abcde"), "val"), (8, "q", ["a", "b"], "test"), (9, "r", ["a"], "val"),
         (1, "t", ["x", "y"], "train")],
        "user_idx int, user_id string, items array<string>, split string")
    out = mt.assign_parts(df, SplitConfig(fold_in_fraction=0.8))
    assert out.columns == ["user_idx", "user_id", "split", "item_id", "part"]
    assert rows(out, "user_id", "item_id", "part") == [
        # n=5: ceil(0.8*5)=4 fold_in, the last by hash (c) held out
        ("p", "a", "fold_in"), ("p", "b", "fold_in"), ("p", "c", "held_out"),
        ("p", "d", "fold_in"), ("p", "e", "fold_in"),
        # n=2: ceil(1.6)=2 is capped at n-1=1 so something is left to predict
        ("q", "a", "held_out"), ("q", "b", "fold_in"),
        ("r", "a", "fold_in"),  # n=1: nothing to hold out
        ("t", "x", "train"), ("t", "y", "train"),
    ]
    # Float noise: 0.7 * 10 = 7.000000000000001 must still mean 7 fold-in items.
    s = spark.createDataFrame([("s", [f"i{j}" for j in range(10)], "test")],
                              "user_id string, items array<string>, split string")
    held = rows(mt.assign_parts(s, SplitConfig(fold_in_fraction=0.7)).filter("part = 'held_out'"),
                "item_id")
    assert held == [("i7",), ("i8",), ("i9",)]


# ------------------------------------------------------------------ daily histories
DAILY_LOG = [
    ("a", "i1", "play", "2024-03-08 10:00:00", 120),       # positive, seen
    ("a", "i2", "complete", "2024-03-09 10:00:00", 30),    # seen, too short for positive
    ("a", "i3", "click", "2024-03-09 11:00:00", 0),        # neither
    ("a", "i1", "complete", "2024-03-10 11:00:00", 900),   # duplicate
    ("b", "i1", "impression", "2024-03-10 23:59:59", 0),   # active with nothing else
    ("c", "i4", "play", "2024-03-11 00:00:00", 100),       # day after D: not read
    ("c", "i5", "play", "2024-03-06 23:59:59", 100, "2024-03-07"),  # before the window
    ("d", "i2", "play", "2024-03-07 00:00:00", 300),       # exactly at window start
    ("d", "i1", "play", "2024-03-10 08:00:00", 300),
    ("d", "i9", "play", "2024-03-06 12:00:00", 300),       # day before the window
    ("e", "i7", "pause", "2024-03-09 12:00:00", 300),      # unknown type: dirt, e not active
    ("", "i7", "play", "2024-03-09 12:00:00", 300),        # blank user: dirt
]
DAILY_CFG = PipelineConfig(
    positive=PositiveRule(event_types=["play", "complete"], min_watch_seconds=60),
    scoring=ScoringConfig(history_days=3, seen_types=["play", "complete"]),
    quality=QualityConfig(max_dirty_fraction=0.5),
    spark=SPARK_CFG,
)
DAILY_ROWS = [("a", ["i1"], ["i1", "i2"]), ("b", [], []), ("d", ["i1", "i2"], ["i1", "i2"])]


def test_daily_histories(spark, tmp_path):
    path = write_events(tmp_path / "ev", DAILY_LOG)
    got = daily_histories(spark, path, DAILY_CFG, date(2024, 3, 10))
    assert got.dtypes == [
        ("user_id", "string"), ("history", "array<string>"), ("seen", "array<string>")]
    assert sorted((r.user_id, r.history, r.seen) for r in got.collect()) == DAILY_ROWS


def test_daily_cli_publishes_histories(spark, tmp_path, capsys):
    """``piarec build-matrix --daily`` forwards to main(): the dataset the scorers read."""
    from piarec.cli import main as piarec_main

    events = write_events(tmp_path / "ev", DAILY_LOG)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(DAILY_CFG.model_dump(
        include={"positive", "scoring", "quality", "spark"})))
    out = tmp_path / "histories"
    argv = ["--config", str(config), "build-matrix", "--daily", "--date", "2024-03-10",
            "--events", events, "--out", str(out)]
    assert piarec_main(argv) == 0
    final = Path(histories_uri(str(out), date(2024, 3, 10)))
    assert capsys.readouterr().out.strip() == (
        f"histories {final}: window [2024-03-07, 2024-03-11), 3 active users "
        "(2 with a history), 10 events read, 3 dropped")
    table = reader.read_table(str(final))  # the files the commit pointer names
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("user_id", "string"), ("history", "list<element: string>"),
        ("seen", "list<element: string>")]
    assert sorted((r["user_id"], r["history"], r["seen"]) for r in table.to_pylist()) == [
        (u, h, s) for u, h, s in DAILY_ROWS]
    pointer = read_pointer(str(final))
    manifest = pointer.manifest
    assert manifest["date"] == "2024-03-10"
    assert manifest["window"] == {"start": "2024-03-07", "end": "2024-03-11", "days": 3}
    assert manifest["input"]["partitions"] == ["2024-03-07", "2024-03-08", "2024-03-09",
                                               "2024-03-10"]
    assert manifest["counts"] == {
        # 10 events in dt 03-07 .. 03-10: c's early event, e's pause and the blank user drop.
        "events_read": 10,
        "dropped_events": {"missing_user_id": 1, "missing_item_id": 0, "missing_ts": 0,
                           "unknown_event_type": 1, "ts_before_window": 1,
                           "ts_after_window": 0},
        "dirty_fraction": 0.3,
        "events_in_window": 7, "positive_events": 4,  # a i1 twice, d i1, d i2
        "users": 3, "users_with_history": 2, "history_items": 3, "seen_items": 4,
    }
    assert committed_only(final) == pointer.version  # nothing else left in the partition
    assert sorted(p.name for p in out.iterdir()) == ["dt=2024-03-10"]  # and nothing beside it
    assert pointer.files and all(f["path"].startswith(f"_versions/{pointer.version}/") and
                                 f["path"].endswith(".parquet") for f in pointer.files)


# ------------------------------------------------------------------ the weekly job end to end
# Window [2024-01-01, 2024-01-08). Positives per user (play/complete, >= 60 s):
#   u1 A B C (A twice) | u2 A B D E | u3 A B C | u4 A C Z | u6 B A (D watched 50 s)
#   u7 A | u8 B D E | u9 A B C D E F
# Bot cap 4: u9 (6) goes first -> F has no user left; its A..E do not count below.
# Items with >= 2 users among the rest: A 6, B 5, C 3, D 2, E 2 stay; Z (u4 only) goes.
# Users with >= 2 positives left: u7 (A) goes. Final: 17 pairs, 6 users, 5 items:
#   A 5 users, B 5, C 3, D 2, E 2  ->  item_idx A0 B1 C2 D3 E4
#   crc32: u4 841313273 < u8 999499730 < u1 1112514422 < u3 2890006106 < u2 3678850764
#          < u6 3693808341  ->  user_idx u4 0, u8 1, u1 2, u3 3, u2 4, u6 5
# Splits (val < .10 <= test < .25): u8 .0347 val, u3 .0910 val, u2 .2021 test,
#   u1 .4836 / u4 .5470 / u6 .9336 train. fold_in_fraction 0.5:
#   u8 n=3 -> 2 fold_in: D .3527, E .8976; held_out B .9875
#   u3 n=3 -> 2 fold_in: C .0600, A .5425; held_out B .8574
#   u2 n=4 -> 2 fold_in: E .0246, A .3437; held_out B .7209, D .8427
E2E_LOG = [
    ("u1", "A", "play", "2024-01-01 00:00:00", 100),
    ("u1", "B", "play", "2024-01-02 10:00:00", 200),
    ("u1", "C", "complete", "2024-01-03 10:00:00", 300),
    ("u1", "A", "play", "2024-01-04 10:00:00", 500),
    ("u1", "D", "impression", "2024-01-04 11:00:00", 0),
    ("u2", "A", "play", "2024-01-02 12:00:00", 100),
    ("u2", "B", "play", "2024-01-03 12:00:00", 100),
    ("u2", "D", "play", "2024-01-04 12:00:00", 100),
    ("u2", "E", "complete", "2024-01-05 12:00:00", 100),
    ("u3", "A", "play", "2024-01-02 13:00:00", 100),
    ("u3", "B", "play", "2024-01-03 13:00:00", 100),
    ("u3", "C", "play", "2024-01-06 13:00:00", 100),
    ("u3", "D", "click", "2024-01-06 14:00:00", 0),
    ("u4", "A", "play", "2024-01-03 09:00:00", 100),
    ("u4", "C", "play", "2024-01-07 23:59:59", 100),
    ("u4", "Z", "play", "2024-01-05 09:00:00", 100),
    ("u6", "B", "play", "2024-01-04 08:00:00", 61),
    ("u6", "D", "play", "2024-01-04 09:00:00", 50),
    ("u6", "A", "complete", "2024-01-05 08:00:00", 60),
    ("u7", "A", "play", "2024-01-06 08:00:00", 100),
    ("u8", "B", "play", "2024-01-02 08:00:00", 100),
    ("u8", "D", "play", "2024-01-03 08:00:00", 100),
    ("u8", "E", "play", "2024-01-04 08:00:00", 100),
    *[("u9", x, "play", f"2024-01-05 0{h}:00:00", 1000) for h, x in enumerate("ABCDEF", 1)],
    # Dirt inside the window's partitions: dropped and counted.
    ("", "A", "play", "2024-01-03 00:00:00", 100),                     # empty user id
    ("  ", "B", "play", "2024-01-03 02:00:00", 100),                   # blank user id
    ("u1", None, "play", "2024-01-03 01:00:00", 100),                  # null item id
    ("u6", "C", "play", None, 100, "2024-01-03"),                      # null ts
    ("u2", "B", "rate", "2024-01-04 13:00:00", 100),                   # unknown event type
    ("u3", "E", "play", "2023-12-30 10:00:00", 100, "2024-01-02"),     # late event, before start
    ("u4", "F", "play", "2024-01-08 00:00:00", 100, "2024-01-07"),     # exactly at the end
    # Partitions outside the window: never read.
    ("u1", "E", "play", "2023-12-31 23:59:59", 100),
    ("u1", "F", "play", "2024-01-08 00:00:00", 100),
]
WINDOW_END = date(2024, 1, 8)
E2E_CFG = PipelineConfig(
    window_days=7,
    positive=PositiveRule(event_types=["play", "complete"], min_watch_seconds=60),
    filters=FilterConfig(min_user_positives=2, min_item_users=2, max_user_positives=4),
    split=SplitConfig(val_fraction=0.1, test_fraction=0.15, fold_in_fraction=0.5),
    quality=QualityConfig(max_dirty_fraction=0.25),
    spark=SPARK_CFG,
)


def snapshot_files(uri: str, name: str) -> list[str]:
    """The committed files of one table (interactions, users, items) of a snapshot: those
    of the commit pointer under ``<version>/<name>/``."""
    got = reader.open_committed(uri)
    assert got is not None, f"{uri} is not published"
    return [f for f in got.files if f.startswith(f"{got.base}/{name}/")]


def snapshot_table(uri: str, name: str) -> pa.Table:
    return ds.dataset(snapshot_files(uri, name), format="parquet").to_table()


def snapshot_tables(uri: str) -> dict[str, list[dict]]:
    out = {}
    for name, key in (("interactions", ["user_idx", "item_idx"]), ("users", ["user_idx"]),
                      ("items", ["item_idx"])):
        t = snapshot_table(uri, name)
        out[name] = t.sort_by([(k, "ascending") for k in key]).to_pylist()
    return out


def yaml_config(path: Path, cfg: PipelineConfig) -> str:
    path.write_text(yaml.safe_dump(cfg.model_dump(
        include={"window_days", "positive", "filters", "split", "quality", "spark"})))
    return str(path)


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    events = write_events(base / "events", E2E_LOG)
    manifest = bm.run(spark, E2E_CFG, events, WINDOW_END, str(base / "snapshots"))
    uri = snapshot_uri(str(base / "snapshots"), WINDOW_END)
    return {"base": base, "events": events, "manifest": manifest, "uri": uri,
            "tables": snapshot_tables(uri)}


def test_run_manifest(built):
    m = built["manifest"]
    assert m["schema_version"] == 1
    assert m["window"] == {"start": "2024-01-01", "end": "2024-01-08", "days": 7}
    assert m["input"] == {
        "events_uri": built["events"], "files": 7, "missing_days": [],
        "partitions": [f"2024-01-0{d}" for d in range(1, 8)],
    }
    assert m["config"]["window_days"] == 7
    assert m["config"]["filters"] == {
        "min_user_positives": 2, "min_item_users": 2, "max_user_positives": 4}
    assert m["config"]["quality"]["max_dirty_fraction"] == 0.25
    assert m["config"]["events"]["user_col"] == "user_id"
    assert m["counts"] == {
        "events_read": 36,  # 38 events, two in partitions outside the window
        "dropped_events": {"missing_user_id": 2, "missing_item_id": 1, "missing_ts": 1,
                           "unknown_event_type": 1, "ts_before_window": 1, "ts_after_window": 1},
        "dirty_fraction": 0.194444,  # 7 / 36
        "events_in_window": 29,
        "positive_events": 26,  # minus u1's impression, u3's click, u6's 50 s play
        "duplicate_positive_events": 1,  # u1 A
        "positive": {"pairs": 25, "users": 8, "items": 7},
        "after_user_cap": {"pairs": 19, "users": 7, "items": 6},
        "after_item_filter": {"pairs": 18, "users": 7, "items": 5},
        "after_user_filter": {"pairs": 17, "users": 6, "items": 5},
        "dropped_users": {"over_max_positives": 1, "under_min_positives": 1},
        "dropped_items": {"under_min_users": 1, "no_users_left": 0},
        "dropped_pairs": {"over_max_positives": 6, "under_min_item_users": 1,
                          "under_min_positives": 1},
        "splits": {
            "train": {"users": 3, "items": 3, "nnz": 7, "train": 7, "fold_in": 0, "held_out": 0},
            "val": {"users": 2, "items": 5, "nnz": 6, "train": 0, "fold_in": 4, "held_out": 2},
            "test": {"users": 1, "items": 4, "nnz": 4, "train": 0, "fold_in": 2, "held_out": 2},
        },
    }
    assert m["code_version"]["piarec"] == __import__("piarec").__version__
    assert set(m["code_version"]) == {"piarec", "git_commit"}
    assert datetime.fromisoformat(m["created_at"]).tzinfo is not None
    pointer = read_pointer(built["uri"])
    on_disk = pointer.manifest
    assert on_disk["counts"] == m["counts"] and on_disk["input"] == m["input"]
    assert on_disk["created_at"] == m["created_at"]
    assert committed_only(Path(built["uri"])) == pointer.version
    assert {f["path"].split("/")[2] for f in pointer.files} == {"interactions", "users", "items"}


def test_run_files(built):
    t = built["tables"]
    assert [(r["item_idx"], r["item_id"], r["n_users"]) for r in t["items"]] == [
        (0, "A", 5), (1, "B", 5), (2, "C", 3), (3, "D", 2), (4, "E", 2)]
    assert [(r["user_idx"], r["user_id"], r["split"]) for r in t["users"]] == [
        (0, "u4", "train"), (1, "u8", "val"), (2, "u1", "train"), (3, "u3", "val"),
        (4, "u2", "test"), (5, "u6", "train")]
    assert [(r["user_idx"], r["item_idx"], r["part"]) for r in t["interactions"]] == [
        (0, 0, "train"), (0, 2, "train"),
        (1, 1, "held_out"), (1, 3, "fold_in"), (1, 4, "fold_in"),
        (2, 0, "train"), (2, 1, "train"), (2, 2, "train"),
        (3, 0, "fold_in"), (3, 1, "held_out"), (3, 2, "fold_in"),
        (4, 0, "fold_in"), (4, 1, "held_out"), (4, 3, "held_out"), (4, 4, "fold_in"),
        (5, 0, "train"), (5, 1, "train")]
    schema = snapshot_table(built["uri"], "interactions").schema
    assert schema.field("user_idx").type == pa.int32()
    assert schema.field("item_idx").type == pa.int32()
    assert len(snapshot_files(built["uri"], "items")) == 1


def test_load_snapshot(built):
    snap = load_snapshot(built["uri"])
    assert list(snap.item_ids) == ["A", "B", "C", "D", "E"]
    assert snap.item_popularity.tolist() == [5, 5, 3, 2, 2]
    assert list(snap.train_user_ids) == ["u4", "u1", "u6"]
    assert snap.train.n_cols == 5
    assert [snap.train.row(r).tolist() for r in range(3)] == [[0, 2], [0, 1, 2], [0, 1]]
    assert list(snap.val.user_ids) == ["u8", "u3"]
    assert [snap.val.fold_in.row(r).tolist() for r in range(2)] == [[3, 4], [0, 2]]
    assert [snap.val.held_out.row(r).tolist() for r in range(2)] == [[1], [1]]
    assert list(snap.test.user_ids) == ["u2"]
    assert snap.test.fold_in.row(0).tolist() == [0, 4]
    assert snap.test.held_out.row(0).tolist() == [1, 3]


def test_load_snapshot_refuses_unpublished_and_inconsistent(built, tmp_path):
    copy = tmp_path / "snap"
    shutil.copytree(built["uri"], copy)  # the pointer names its files relative to the partition
    assert load_snapshot(str(copy)).val.held_out.nnz == 2
    pointer = json.loads((copy / "_SUCCESS").read_text())
    pointer["manifest"]["counts"]["splits"]["val"]["held_out"] = 3
    (copy / "_SUCCESS").write_text(json.dumps(pointer))
    with pytest.raises(InputDataError, match="val held_out nnz: manifest 3, files 2"):
        load_snapshot(str(copy))
    (copy / "_SUCCESS").unlink()
    with pytest.raises(InputDataError, match="not published"):
        load_snapshot(str(copy))


def test_cli_rerun_replaces_snapshot_identically(built, tmp_path, capsys):
    """A rerun (through the CLI) replaces the published snapshot with identical content;
    the earlier version stays readable for ``storage.retain_versions_s`` (default 1 h)."""
    final = Path(built["uri"])
    first_version = read_pointer(str(final)).version
    (final / "stale-marker").write_text("from the old run")
    config = yaml_config(tmp_path / "cfg.yaml", E2E_CFG)
    code = bm.main(["--events", built["events"], "--window-end", "2024-01-08",
                    "--out", str(built["base"] / "snapshots"), "--config", config])
    out = capsys.readouterr().out.strip()
    assert code == 0
    assert out == (f"snapshot {final}: window [2024-01-01, 2024-01-08), 6 users "
                   "(train 3, val 2, test 1), 5 items, 17 interactions")
    assert not (final / "stale-marker").exists()
    pointer = read_pointer(str(final))
    assert pointer.version != first_version
    assert [r["version"] for r in pointer.retired] == [first_version]
    # Nothing left over from the replacement: the pointer, the new version and the retained one.
    assert sorted(p.name for p in final.iterdir()) == ["_SUCCESS", "_versions"]
    assert sorted(p.name for p in (final / "_versions").iterdir()) == sorted([first_version, pointer.version])
    assert sorted(p.name for p in final.parent.iterdir()) == ["window_end=2024-01-08"]
    assert all(f["path"].startswith(f"_versions/{pointer.version}/") for f in pointer.files)
    assert snapshot_tables(str(final)) == built["tables"]
    again = pointer.manifest
    first = dict(built["manifest"])
    first.pop("uri")
    assert {k: v for k, v in again.items() if k != "created_at"} == {
        k: v for k, v in first.items() if k != "created_at"}


def test_cli_usage_and_one_line_errors(built, tmp_path, capsys):
    config = yaml_config(tmp_path / "cfg.yaml", E2E_CFG)
    code = bm.main(["--events", str(tmp_path / "missing"), "--window-end", "2024-01-08",
                    "--out", str(tmp_path / "out"), "--config", config])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("build_matrix: error: events path") and "\n" not in err
    for argv in (["--daily", "--window-end", "2024-01-08"], ["--date", "2024-01-08"], []):
        with pytest.raises(SystemExit) as exit_:
            bm.main(argv)
        assert exit_.value.code == 2
    assert "give --window-end" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input: no snapshot
def assert_refused(spark, cfg, events, tmp_path, match, window_end=WINDOW_END, error=InputDataError):
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as err:
        bm.run(spark, cfg, events, window_end, str(out))
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())  # nothing published, nothing left over
    return str(err.value)


def test_run_empty_window_raises(built, spark, tmp_path):
    assert_refused(spark, E2E_CFG, built["events"], tmp_path,
                   r"no events in the window \[2025-01-01, 2025-01-08\) under .*: no dt "
                   r"partition in it \(the dataset has dt 2023-12-31 .. 2024-01-08\)",
                   window_end=date(2025, 1, 8))
    # Partitions in the window, but every event in them is dirt.
    path = write_events(tmp_path / "ev", [("u1", "a", "play", "2024-01-09 00:00:00", 100,
                                           "2024-01-07")])
    lax = E2E_CFG.model_copy(update={"quality": QualityConfig(max_dirty_fraction=1.0)})
    assert_refused(spark, lax, path, tmp_path, r"no events in the window .*1 events read from "
                   r"its 1 dt partition\(s\), all dropped")


def test_run_no_positives_or_nothing_after_filters_raises(built, spark, tmp_path):
    strict = E2E_CFG.model_copy(update={"filters": FilterConfig(min_user_positives=10)})
    assert_refused(spark, strict, built["events"], tmp_path,
                   r"no interactions left after filters .* \(25 positive pairs of 8 users before\)")
    none = E2E_CFG.model_copy(update={"positive": PositiveRule(min_watch_seconds=100_000)})
    assert_refused(spark, none, built["events"], tmp_path, "no positive events in the window")


def test_run_too_dirty_raises(built, spark, tmp_path):
    default_quality = E2E_CFG.model_copy(update={"quality": QualityConfig()})
    msg = assert_refused(spark, default_quality, built["events"], tmp_path,
                         r"19.44% of the 36 events read in the window \[2024-01-01, 2024-01-08\) "
                         r"are dirty \(missing_user_id 2, ")
    assert msg.endswith("above quality.max_dirty_fraction = 1.00%")


def test_run_corrupt_file_raises(built, spark, tmp_path):
    events = tmp_path / "events"
    shutil.copytree(built["events"], events)
    victim = next((events / "dt=2024-01-05").glob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: no footer
    msg = assert_refused(spark, E2E_CFG, str(events), tmp_path, "cannot read events under")
    assert victim.name in msg and "Parquet" in msg


def test_run_mistyped_column_and_unknown_positive_type_raise(spark, tmp_path):
    table = pa.table({"user_id": ["u1"], "item_id": ["a"], "event_type": ["play"],
                      "ts": ["2024-01-03 10:00:00"], "watch_seconds": [100], "dt": ["2024-01-03"]})
    pq.write_to_dataset(table, str(tmp_path / "ev"), partition_cols=["dt"])
    assert_refused(spark, E2E_CFG, str(tmp_path / "ev"), tmp_path,
                   "'ts' \\(for ts\\) must be a timestamp, found string")
    odd = E2E_CFG.model_copy(update={"positive": PositiveRule(event_types=["play", "binge"])})
    assert_refused(spark, odd, str(tmp_path / "ev"), tmp_path, r"\['binge'\] which are not in "
                   "quality.known_event_types", error=ConfigError)


# ------------------------------------------------------------------ spark-submit
def test_spark_submit_runs_the_job(built, tmp_path):
    """The same file runs under ``spark-submit`` from a checkout, as a separate process."""
    config = yaml_config(tmp_path / "cfg.yaml", E2E_CFG)
    out = tmp_path / "snapshots"
    spark_submit = Path(sys.executable).with_name("spark-submit")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_"))}
    env["PYSPARK_PYTHON"] = sys.executable
    proc = subprocess.run(
        [str(spark_submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         str(REPO / "pipelines" / "build_matrix.py"), "--events", built["events"],
         "--window-end", "2024-01-08", "--out", str(out), "--config", config],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = snapshot_uri(str(out), WINDOW_END)
    assert proc.stdout.strip().splitlines()[-1].startswith(f"snapshot {final}: ")
    assert snapshot_tables(final) == built["tables"]
    manifest = read_pointer(final).manifest
    assert manifest["counts"] == built["manifest"]["counts"]
    committed_only(Path(final))
