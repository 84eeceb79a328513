"""Weekly snapshot job and shared event transforms, on tiny hand-made logs with known answers.

Expected rows are written out literally, derived by hand from the inputs. Where a salted
hash decides (splits, fold-in/held-out), the hash values are quoted in comments: they are
``int(sha256("\\x1f".join([salt, *values])).hexdigest()[:13], 16) / 2**52`` and pinned here
on purpose, because a user's split must not drift from one week to the next.
"""

from __future__ import annotations

import json
import shutil
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
    ScoringConfig,
    SparkConfig,
    SplitConfig,
)
from piarec.errors import InputDataError
from piarec.snapshot import load_snapshot, snapshot_uri

pyspark = pytest.importorskip("pyspark")
from pyspark.sql import functions as F  # noqa: E402

from pipelines import build_matrix as bm  # noqa: E402
from pipelines.events import (  # noqa: E402
    daily_histories,
    in_window,
    positive_pairs,
    read_events,
    seen_pairs,
)
from pipelines.spark import get_spark  # noqa: E402

SPARK_CFG = SparkConfig(
    master="local[2]", app_name="piarec-tests", shuffle_partitions=2, driver_memory="1g"
)
PAIRS = "user_id string, item_id string"


@pytest.fixture(scope="session")
def spark():
    session = get_spark(SPARK_CFG)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def write_events(root: Path, rows: list[tuple]) -> str:
    """rows: (user, item, type, 'YYYY-MM-DD HH:MM:SS', watch[, dt]); dt defaults to ts's day."""
    ts = [datetime.fromisoformat(r[3]).replace(tzinfo=timezone.utc) for r in rows]
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


# ------------------------------------------------------------------ environment
def test_get_spark_settings(spark):
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    assert spark.conf.get("spark.sql.shuffle.partitions") == "2"
    assert spark.conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert spark.sparkContext.getConf().get("spark.ui.enabled") == "false"
    assert get_spark(SPARK_CFG) is spark  # getOrCreate: the active session comes back


def test_python_udf_runs(spark):
    """mapInArrow works: guards against the pyspark / pyspark-client clash in notes.md."""

    def double(batches):
        for b in batches:
            xs = b.column("x").to_pylist()
            yield pa.RecordBatch.from_pydict({"x": xs, "y": [2 * v for v in xs]})

    out = spark.createDataFrame([(1,), (2,), (5,)], "x long").mapInArrow(double, "x long, y long")
    assert rows(out) == [(1, 2), (2, 4), (5, 10)]


# ------------------------------------------------------------------ read_events / in_window
def test_read_events_renames_casts_and_prunes(spark, tmp_path):
    table = pa.table({
        "account": pa.array([7, 8, 9, 10], pa.int64()),
        "title": ["t1", "t2", "t3", "t4"],
        "kind": ["play", "click", "play", "play"],
        "when": pa.array([datetime(2024, 1, d, 12, tzinfo=timezone.utc) for d in (1, 2, 3, 4)],
                         pa.timestamp("us", tz="UTC")),
        "secs": pa.array([100, 0, 30, 90], pa.int64()),
        "dt": ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"],
    })
    pq.write_to_dataset(table, str(tmp_path / "ev"), partition_cols=["dt"])
    schema = EventsSchema(user_col="account", item_col="title", type_col="kind", ts_col="when",
                          watch_col="secs")
    df = read_events(spark, str(tmp_path / "ev"), schema, date(2024, 1, 2), date(2024, 1, 4))

    assert df.dtypes == [("user_id", "string"), ("item_id", "string"), ("event_type", "string"),
                         ("ts", "timestamp"), ("watch_seconds", "int")]
    as_text = df.withColumn("ts", F.date_format("ts", "yyyy-MM-dd'T'HH:mm:ss"))
    got = sorted(tuple(r) for r in as_text.collect())
    assert got == [("8", "t2", "click", "2024-01-02T12:00:00", 0),
                   ("9", "t3", "play", "2024-01-03T12:00:00", 30)]
    # Pruning: the filter is a partition filter and the scan opened two of four partitions.
    df.collect()  # run this very plan so its scan metrics are filled
    plan = df._jdf.queryExecution().executedPlan()
    assert "PartitionFilters: [isnotnull(dt" in plan.toString()
    leaves = plan.collectLeaves()
    scans = [leaves.apply(i) for i in range(leaves.size())
             if leaves.apply(i).getClass().getSimpleName() == "FileSourceScanExec"]
    assert len(scans) == 1
    assert scans[0].metrics().apply("numPartitions").value() == 2
    assert scans[0].metrics().apply("numFiles").value() == 2


