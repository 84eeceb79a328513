"""Every dataset adapter on a tiny fixture file, and the split protocol's invariants."""

import numpy as np
import pandas as pd
import pytest

from piarec.research.datasets import build_snapshot, detect_format, load_dataset, read_interactions
from piarec.errors import InputDataError

# Six users x ratings: u1..u5 have >= 5 ratings >= 4; u6 has only 3 positives.
RATINGS = [(u, i, 5 if (u + i) % 3 else 4, 1000 + i) for u in range(1, 6) for i in range(1, 9)]
RATINGS += [(6, i, 5, 1) for i in (1, 2, 3)] + [(1, 20, 2, 1), (2, 21, 3, 1)]  # low ratings: negatives


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path):
    out = {}
    out["ml-100k"] = _write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    out["ml-1m"] = _write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    out["ml-csv"] = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"
                           + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in RATINGS))
    out["lastfm"] = _write(tmp_path / "user_artists.dat", "userID\tartistID\tweight\n"
                           + "".join(f"{u}\t{i}\t{100 * r}\n" for u, i, r, _ in RATINGS))
    out["sequence"] = _write(tmp_path / "Beauty.txt", "1 1 2 3 4 5\n2 6 7 8 9 10 4 11\n3 4 12\n")
    out["citeulike"] = _write(tmp_path / "users.dat", "3 10 11 12\n2 10 13\n5 1 2 3 4 5\n")
    out["csv"] = _write(tmp_path / "events.csv", "visitorid,itemid,score\n" + "".join(
        f"{u},{i},{r}\n" for u, i, r, _ in RATINGS))
    pd.DataFrame({"user_id": [1, 1, 2], "item_id": ["a", "b", "a"], "ts": [1, 2, 3]}).to_parquet(tmp_path / "x.parquet")
    out["parquet"] = tmp_path / "x.parquet"
    return out


def test_format_is_detected_from_name_or_content(files, tmp_path):
    for fmt, path in files.items():
        assert detect_format(path) == fmt, path
    # content-only detection (uninformative names)
    renamed = {fmt: _write(tmp_path / f"data_{fmt}.txt", files[fmt].read_text())
               for fmt in ("ml-100k", "ml-1m", "ml-csv", "lastfm", "citeulike", "sequence")}
    for fmt, path in renamed.items():
        assert detect_format(path) == fmt, fmt


def test_explicit_formats_agree_and_keep_ratings(files):
    tables = {f: read_interactions(files[f]) for f in ("ml-100k", "ml-1m", "ml-csv")}
    for inter in tables.values():
        assert len(inter.user) == len(RATINGS)
        assert inter.rating is not None and inter.rating.max() == 5
        assert set(inter.item) >= {"20", "21"}
    np.testing.assert_array_equal(tables["ml-100k"].rating, tables["ml-csv"].rating)


def test_implicit_formats_read_every_pair(files):
    seq = read_interactions(files["sequence"])
    assert seq.rating is None
    assert list(seq.user[:5]) == ["1"] * 5 and list(seq.item[5:12]) == ["6", "7", "8", "9", "10", "4", "11"]
    cul = read_interactions(files["citeulike"])
    assert list(cul.user) == ["0"] * 3 + ["1"] * 2 + ["2"] * 5  # users are line numbers
    assert list(cul.item[:3]) == ["10", "11", "12"]
    fm = read_interactions(files["lastfm"])
    assert fm.rating is None and len(fm.user) == len(RATINGS)  # play counts are not ratings
    pq = read_interactions(files["parquet"])
    assert list(pq.item) == ["a", "b", "a"] and pq.timestamp.tolist() == [1, 2, 3]
    gen = read_interactions(files["csv"])  # column names recognised: visitorid, itemid, score
    assert gen.rating is not None and len(gen.user) == len(RATINGS)


def test_generic_csv_column_names_can_be_given(tmp_path):
    path = _write(tmp_path / "t.csv", "who,what\n1,a\n2,b\n")
    with pytest.raises(InputDataError, match="no user column"):
        read_interactions(path, "csv")
    inter = read_interactions(path, "csv", columns={"user": "who", "item": "what"})
    assert list(inter.item) == ["a", "b"]


