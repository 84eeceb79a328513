"""Shared fixtures: tiny planted-structure data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from piarec.data.csr import CSR


def planted_split(n_users: int, n_groups: int = 8, items_per_group: int = 25, per_user: int = 8,
                  fold_in: int = 6, seed: int = 0):
    """Users of group g like ``per_user`` random items of g's block (a checkerboard).

    Returns (train CSR over all users' items, fold_in CSR, held_out CSR) where the last two
    describe the same users' 80/20-style split; n_items = n_groups * items_per_group.
    """
    rng = np.random.default_rng(seed)
    n_items = n_groups * items_per_group
    rows = []
    for u in range(n_users):
        g = u % n_groups
        rows.append(np.sort(rng.choice(items_per_group, per_user, replace=False) + g * items_per_group))
    full = CSR.from_lists(rows, n_items)
    fin = CSR.from_lists([r[:fold_in] for r in rows], n_items)
    held = CSR.from_lists([r[fold_in:] for r in rows], n_items)
    return full, fin, held


@pytest.fixture
def planted_snapshot():
    return make_planted_snapshot()


def make_planted_snapshot():
    """800 planted training users, 64 validation and 64 test users (:func:`planted_split`)."""
    from piarec.data.snapshot import Snapshot, Split

    train, _, _ = planted_split(800, seed=0)
    _, vf, vh = planted_split(64, seed=1)
    _, tf, th = planted_split(64, seed=2)
    n_items = train.n_cols
    ids = lambda prefix, n: np.array([f"{prefix}{i}" for i in range(n)], dtype=object)  # noqa: E731
    return Snapshot(
        uri="memory://planted",
        manifest={"window": {"start": "2026-01-01", "end": "2026-04-01"}, "counts": {}},
        item_ids=ids("t", n_items),
        item_popularity=np.bincount(train.indices, minlength=n_items).astype(np.int64),
        train=train,
        train_user_ids=ids("u", train.n_rows),
        val=Split(ids("v", 64), vf, vh),
        test=Split(ids("w", 64), tf, th),
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Test tensors are tiny: one intra-op thread is faster than two, and far faster on a
    busy shared machine (threads spin waiting for each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