def test_read_events_missing_columns_are_named(spark, tmp_path):
    path = write_events(tmp_path / "ev", [("u1", "a", "play", "2024-01-01 00:00:00", 100)])
    schema = EventsSchema(user_col="account", watch_col="watched")
    with pytest.raises(InputDataError) as err:
        read_events(spark, path, schema, date(2024, 1, 1), date(2024, 1, 2))
    msg = str(err.value)
    assert "'account'" in msg and "'watched'" in msg and "'item_id'" not in msg
    assert "columns found: user_id, item_id, event_type, ts, watch_seconds, dt" in msg
    assert "\n" not in msg


def test_read_events_missing_path(spark, tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_events(spark, str(tmp_path / "nope"), EventsSchema(), date(2024, 1, 1),
                    date(2024, 1, 2))


def test_in_window_edges(spark, tmp_path):
    path = write_events(tmp_path / "ev", [
        ("u1", "a", "play", "2024-01-02 00:00:00", 100),                  # exactly at start: kept
        ("u2", "b", "play", "2024-01-03 23:59:59", 100),                  # last second: kept
        ("u3", "c", "play", "2024-01-04 00:00:00", 100, "2024-01-03"),    # exactly at end: dropped
        ("u4", "d", "play", "2024-01-01 23:00:00", 100, "2024-01-02"),    # before start: dropped
        ("u5", "e", "play", "2024-01-01 12:00:00", 100),                  # dt outside: not read
        ("", "f", "play", "2024-01-02 10:00:00", 100),                    # empty user id: dropped
        ("u7", None, "play", "2024-01-02 10:00:00", 100),                 # null item id: dropped
    ])
    raw = read_events(spark, path, EventsSchema(), date(2024, 1, 2), date(2024, 1, 4))
    assert raw.count() == 6  # everything in dt 2024-01-02 and 2024-01-03
    kept = in_window(raw, date(2024, 1, 2), datetime(2024, 1, 4, tzinfo=timezone.utc))
    assert rows(kept, "user_id", "item_id") == [("u1", "a"), ("u2", "b")]


# ------------------------------------------------------------------ positives / seen
EVENTS = "user_id string, item_id string, event_type string, ts timestamp, watch_seconds int"
T0 = datetime(2024, 1, 1, 12)


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


# ------------------------------------------------------------------ filters and indices
def test_filters_items_then_users(spark):
    pairs = spark.createDataFrame([
        ("u1", "a"), ("u1", "b"), ("u1", "x"),
        ("u2", "a"), ("u2", "b"),
        ("u3", "a"), ("u3", "y"),
        ("u4", "a"), ("u4", "b"), ("u4", "c"), ("u4", "d"),
        ("u5", "c"), ("u5", "d"),
    ], PAIRS)
    # Items with >= 2 users: a(4) b(3) c(2) d(2); x and y (one user each) go.
    items = bm.filter_items(pairs, 2)
    assert rows(items) == [
        ("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a"),
        ("u4", "a"), ("u4", "b"), ("u4", "c"), ("u4", "d"), ("u5", "c"), ("u5", "d")]
    # Then users with 2..3 positives: u1(2) u2(2) u5(2) stay; u3 (1 left) and u4 (4) go.
    # One pass: c and d are left with one user (u5) each and stay.
    assert rows(bm.filter_users(items, 2, 3)) == [
        ("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u5", "c"), ("u5", "d")]
    assert rows(bm.filter_users(pairs, 1, None)) == rows(pairs)


def test_index_items_by_popularity_then_id(spark):
    pairs = spark.createDataFrame([
        ("u1", "c"), ("u2", "c"), ("u1", "a"), ("u2", "a"), ("u3", "a"),
        ("u1", "d"), ("u3", "b"), ("u4", "b"),
    ], PAIRS)
    items = bm.index_items(pairs)
    assert items.dtypes == [("item_idx", "int"), ("item_id", "string"), ("n_users", "int")]
    assert rows(items) == [(0, "a", 3), (1, "b", 2), (2, "c", 2), (3, "d", 1)]


def test_index_users_dense_across_partitions(spark):
    ids = [f"u{n:02d}" for n in range(40)]
    scrambled = ids[2::3][::-1] + ids[::3] + ids[1::3] + ids[4::3]  # all ids, some twice, unordered
    pairs = spark.createDataFrame([(u, "a") for u in scrambled], PAIRS).repartition(4)
    old = spark.conf.get("spark.sql.adaptive.coalescePartitions.enabled")
    spark.conf.set("spark.sql.shuffle.partitions", "4")  # a real multi-partition sort
    spark.conf.set("spark.sql.adaptive.coalescePartitions.enabled", "false")
    try:
        users = bm.index_users(pairs)
        got = rows(users)
        # The global sort inside index_users really spreads the ids over several partitions.
        n_parts = pairs.select("user_id").distinct().orderBy("user_id").rdd.getNumPartitions()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "2")
        spark.conf.set("spark.sql.adaptive.coalescePartitions.enabled", old)
    assert users.dtypes == [("user_idx", "int"), ("user_id", "string")]
    assert got == [(n, f"u{n:02d}") for n in range(40)]
    assert n_parts > 1


