"""CSR construction (piarec/data/csr.py) and the snapshot loader's index checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from piarec.data.csr import CSR
from piarec.errors import InputDataError


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_from_pairs_is_the_sorted_set_of_pairs_per_row(dtype):
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 300, 20_000).astype(dtype)
    cols = rng.integers(0, 50, 20_000).astype(dtype)  # many repeats to collapse
    csr = CSR.from_pairs(rows, cols, n_rows=310, n_cols=50)  # rows 300-309 stay empty
    want = np.unique(np.stack([rows, cols], axis=1).astype(np.int64), axis=0)
    assert csr.indices.dtype == np.int32 and csr.indptr.dtype == np.int64
    assert csr.nnz == len(want) and csr.row_lengths()[300:].sum() == 0
    got = np.stack([np.repeat(np.arange(csr.n_rows), csr.row_lengths()), csr.indices], axis=1)
    assert np.array_equal(got, want)
    assert rows.dtype == dtype and rows.max() < 300  # the inputs are left as they were


def test_from_pairs_refuses_indices_outside_the_shape():
    with pytest.raises(ValueError, match="row index outside"):
        CSR.from_pairs(np.array([0, 3]), np.array([0, 0]), 3, 2)
    with pytest.raises(ValueError, match="column index outside"):
        CSR.from_pairs(np.array([0]), np.array([-1]), 3, 2)
    empty = CSR.from_pairs(np.array([], np.int32), np.array([], np.int32), 4, 2)
    assert empty.nnz == 0 and empty.indptr.tolist() == [0, 0, 0, 0, 0]


def test_load_snapshot_refuses_interactions_outside_its_items(tmp_path):
    from test_gate import planted, write_snapshot

    from piarec.data.snapshot import load_snapshot

    snap = planted(100)
    good = write_snapshot(snap, tmp_path / "good" / "window_end=2026-04-01")
    assert load_snapshot(good).train.nnz == snap.train.nnz
    # the interactions name items past the items/ table
    short = dataclasses.replace(snap, item_ids=snap.item_ids[:-10], item_popularity=snap.item_popularity[:-10])
    bad = write_snapshot(short, tmp_path / "bad" / "window_end=2026-04-01")
    with pytest.raises(InputDataError, match="interactions point outside users/ or items/"):
        load_snapshot(bad)


def test_load_snapshot_refuses_parts_that_contradict_the_splits(tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from test_gate import planted, write_snapshot

    from piarec.data.commit import read_pointer
    from piarec.data.snapshot import load_snapshot

    uri = write_snapshot(planted(100), tmp_path / "window_end=2026-04-01")
    (part_file,) = (tmp_path / "window_end=2026-04-01" / "_versions" / read_pointer(uri).version
                    / "interactions").glob("*.parquet")
    table = pq.read_table(part_file)
    # a validation user's fold-in positive marked as training data
    parts = pc.if_else(pc.equal(table.column("part"), "fold_in"), "train", table.column("part"))
    pq.write_table(table.set_column(2, "part", parts), part_file)
    with pytest.raises(InputDataError, match="interaction parts contradict user splits"):
        load_snapshot(uri)


def test_a_shard_of_the_snapshot_holds_every_worldth_training_user_and_counts_them_all(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from test_gate import planted, write_snapshot

    from piarec.data.commit import read_pointer
    from piarec.data.snapshot import load_snapshot

    snap = planted(300)
    uri = write_snapshot(snap, tmp_path / "window_end=2026-04-01")
    # Interleave the splits in user_idx order, as the matrix build does (users hashed).
    version = tmp_path / "window_end=2026-04-01" / "_versions" / read_pointer(uri).version
    n_users = sum(pq.read_table(f).num_rows for f in (version / "users").glob("*.parquet"))
    new_idx = np.random.default_rng(0).permutation(n_users).astype(np.int32)
    for name in ("users", "interactions"):
        for f in (version / name).glob("*.parquet"):
            table = pq.read_table(f)
            col = table.schema.get_field_index("user_idx")
            pq.write_table(table.set_column(col, "user_idx", pa.array(new_idx[table.column(col).to_numpy()])), f)

    whole = load_snapshot(uri)
    assert whole.train_user_ids.tolist() != snap.train_user_ids.tolist()  # training rows reordered
    assert sorted(whole.train_user_ids.tolist()) == sorted(snap.train_user_ids.tolist())
    assert whole.shard is None and whole.n_train_users == whole.train.n_rows
    world = 3
    shards = [load_snapshot(uri, shard=(r, world)) for r in range(world)]
    for r, part in enumerate(shards):
        rows = np.arange(r, whole.train.n_rows, world)
        want = whole.train.take_rows(rows)
        assert part.train.indptr.tolist() == want.indptr.tolist()
        assert part.train.indices.tolist() == want.indices.tolist()
        assert part.train_user_ids.tolist() == whole.train_user_ids[rows].tolist()
        assert part.n_train_users == whole.n_train_users and part.train_nnz == whole.train_nnz
        np.testing.assert_array_equal(part.train_popularity(), whole.train_popularity())
        assert part.val.fold_in.nnz == whole.val.fold_in.nnz  # held-out users load whole
    assert sum(p.train.nnz for p in shards) == whole.train.nnz
    with pytest.raises(ValueError, match="0 <= rank < world"):
        load_snapshot(uri, shard=(3, 3))
