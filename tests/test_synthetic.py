"""Tests for the synthetic viewing-event generator (small sizes, a few seconds in all)."""

from __future__ import annotations

import datetime
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from piarec.data.synthetic import EVENT_TYPES, generate_events

USERS, ITEMS, DAYS = 2_000, 400, 30
START = datetime.date(2026, 3, 1)


def read(path: str) -> pa.Table:
    """All rows of a generated dataset (without the partition column), in a canonical order."""
    table = ds.dataset(path, format="parquet").to_table()
    keys = [(c, "ascending") for c in ("ts", "user_id", "item_id", "event_type", "watch_seconds")]
    return table.sort_by(keys)


def positives(table: pa.Table, users: int, items: int) -> np.ndarray:
    """bool[users, items]: the default positive rule (play/complete watched >= 60 s)."""
    mask = pc.and_(pc.is_in(table["event_type"], pa.array(["play", "complete"])),
                   pc.greater_equal(table["watch_seconds"], 60))
    pos = table.filter(mask)
    u = pc.cast(pc.utf8_slice_codeunits(pos["user_id"], 1), pa.int64()).to_numpy()
    i = pc.cast(pc.utf8_slice_codeunits(pos["item_id"], 1), pa.int64()).to_numpy()
    x = np.zeros((users, items), dtype=bool)
    x[u, i] = True
    return x


def recall_at_k(x: np.ndarray, *, n_test: int = 500, k: int = 20, seed: int = 0):
    """(co-occurrence, popularity) mean Recall@k on 20 % held-out titles of test users.

    ``x`` bool[users, items]. Test users are drawn among those with >= 5 positives; the
    rest of the matrix trains both recommenders; already-seen titles are never ranked.
    """
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(x.sum(1) >= 5)
    test = np.sort(rng.choice(eligible, min(n_test, len(eligible)), replace=False))
    train = x.astype(np.float32)
    held = np.zeros((len(test), x.shape[1]), dtype=bool)
    for row, u in enumerate(test):
        titles = np.flatnonzero(x[u])
        out = rng.choice(titles, max(1, round(0.2 * len(titles))), replace=False)
        train[u, out] = 0.0
        held[row, out] = True
    count = train.sum(0)
    co = train.T @ train
    np.fill_diagonal(co, 0.0)
    norm = np.sqrt(np.maximum(count, 1.0))
    cosine = co / norm[:, None] / norm[None, :]  # item-item cosine similarity

    def recall(scores: np.ndarray) -> float:
        scores = np.where(train[test] > 0, -np.inf, scores)
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        hits = np.take_along_axis(held, top, axis=1).sum(1)
        return float(np.mean(hits / np.minimum(k, held.sum(1))))

    return recall(train[test] @ cosine), recall(np.broadcast_to(count, held.shape))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("events") / "events")
    lines: list[str] = []
    summary = generate_events(out, users=USERS, items=ITEMS, days=DAYS, start=START, seed=7,
                              progress=lines.append)
    return out, summary, read(out), lines


def test_same_seed_same_data_other_seed_differs(tmp_path):
    kw = dict(users=300, items=100, days=10)
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_events(a, seed=1, **kw)
    generate_events(b, seed=1, **kw)
    generate_events(c, seed=2, **kw)
    assert read(a).equals(read(b))
    assert not read(a).equals(read(c))
    # Rerunning into an existing dataset replaces it rather than mixing in old files.
    generate_events(a, seed=2, **kw)
    assert read(a).equals(read(c))


def test_schema_types_and_values(dataset):
    out, _, table, _ = dataset
    expected = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                          ("event_type", pa.string()), ("ts", pa.timestamp("us", tz="UTC")),
                          ("watch_seconds", pa.int32())])
    first = next(p for p in sorted(os.listdir(out)) if p.startswith("dt="))
    file_schema = pq.read_schema(os.path.join(out, first, "part-00000.parquet"))
    assert file_schema.remove_metadata().equals(expected)
    assert set(pc.unique(table["event_type"]).to_pylist()) == set(EVENT_TYPES)
    no_watch = pc.is_in(table["event_type"], pa.array(["impression", "click"]))
    assert pc.max(table.filter(no_watch)["watch_seconds"]).as_py() == 0
    assert pc.min(table.filter(pc.invert(no_watch))["watch_seconds"]).as_py() >= 1
    assert pc.all(pc.match_substring_regex(table["user_id"], r"^u\d{7}$")).as_py()
    assert pc.all(pc.match_substring_regex(table["item_id"], r"^t\d{5}$")).as_py()
    # Impressions are the most frequent event type.
    counts = dict(zip(*np.unique(table["event_type"].to_numpy(zero_copy_only=False),
                                 return_counts=True)))
    assert max(counts, key=counts.get) == "impression"