def test_unit_hash_is_sha256(spark):
    df = spark.createDataFrame([("u1", "A"), ("u3", "C")], PAIRS)
    got = rows(df.select("user_id", bm.unit_hash("piarec-split-v1", "user_id").alias("u"),
                         bm.unit_hash("piarec-split-v1", "user_id", "item_id").alias("v")))
    assert got[0][0] == "u1" and got[0][1] == pytest.approx(0.4836, abs=1e-4)
    assert got[1][0] == "u3" and got[1][1] == pytest.approx(0.0910, abs=1e-4)
    assert got[1][2] == pytest.approx(0.0600, abs=1e-4)
    assert all(0.0 <= r[1] < 1.0 for r in got)


def test_assign_split(spark):
    # u(user): g .0204, u8 .0347, u3 .0910, a .1596, carol .1624, u2 .2021, u5 .2492,
    #          d .2571, u1 .4836, u6 .9336
    ids = ["g", "u8", "u3", "a", "carol", "u2", "u5", "d", "u1", "u6"]
    users = spark.createDataFrame(list(enumerate(ids)), "user_idx int, user_id string")
    cfg = SplitConfig(val_fraction=0.1, test_fraction=0.15)
    assert rows(bm.assign_split(users, cfg), "user_id", "split") == [
        ("a", "test"), ("carol", "test"), ("d", "train"), ("g", "val"), ("u1", "train"),
        ("u2", "test"), ("u3", "val"), ("u5", "test"), ("u6", "train"), ("u8", "val")]
    none_held = SplitConfig(val_fraction=0.0, test_fraction=0.0)
    assert {r.split for r in bm.assign_split(users, none_held).collect()} == {"train"}


