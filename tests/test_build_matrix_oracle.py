"""Property test: random small event logs through the Spark jobs equal a plain pandas oracle.

Each seed draws a messy log (duplicates, null / empty / blank ids, unknown and null event
types, null timestamps, events whose ``ts`` falls outside the window inside an in-window
``dt`` partition, partitions outside the window, non-ASCII and space-led ids, a bot) and a
configuration (positive rule, filters, fold-in fraction). The oracle below re-derives
everything from the written-down rules with pandas and the standard library -- the
salted SHA-256 split hash and ``zlib.crc32`` user order included -- and must match the
published snapshot (rows, indices, splits, parts, manifest counts) and the daily histories.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from piarec.config import (
    FilterConfig,
    PipelineConfig,
    PositiveRule,
    QualityConfig,
    ScoringConfig,
    SparkConfig,
    SplitConfig,
)
from piarec.data import reader
from piarec.data.commit import read_pointer
from piarec.data.layout import histories_uri, snapshot_uri

pytest.importorskip("pyspark")
from pipelines import build_matrix as bm  # noqa: E402
from pipelines.spark import get_spark  # noqa: E402

SEEDS = range(5)
WINDOW_END = date(2024, 2, 10)
WINDOW_DAYS = 6
KNOWN = ["impression", "click", "play", "complete"]
REASONS = ["missing_user_id", "missing_item_id", "missing_ts", "unknown_event_type",
           "ts_before_window", "ts_after_window"]


@pytest.fixture(scope="session")
def spark():
    session = get_spark(SparkConfig(master="local[2]", app_name="piarec-tests",
                                    shuffle_partitions=2, driver_memory="1g"))
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# ------------------------------------------------------------------ random logs
def random_log(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(250, 450))
    users = [f"u{k}" for k in range(30)] + ["ü1", "é2", " sp", "bot"]
    user_p = np.r_[np.ones(30), 1, 1, 1, 6.0]
    user = rng.choice(users, n, p=user_p / user_p.sum()).astype(object)
    item = rng.choice([f"i{k}" for k in range(22)], n).astype(object)
    etype = rng.choice(KNOWN + ["play", "complete", "rate"], n).astype(object)
    watch = rng.integers(0, 200, n).astype(object)
    start = datetime(2024, 2, 4, tzinfo=timezone.utc)
    secs = rng.integers(-2 * 86_400, (WINDOW_DAYS + 2) * 86_400, n)
    ts = np.array([start + timedelta(seconds=int(s)) for s in secs], dtype=object)
    dt = np.array([t.date() for t in ts], dtype=object)
    # Dirt and edge cases.
    dirt = rng.random((6, n)) < np.array([[0.03], [0.03], [0.02], [0.02], [0.02], [0.05]])
    user[dirt[0]] = rng.choice(np.array([None, "", "  "], dtype=object), dirt[0].sum())
    item[dirt[1]] = rng.choice(np.array([None, ""], dtype=object), dirt[1].sum())
    etype[dirt[2]] = None
    watch[dirt[3]] = None
    no_ts = dirt[4]
    ts[no_ts] = None
    shift = dirt[5]  # partition and ts disagree by a day
    dt[shift] = [d + timedelta(days=int(rng.choice([-1, 1]))) for d in dt[shift]]
    # The bot watches everything.
    bot = pd.DataFrame({"user_id": "bot", "item_id": [f"i{k}" for k in range(22)],
                        "event_type": "play", "ts": start + timedelta(days=1), "watch_seconds": 100,
                        "dt": (start + timedelta(days=1)).date()}, dtype=object)
    # dtype=object: plain Python values, None for missing (no NaN, no inferred dtypes).
    log = pd.DataFrame({"user_id": user, "item_id": item, "event_type": etype, "ts": ts,
                        "watch_seconds": watch, "dt": dt}, dtype=object)
    return pd.concat([log, bot], ignore_index=True)


def random_config(seed: int) -> PipelineConfig:
    rng = np.random.default_rng(1000 + seed)
    return PipelineConfig(
        window_days=WINDOW_DAYS,
        positive=PositiveRule(event_types=["play", "complete"],
                              min_watch_seconds=int(rng.choice([0, 60]))),
        filters=FilterConfig(min_user_positives=int(rng.integers(1, 4)),
                             min_item_users=int(rng.integers(1, 4)),
                             max_user_positives=[None, 12, 18][int(rng.integers(0, 3))]),
        split=SplitConfig(val_fraction=0.2, test_fraction=0.2,
                          fold_in_fraction=float(rng.choice([0.5, 0.8]))),
        quality=QualityConfig(max_dirty_fraction=1.0, known_event_types=KNOWN),
        scoring=ScoringConfig(history_days=3, seen_types=["play", "complete"]),
    )


def write_log(log: pd.DataFrame, root: Path) -> str:
    table = pa.table({
        "user_id": pa.array(log.user_id.tolist(), pa.string()),
        "item_id": pa.array(log.item_id.tolist(), pa.string()),
        "event_type": pa.array(log.event_type.tolist(), pa.string()),
        "ts": pa.array(log.ts.tolist(), pa.timestamp("us", tz="UTC")),
        "watch_seconds": pa.array([None if w is None else int(w) for w in log.watch_seconds],
                                  pa.int32()),
        "dt": [d.isoformat() for d in log.dt],
    })
    pq.write_to_dataset(table, str(root), partition_cols=["dt"])
    return str(root)


# ------------------------------------------------------------------ the oracle
def unit_hash(salt: str, *values: str) -> float:
    return int(hashlib.sha256("\x1f".join([salt, *values]).encode()).hexdigest()[:13], 16) / 2**52


def blank(x) -> bool:
    return x is None or x.strip(" ") == ""  # Spark's trim removes spaces only


def clean(log: pd.DataFrame, start: date, end: date) -> tuple[pd.DataFrame, dict[str, int]]:
    """Events of the dt partitions in [start, end), without dirt; dropped counts by reason."""
    read = log[(log.dt >= start) & (log.dt < end)]
    lo = datetime.combine(start, datetime.min.time(), timezone.utc)
    hi = datetime.combine(end, datetime.min.time(), timezone.utc)

    def reason(e) -> int:
        checks = [blank(e.user_id), blank(e.item_id), e.ts is None,
                  e.event_type is None or e.event_type not in KNOWN,
                  e.ts is not None and e.ts < lo, e.ts is not None and e.ts >= hi]
        return next((k + 1 for k, c in enumerate(checks) if c), 0)

    codes = read.apply(reason, axis=1) if len(read) else pd.Series([], dtype=int)
    dropped = {name: int((codes == k).sum()) for k, name in enumerate(REASONS, 1)}
    return read[codes == 0], {"events_read": len(read), **dropped}


def positive(events: pd.DataFrame, rule: PositiveRule) -> pd.Series:
    watch = events.watch_seconds.map(lambda w: 0 if w is None else int(w))
    ok = events.event_type.isin(rule.event_types)
    return ok & (watch >= rule.min_watch_seconds) if rule.min_watch_seconds else ok


def oracle_snapshot(log: pd.DataFrame, cfg: PipelineConfig) -> dict:
    start = WINDOW_END - timedelta(days=cfg.window_days)
    events, counts = clean(log, start, WINDOW_END)
    pos = events[positive(events, cfg.positive)]
    sets = {u: set(g.item_id) for u, g in pos.groupby("user_id")}
    f = cfg.filters

    def stage(s: dict[str, set]) -> dict[str, int]:
        return {"pairs": sum(map(len, s.values())), "users": sum(1 for v in s.values() if v),
                "items": len(set().union(*s.values())) if s else 0}

    capped = {u: v for u, v in sets.items() if f.max_user_positives is None
              or len(v) <= f.max_user_positives}
    users_per_item = pd.Series([i for v in capped.values() for i in v]).value_counts()
    kept = set(users_per_item[users_per_item >= f.min_item_users].index)
    filtered = {u: v & kept for u, v in capped.items()}
    final = {u: v for u, v in filtered.items() if len(v) >= f.min_user_positives}

    n_users = pd.Series([i for v in final.values() for i in v]).value_counts()
    items = sorted(n_users.items(), key=lambda kv: (-kv[1], kv[0]))
    item_idx = {i: k for k, (i, _) in enumerate(items)}
    order = sorted(final, key=lambda u: (zlib.crc32(u.encode()), u))
    s = cfg.split

    def split_of(u: str) -> str:
        h = unit_hash(s.salt, u)
        return "val" if h < s.val_fraction else "test" if h < s.val_fraction + s.test_fraction \
            else "train"

    users, inter = [], []
    for idx, u in enumerate(order):
        sp = split_of(u)
        users.append((idx, u, sp))
        if sp == "train":
            inter += [(idx, item_idx[i], "train") for i in final[u]]
            continue
        n = len(final[u])
        k = max(1, min(math.ceil(n * s.fold_in_fraction - 1e-9), n - 1))
        ranked = sorted(final[u], key=lambda i: (unit_hash(s.salt, u, i), i))
        inter += [(idx, item_idx[i], "fold_in" if r < k else "held_out")
                  for r, i in enumerate(ranked)]

    splits = {}
    for sp in ("train", "val", "test"):
        mine = [r for r in inter if users[r[0]][2] == sp]
        parts = {p: sum(1 for r in mine if r[2] == p) for p in ("train", "fold_in", "held_out")}
        splits[sp] = {"users": sum(1 for r in users if r[2] == sp),
                      "items": len({r[1] for r in mine}), "nnz": len(mine), **parts}

    st = [stage(x) for x in (sets, capped, filtered, final)]
    n_dropped = sum(counts[r] for r in REASONS)
    manifest_counts = {
        "events_read": counts["events_read"],
        "dropped_events": {r: counts[r] for r in REASONS},
        "dirty_fraction": round(n_dropped / counts["events_read"], 6),
        "events_in_window": counts["events_read"] - n_dropped,
        "positive_events": len(pos),
        "duplicate_positive_events": len(pos) - st[0]["pairs"],
        "positive": st[0], "after_user_cap": st[1], "after_item_filter": st[2],
        "after_user_filter": st[3],
        "dropped_users": {"over_max_positives": st[0]["users"] - st[1]["users"],
                          "under_min_positives": st[1]["users"] - st[3]["users"]},
        "dropped_items": {"under_min_users": st[1]["items"] - st[2]["items"],
                          "no_users_left": st[2]["items"] - st[3]["items"]},
        "dropped_pairs": {"over_max_positives": st[0]["pairs"] - st[1]["pairs"],
                          "under_min_item_users": st[1]["pairs"] - st[2]["pairs"],
                          "under_min_positives": st[2]["pairs"] - st[3]["pairs"]},
        "splits": splits,
    }
    return {
        "items": [(k, i, int(n)) for k, (i, n) in enumerate(items)],
        "users": users,
        "interactions": sorted(inter),
        "counts": manifest_counts,
    }


def oracle_histories(log: pd.DataFrame, cfg: PipelineConfig, day: date) -> dict:
    start, end = day - timedelta(days=cfg.scoring.history_days), day + timedelta(days=1)
    events, counts = clean(log, start, end)
    pos = events[positive(events, cfg.positive)]
    seen = events[events.event_type.isin(cfg.scoring.seen_types)]
    rows = sorted(
        (u, sorted(set(pos[pos.user_id == u].item_id)), sorted(set(seen[seen.user_id == u].item_id)))
        for u in set(events.user_id)
    )
    return {"rows": rows, "counts": counts, "positive_events": len(pos)}


# ------------------------------------------------------------------ the property
@pytest.mark.parametrize("seed", SEEDS)
def test_snapshot_and_histories_equal_the_oracle(spark, tmp_path, seed):
    log, cfg = random_log(seed), random_config(seed)
    events = write_log(log, tmp_path / "events")
    want = oracle_snapshot(log, cfg)
    assert want["counts"]["after_user_filter"]["pairs"] > 0  # the draw is a meaningful case

    manifest = bm.run(spark, cfg, events, WINDOW_END, str(tmp_path / "snapshots"))
    uri = snapshot_uri(str(tmp_path / "snapshots"), WINDOW_END)
    snap = reader.open_committed(uri)  # the files its commit pointer names, table by table
    got = {name: ds.dataset([f for f in snap.files if f.startswith(f"{snap.base}/{name}/")],
                            format="parquet").to_table().to_pylist()
           for name in ("items", "users", "interactions")}
    assert sorted((r["item_idx"], r["item_id"], r["n_users"]) for r in got["items"]) == want["items"]
    assert sorted((r["user_idx"], r["user_id"], r["split"]) for r in got["users"]) == want["users"]
    assert sorted((r["user_idx"], r["item_idx"], r["part"])
                  for r in got["interactions"]) == want["interactions"]
    assert manifest["counts"] == want["counts"]
    assert read_pointer(uri).manifest["counts"] == want["counts"]

    day = WINDOW_END - timedelta(days=1)
    daily = bm.run_daily(spark, cfg, events, day, str(tmp_path / "histories"))
    hist = oracle_histories(log, cfg, day)
    table = reader.read_table(histories_uri(str(tmp_path / "histories"), day))
    assert sorted((r["user_id"], r["history"], r["seen"]) for r in table.to_pylist()) == hist["rows"]
    c = daily["counts"]
    assert {k: c["dropped_events"][k] for k in REASONS} == {k: hist["counts"][k] for k in REASONS}
    assert (c["events_read"], c["users"], c["positive_events"]) == (
        hist["counts"]["events_read"], len(hist["rows"]), hist["positive_events"])
    on_disk = read_pointer(histories_uri(str(tmp_path / "histories"), day)).manifest
    assert on_disk["counts"] == c