def test_citeulike_count_mismatch_is_reported(tmp_path):
    with pytest.raises(InputDataError, match="count 3 != 2"):
        read_interactions(_write(tmp_path / "bad.dat", "3 1 2\n"), "citeulike")


def _big_ratings(n_users=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(40, size=rng.integers(3, 20), replace=False):
            rows.append((str(u), str(i), float(rng.integers(1, 6))))
    u, i, r = map(np.array, zip(*rows))
    from piarec.research.datasets import Interactions
    return Interactions(u.astype(object), i.astype(object), r, None, "csv")


def test_split_protocol_invariants():
    inter = _big_ratings()
    snap = build_snapshot(inter, heldout_users=8, seed=3)
    positives = {}
    for u, i, r in zip(inter.user, inter.item, inter.rating):
        if r >= 4:
            positives.setdefault(u, set()).add(i)
    kept = {u for u, s in positives.items() if len(s) >= 5}
    assert snap.val.n_users == snap.test.n_users == 8
    assert snap.train.n_rows + 16 == len(kept)
    users = [*snap.train_user_ids, *snap.val.user_ids, *snap.test.user_ids]
    assert sorted(users) == sorted(kept)  # users with < 5 positives dropped, none twice
    train_items = {snap.item_ids[j] for j in snap.train.indices}
    assert train_items == set(snap.item_ids)  # the vocabulary is the training users' items
    assert (np.diff(snap.item_popularity) <= 0).all()
    for split in (snap.val, snap.test):
        for r, u in enumerate(split.user_ids):
            fold, held = set(split.fold_in.row(r)), set(split.held_out.row(r))
            assert not fold & held
            want = {j for j, item in enumerate(snap.item_ids) if item in positives[u]}
            assert fold | held == want
            n = len(want)
            assert len(held) == (int(np.floor(0.2 * n + 1e-9)) if n >= 5 else 0)
    # Seeded: the same seed gives the same split, another seed another one.
    again = build_snapshot(inter, heldout_users=8, seed=3)
    assert list(again.test.user_ids) == list(snap.test.user_ids)
    np.testing.assert_array_equal(again.test.held_out.indices, snap.test.held_out.indices)
    assert list(build_snapshot(inter, heldout_users=8, seed=4).test.user_ids) != list(snap.test.user_ids)


def test_min_rating_and_user_filter_are_configurable(files):
    strict = load_dataset(files["ml-100k"], heldout_users=1, min_rating=5)
    loose = load_dataset(files["ml-100k"], heldout_users=1, min_rating=1, min_user_positives=3)
    assert strict.train.nnz + strict.val.fold_in.nnz + strict.test.fold_in.nnz < 40  # only 5-star ratings
    # u6 (3 positives) is kept only with the looser filter, and low ratings become positives.
    n_users = lambda s: s.train.n_rows + s.val.n_users + s.test.n_users  # noqa: E731
    assert n_users(loose) == 6 and n_users(load_dataset(files["ml-100k"], heldout_users=1)) == 5
    with pytest.raises(InputDataError, match="cannot give"):
        load_dataset(files["ml-100k"], heldout_users=3)
    with pytest.raises(InputDataError, match="unknown format"):
        load_dataset(files["ml-100k"], "nope")


def test_disjoint_folds_make_every_user_a_test_user_once():
    inter = _big_ratings(n_users=90)
    k = 5
    folds = [build_snapshot(inter, min_rating=1.0, fold=(f, k), seed=2) for f in range(k)]
    tests = [set(s.test.user_ids) for s in folds]
    everyone = set(folds[0].train_user_ids) | set(folds[0].val.user_ids) | tests[0]
    assert set().union(*tests) == everyone and sum(map(len, tests)) == len(everyone)  # disjoint, covering
    for f, snap in enumerate(folds):
        assert set(snap.val.user_ids) == tests[(f + 1) % k]  # the next fold validates
        assert not set(snap.train_user_ids) & (tests[f] | tests[(f + 1) % k])
        assert abs(len(tests[f]) - len(everyone) / k) < 1
        assert snap.manifest["protocol"]["fold"] == [f, k]
    with pytest.raises(InputDataError, match="fold 5 of 5"):
        build_snapshot(inter, min_rating=1.0, fold=(5, 5))