def test_assign_parts(spark):
    # u(user, item) order -- p: d .1671 < b .2051 < a .4939 < e .5200 < c .7504;
    # q: b .2120 < a .5310; s: i4 < i0 < i6 < i5 < i1 < i3 < i2 < i9 < i7 < i8.
    df = spark.createDataFrame(
        [("p", x, "val") for x in "abcde"] + [("q", x, "test") for x in "ab"]
        + [("r", "a", "val")] + [("t", x, "train") for x in "xy"],
        "user_id string, item_id string, split string")
    got = rows(bm.assign_parts(df, SplitConfig(fold_in_fraction=0.8)), "user_id", "item_id", "part")
    assert got == [
        # n=5: ceil(0.8*5)=4 fold_in, the last by hash (c) held out
        ("p", "a", "fold_in"), ("p", "b", "fold_in"), ("p", "c", "held_out"),
        ("p", "d", "fold_in"), ("p", "e", "fold_in"),
        # n=2: ceil(1.6)=2 is capped at n-1=1 so something is left to predict
        ("q", "a", "held_out"), ("q", "b", "fold_in"),
        ("r", "a", "fold_in"),  # n=1: nothing to hold out
        ("t", "x", "train"), ("t", "y", "train"),
    ]
    # Float noise: 0.7 * 10 = 7.000000000000001 must still mean 7 fold-in items.
    s = spark.createDataFrame([("s", f"i{j}", "test") for j in range(10)],
                              "user_id string, item_id string, split string")
    held = rows(bm.assign_parts(s, SplitConfig(fold_in_fraction=0.7)).filter("part = 'held_out'"),
                "item_id")
    assert held == [("i7",), ("i8",), ("i9",)]


# ------------------------------------------------------------------ daily histories
def test_daily_histories(spark, tmp_path):
    path = write_events(tmp_path / "ev", [
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
    ])
    cfg = PipelineConfig(
        positive=PositiveRule(event_types=["play", "complete"], min_watch_seconds=60),
        scoring=ScoringConfig(history_days=3, seen_types=["play", "complete"]),
    )
    got = daily_histories(spark, path, cfg, date(2024, 3, 10))
    assert got.dtypes == [
        ("user_id", "string"), ("history", "array<string>"), ("seen", "array<string>")]
    assert sorted((r.user_id, r.history, r.seen) for r in got.collect()) == [
        ("a", ["i1"], ["i1", "i2"]),
        ("b", [], []),
        ("d", ["i1", "i2"], ["i1", "i2"]),
    ]


# ------------------------------------------------------------------ the job end to end
# Window [2024-01-01, 2024-01-08). Positives per user (play/complete, >= 60 s):
#   u1 A B C (A twice) | u2 A B D E | u3 A B C | u4 A C Z | u6 B A (D watched 50 s)
#   u7 A | u9 A B C D E F
# Items with >= 2 users: F (u9) and Z (u4) go -> u9 keeps 5, u4 keeps 2.
# Users with 2..4 positives: u7 (1) and u9 (5) go. Left: 14 pairs, 5 users, 5 items:
#   A 5 users, B 4, C 3, D 1, E 1  ->  item_idx A0 B1 C2 D3 E4
#   user_idx u1 0, u2 1, u3 2, u4 3, u6 4
# Splits (val < .10 <= test < .25): u3 .0910 val, u2 .2021 test, u1 .4836 / u4 .5470 /
#   u6 .9336 train. fold_in_fraction 0.5:
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
    *[("u9", x, "play", f"2024-01-05 0{h}:00:00", 1000) for h, x in enumerate("ABCDEF", 1)],
    ("", "A", "play", "2024-01-03 00:00:00", 100),                     # empty user id
    ("u1", None, "play", "2024-01-03 01:00:00", 100),                  # null item id
    ("u3", "E", "play", "2023-12-30 10:00:00", 100, "2024-01-02"),     # late event, before start
    ("u4", "F", "play", "2024-01-08 00:00:00", 100, "2024-01-07"),     # exactly at the end
    ("u1", "E", "play", "2023-12-31 23:59:59", 100),                   # partition before window
    ("u1", "F", "play", "2024-01-08 00:00:00", 100),                   # partition after window
]
WINDOW_END = date(2024, 1, 8)
E2E_CFG = PipelineConfig(
    window_days=7,
    positive=PositiveRule(event_types=["play", "complete"], min_watch_seconds=60),
    filters=FilterConfig(min_user_positives=2, min_item_users=2, max_user_positives=4),
    split=SplitConfig(val_fraction=0.1, test_fraction=0.15, fold_in_fraction=0.5),
    spark=SPARK_CFG,
)


