"""TopKScorer against a brute-force reference: a full stable sort of the fp32 scores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from piarec.bundle import ModelBundle
from piarec.config import ModelConfig
from piarec.model import MultiVAE, SparseBatch
from piarec.scorer import OUTPUT_SCHEMA, TopKScorer, map_arrow_lists, map_histories, smallest_k, to_record_batch
from piarec.sparse import CSR

N_USERS, N_ITEMS = 40, 60


def make_bundle(n_items=N_ITEMS, seed=0, popularity=None) -> ModelBundle:
    torch.manual_seed(seed)
    model = MultiVAE(n_items, ModelConfig(hidden_dim=16, latent_dim=8)).eval()
    if popularity is None:
        popularity = np.random.default_rng(seed).integers(0, 1000, n_items).astype(np.float32)
    ids = np.array([f"t{i:03d}" for i in range(n_items)], dtype=object)
    return ModelBundle(model, ids, np.asarray(popularity, np.float32), {"version": "7"})


def random_rows(n_users, n_items, seed, max_len=12, empty_every=5) -> CSR:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = 0 if u % empty_every == 0 else rng.integers(1, max_len)
        rows.append(rng.choice(n_items, n, replace=False))
    return CSR.from_lists(rows, n_items)


def reference(bundle: ModelBundle, history: CSR, seen: CSR, k: int, batch_size: int):
    """Brute force: per user the full fp32 score row (logits of mu, or popularity), seen
    removed, stable-sorted descending with ties by ascending item index. The model rows
    are run in the same chunks as the scorer, so both see bit-identical fp32 logits."""
    has = history.row_lengths() > 0
    full = np.tile(bundle.popularity, (history.n_rows, 1))
    model_rows = np.flatnonzero(has)
    with torch.inference_mode():
        for s in range(0, len(model_rows), batch_size):
            chunk = model_rows[s : s + batch_size]
            mu, _ = bundle.model.encode(SparseBatch.from_csr(history.take_rows(chunk)), keep_prob=1.0)
            full[chunk] = bundle.model.logits(mu).numpy()
    out = []
    for u in range(history.n_rows):
        unseen = np.setdiff1d(np.arange(history.n_cols), seen.row(u))
        order = unseen[np.lexsort((unseen, -full[u, unseen]))]  # last key primary: -score, then index
        top = order[:k]
        out.append((top, full[u, top], "model" if has[u] else "popularity"))
    return out


def assert_matches(scored, expected, k_eff):
    assert scored.item_idx.dtype == np.int32 and scored.scores.dtype == np.float32
    assert scored.item_idx.shape == scored.scores.shape == (len(expected), k_eff)
    for u, (items, scores, source) in enumerate(expected):
        c = scored.count[u]
        assert c == len(items), u
        np.testing.assert_array_equal(scored.item_idx[u, :c], items, err_msg=f"user {u}")
        np.testing.assert_array_equal(scored.scores[u, :c], scores, err_msg=f"user {u}")
        assert (scored.item_idx[u, c:] == -1).all() and np.isnan(scored.scores[u, c:]).all()
        assert scored.source[u] == source


@pytest.mark.parametrize("batch_size", [7, 4096])
def test_matches_full_sort_reference(batch_size):
    bundle = make_bundle()
    history, seen = random_rows(N_USERS, N_ITEMS, 1), random_rows(N_USERS, N_ITEMS, 2, max_len=30, empty_every=7)
    scored = TopKScorer(bundle, k=10, batch_size=batch_size).score(history, seen)
    assert_matches(scored, reference(bundle, history, seen, 10, batch_size), 10)
    # Seen titles never come back, for model and popularity users alike.
    for u in range(N_USERS):
        assert not set(scored.item_idx[u, : scored.count[u]]) & set(seen.row(u))
    # Posterior mean, no sampling: a second call is identical.
    again = TopKScorer(bundle, k=10, batch_size=batch_size).score(history, seen)
    np.testing.assert_array_equal(again.item_idx, scored.item_idx)


def test_constant_model_ties_break_by_item_index():
    # Zero decoder weights: every user's logits are the bias; a bias with three values
    # makes dozens of ties, straddling the k-th position.
    bundle = make_bundle()
    with torch.no_grad():
        bundle.model.decoder[-1].weight.zero_()
        bundle.model.decoder[-1].bias.copy_(torch.tensor([float(i % 3 == 0) for i in range(N_ITEMS)]))
    history, seen = random_rows(N_USERS, N_ITEMS, 3, empty_every=1000), random_rows(N_USERS, N_ITEMS, 4)
    scored = TopKScorer(bundle, k=10).score(history, seen)
    assert_matches(scored, reference(bundle, history, seen, 10, 4096), 10)
    # Hand-checkable for user 1: unseen items i % 3 == 0 first, by index, then the rest.
    assert scored.source[1] == "model"
    unseen = [i for i in range(N_ITEMS) if i not in set(seen.row(1))]
    expected = ([i for i in unseen if i % 3 == 0] + [i for i in unseen if i % 3])[:10]
    assert scored.item_idx[1].tolist() == expected


def test_empty_history_gets_tied_popularity_minus_seen():
    popularity = np.array([5, 9, 9, 1, 9, 5, 0, 9], np.float32)
    bundle = make_bundle(n_items=8, popularity=popularity)
    history = CSR.from_lists([[], [], [2]], 8)
    seen = CSR.from_lists([[], [1, 4], [2]], 8)
    scored = TopKScorer(bundle, k=3).score(history, seen)
    assert scored.item_idx[0].tolist() == [1, 2, 4]  # ties at 9 by index
    assert scored.item_idx[1].tolist() == [2, 7, 0]  # 1 and 4 seen; 0 beats 5 at 5.0
    np.testing.assert_array_equal(scored.scores[1], [9, 9, 5])
    assert scored.source.tolist() == ["popularity", "popularity", "model"]
    assert_matches(scored, reference(bundle, history, seen, 3, 4096), 3)


def test_k_larger_than_unseen_catalogue():
    bundle = make_bundle(n_items=12)
    history = CSR.from_lists([[0, 1], [], [3], []], 12)
    seen = CSR.from_lists([[0, 1], list(range(9)), list(range(12)), []], 12)
    scored = TopKScorer(bundle, k=50).score(history, seen)  # k' = 12
    assert scored.item_idx.shape == (4, 12)
    assert scored.count.tolist() == [10, 3, 0, 12]
    assert sorted(scored.item_idx[1, :3]) == [9, 10, 11]
    assert_matches(scored, reference(bundle, history, seen, 12, 4096), 12)


def test_smallest_k_equals_stable_argsort_on_heavy_ties():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 4, (50, 30)).astype(np.float32)
    v[3] = np.inf  # a row with nothing left
    for kk in (1, 5, 17, 30, 31):
        np.testing.assert_array_equal(smallest_k(v, kk), np.argsort(v, axis=1, kind="stable")[:, :kk])


def test_unknown_titles_counted_and_ignored():
    bundle = make_bundle()
    index = bundle.item_index()
    lists = [["t001", "new-1", "t005"], [], None, ["new-2", "new-2"], ["t005", "t005"]]
    csr, unknown = map_histories(lists, index, N_ITEMS)
    assert unknown == 3
    assert [csr.row(u).tolist() for u in range(5)] == [[1, 5], [], [], [], [5]]
    # The Arrow path (used by the Spark job) agrees, per row, also on a sliced array.
    arrow = pa.array([["x"], *lists], pa.list_(pa.string())).slice(1)
    csr2, per_row = map_arrow_lists(arrow, pa.array(bundle.item_ids.tolist(), pa.string()))
    assert per_row.tolist() == [1, 0, 0, 2, 0]
    np.testing.assert_array_equal(csr2.indptr, csr.indptr)
    np.testing.assert_array_equal(csr2.indices, csr.indices)
    # A user whose only titles are unknown is scored from popularity.
    seen, _ = map_histories(lists, index, N_ITEMS)
    scored = TopKScorer(bundle, k=5).score(csr, seen)
    assert scored.source.tolist() == ["model", "popularity", "popularity", "popularity", "model"]


def test_record_batch_schema_and_content():
    bundle = make_bundle(n_items=12, popularity=np.arange(12, 0, -1))
    history = CSR.from_lists([[0, 1], [], [3]], 12)
    seen = CSR.from_lists([[0, 1], list(range(10)), list(range(12))], 12)
    scored = TopKScorer(bundle, k=4).score(history, seen)
    batch = to_record_batch(["a", "b", "c"], scored, bundle.item_ids, "7")
    assert batch.schema == OUTPUT_SCHEMA
    rows = batch.to_pylist()
    assert rows[0]["item_ids"] == [bundle.item_ids[i] for i in scored.item_idx[0]]
    assert rows[0]["scores"] == scored.scores[0].tolist()
    assert rows[1]["item_ids"] == ["t010", "t011"] and rows[1]["source"] == "popularity"
    assert rows[2]["item_ids"] == [] and rows[2]["scores"] == []
    assert {r["model_version"] for r in rows} == {"7"}


def test_rejects_mismatched_inputs():
    scorer = TopKScorer(make_bundle(), k=5)
    with pytest.raises(ValueError, match="rows"):
        scorer.score(CSR.from_lists([[1]], N_ITEMS), CSR.from_lists([[], []], N_ITEMS))
    with pytest.raises(ValueError, match="columns"):
        scorer.score(CSR.from_lists([[1]], N_ITEMS + 1), CSR.from_lists([[]], N_ITEMS + 1))


def test_no_users_gives_empty_batch():
    bundle = make_bundle()
    scored = TopKScorer(bundle, k=5).score(CSR.from_lists([], N_ITEMS), CSR.from_lists([], N_ITEMS))
    assert scored.item_idx.shape == (0, 5)
    batch = to_record_batch([], scored, bundle.item_ids, "7")
    assert batch.num_rows == 0 and batch.schema == OUTPUT_SCHEMA