def test_partitions_cover_period_and_summary_matches(dataset):
    out, summary, table, lines = dataset
    parts = sorted(os.listdir(out))
    days = [START + datetime.timedelta(days=d) for d in range(DAYS)]
    assert parts == [f"dt={d:%Y-%m-%d}" for d in days]
    for name in parts:
        day = datetime.date.fromisoformat(name[3:])
        assert sorted(os.listdir(os.path.join(out, name))) == ["_SUCCESS", "part-00000.parquet"]  # day complete
        ts = pq.read_table(os.path.join(out, name, "part-00000.parquet"))["ts"]
        assert len(ts) > 0
        dates = pc.cast(ts, pa.date32()).to_pylist()  # UTC calendar day
        assert set(dates) == {day}
    assert summary == {
        "events": table.num_rows,
        "users": len(pc.unique(table["user_id"])),
        "items": len(pc.unique(table["item_id"])),
        "days": DAYS,
        "start": START.isoformat(),
        "end": days[-1].isoformat(),
        "files": DAYS,
    }
    assert 1 <= len(lines) <= DAYS and all(isinstance(s, str) and s for s in lines)


def test_heavy_tails_and_popularity(dataset):
    _, _, table, _ = dataset
    plays = table.filter(pc.equal(table["event_type"], "play"))
    pairs = np.unique(np.stack([pc.cast(pc.utf8_slice_codeunits(plays[c], 1), pa.int64())
                                .to_numpy() for c in ("user_id", "item_id")]), axis=1)
    titles_per_user = np.bincount(pairs[0])
    titles_per_user = titles_per_user[titles_per_user > 0]
    assert titles_per_user.max() >= 5 * np.median(titles_per_user)
    play_items = pc.cast(pc.utf8_slice_codeunits(plays["item_id"], 1), pa.int64()).to_numpy()
    per_item = np.sort(np.bincount(play_items, minlength=ITEMS))[::-1]
    assert per_item[: ITEMS // 10].sum() > 0.3 * per_item.sum()
    n_pos = positives(table, USERS, ITEMS).sum(1)
    assert 0.05 <= np.mean(n_pos < 5) <= 0.35  # every user has some event


def test_planted_taste_structure_beats_popularity(dataset):
    _, _, table, _ = dataset
    cooc, pop = recall_at_k(positives(table, USERS, ITEMS))
    assert cooc >= 1.5 * pop, (cooc, pop)


def test_funnel_short_plays_and_rewatches(dataset):
    _, _, table, _ = dataset
    plays = table.filter(pc.equal(table["event_type"], "play"))
    short = np.mean(plays["watch_seconds"].to_numpy() < 60)
    assert 0.05 <= short <= 0.30
    pair_plays = plays.group_by(["user_id", "item_id"]).aggregate([("ts", "count")])
    assert pc.max(pair_plays["ts_count"]).as_py() > 1
    completes = table.filter(pc.equal(table["event_type"], "complete"))
    assert pc.min(completes["watch_seconds"]).as_py() >= 1200
    # Each watched title's funnel is ordered: impression < click < play < complete.
    first = (table.group_by(["user_id", "item_id", "event_type"]).aggregate([("ts", "min")])
             .to_pandas().pivot(index=["user_id", "item_id"], columns="event_type",
                                values="ts_min"))
    watched = first[first["play"].notna()]
    assert (watched["impression"] < watched["play"]).all()
    clicked = watched[watched["click"].notna()]
    assert len(clicked) > 0.5 * len(watched)
    assert ((clicked["impression"] < clicked["click"]) & (clicked["click"] < clicked["play"])).all()
    done = watched[watched["complete"].notna()]
    assert len(done) > 0 and (done["play"] < done["complete"]).all()