def snapshot_tables(uri: str) -> dict[str, list[dict]]:
    out = {}
    for name, key in (("interactions", ["user_idx", "item_idx"]), ("users", ["user_idx"]),
                      ("items", ["item_idx"])):
        t = ds.dataset(f"{uri}/{name}", format="parquet").to_table()
        out[name] = t.sort_by([(k, "ascending") for k in key]).to_pylist()
    return out


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    events = write_events(base / "events", E2E_LOG)
    manifest = bm.run(spark, E2E_CFG, events, WINDOW_END, str(base / "snapshots"))
    uri = snapshot_uri(str(base / "snapshots"), WINDOW_END)
    return {"base": base, "events": events, "manifest": manifest, "uri": uri,
            "tables": snapshot_tables(uri)}


def test_run_manifest_counts(built):
    m = built["manifest"]
    assert m["schema_version"] == 1
    assert m["window"] == {"start": "2024-01-01", "end": "2024-01-08"}
    assert m["config"]["window_days"] == 7
    assert m["config"]["filters"] == {
        "min_user_positives": 2, "min_item_users": 2, "max_user_positives": 4}
    assert m["config"]["events"]["user_col"] == "user_id"
    c = m["counts"]
    assert c["events_read"] == 30  # 32 events, two in partitions outside the window
    assert c["events_in_window"] == 26  # minus empty user, null item, late, at-the-end
    assert c["positive"] == {"pairs": 22, "users": 7, "items": 7}
    assert c["after_item_filter"] == {"pairs": 20, "users": 7, "items": 5}
    assert c["after_user_filter"] == {"pairs": 14, "users": 5, "items": 5}
    assert c["splits"] == {
        "train": {"users": 3, "items": 3, "nnz": 7, "train": 7, "fold_in": 0, "held_out": 0},
        "val": {"users": 1, "items": 3, "nnz": 3, "train": 0, "fold_in": 2, "held_out": 1},
        "test": {"users": 1, "items": 4, "nnz": 4, "train": 0, "fold_in": 2, "held_out": 2},
    }
    assert datetime.fromisoformat(m["created_at"]).tzinfo is not None
    on_disk = json.loads((Path(built["uri"]) / "manifest.json").read_text())
    assert on_disk["counts"] == c
    assert (Path(built["uri"]) / "_SUCCESS").exists()


def test_run_files(built):
    t = built["tables"]
    assert [(r["item_idx"], r["item_id"], r["n_users"]) for r in t["items"]] == [
        (0, "A", 5), (1, "B", 4), (2, "C", 3), (3, "D", 1), (4, "E", 1)]
    assert [(r["user_idx"], r["user_id"], r["split"]) for r in t["users"]] == [
        (0, "u1", "train"), (1, "u2", "test"), (2, "u3", "val"), (3, "u4", "train"),
        (4, "u6", "train")]
    assert [(r["user_idx"], r["item_idx"], r["part"]) for r in t["interactions"]] == [
        (0, 0, "train"), (0, 1, "train"), (0, 2, "train"),
        (1, 0, "fold_in"), (1, 1, "held_out"), (1, 3, "held_out"), (1, 4, "fold_in"),
        (2, 0, "fold_in"), (2, 1, "held_out"), (2, 2, "fold_in"),
        (3, 0, "train"), (3, 2, "train"),
        (4, 0, "train"), (4, 1, "train")]
    schema = ds.dataset(f"{built['uri']}/interactions", format="parquet").schema
    assert schema.field("user_idx").type == pa.int32()
    assert schema.field("item_idx").type == pa.int32()


def test_load_snapshot(built):
    snap = load_snapshot(built["uri"])
    assert list(snap.item_ids) == ["A", "B", "C", "D", "E"]
    assert snap.item_popularity.tolist() == [5, 4, 3, 1, 1]
    assert list(snap.train_user_ids) == ["u1", "u4", "u6"]
    assert snap.train.n_cols == 5
    assert [snap.train.row(r).tolist() for r in range(3)] == [[0, 1, 2], [0, 2], [0, 1]]
    assert list(snap.val.user_ids) == ["u3"]
    assert snap.val.fold_in.row(0).tolist() == [0, 2] and snap.val.held_out.row(0).tolist() == [1]
    assert list(snap.test.user_ids) == ["u2"]
    assert snap.test.fold_in.row(0).tolist() == [0, 4]
    assert snap.test.held_out.row(0).tolist() == [1, 3]
    assert snap.manifest["counts"]["after_user_filter"]["pairs"] == 14


def test_load_snapshot_refuses_unpublished_and_inconsistent(built, tmp_path):
    copy = tmp_path / "snap"
    shutil.copytree(built["uri"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["counts"]["splits"]["val"]["held_out"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputDataError, match="val held_out nnz: manifest 2, files 1"):
        load_snapshot(str(copy))
    (copy / "_SUCCESS").unlink()
    with pytest.raises(InputDataError, match="not published"):
        load_snapshot(str(copy))


def test_cli_rerun_replaces_snapshot_identically(built, tmp_path, capsys):
    """A rerun (through the CLI) replaces the published snapshot with identical content."""
    final = Path(built["uri"])
    (final / "stale-marker").write_text("from the old run")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(E2E_CFG.model_dump(
        include={"window_days", "positive", "filters", "split", "spark"})))
    code = bm.main(["--events", built["events"], "--window-end", "2024-01-08",
                    "--out", str(built["base"] / "snapshots"), "--config", str(config)])
    out = capsys.readouterr().out.strip()
    assert code == 0
    assert out.startswith(f"snapshot {final}:")
    assert "5 users (train 3, val 1, test 1), 5 items, 14 interactions" in out
    assert not (final / "stale-marker").exists()
    assert (final / "_SUCCESS").exists()
    # Nothing left over from the replacement (_tmp-* / _old-* siblings).
    assert sorted(p.name for p in final.parent.iterdir()) == ["window_end=2024-01-08"]
    assert snapshot_tables(str(final)) == built["tables"]
    again = json.loads((final / "manifest.json").read_text())
    first = dict(built["manifest"])
    first.pop("uri")
    assert {k: v for k, v in again.items() if k != "created_at"} == {
        k: v for k, v in first.items() if k != "created_at"}


def test_cli_reports_one_line_error(built, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"spark": E2E_CFG.spark.model_dump()}))
    code = bm.main(["--events", str(tmp_path / "missing"), "--window-end", "2024-01-08",
                    "--out", str(tmp_path / "out"), "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("build_matrix: error: events path") and "\n" not in err


def test_run_empty_window_raises(built, spark, tmp_path):
    with pytest.raises(InputDataError, match=r"no events in the window \[2025-01-01, 2025-01-08\)"):
        bm.run(spark, E2E_CFG, built["events"], date(2025, 1, 8), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_run_nothing_left_after_filters_raises(built, spark, tmp_path):
    cfg = E2E_CFG.model_copy(update={"filters": FilterConfig(min_user_positives=10)})
    with pytest.raises(InputDataError, match="no interactions left after filters"):
        bm.run(spark, cfg, built["events"], WINDOW_END, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

