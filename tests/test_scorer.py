"""TopKScorer against a brute-force numpy reference: a full stable sort of the fp32 scores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from piarec.models.bundle import ModelBundle
from piarec.config import ModelConfig
from piarec.models.contract import SparseBatch
from piarec.models.multivae import MultiVAE
from piarec.scoring.scorer import MIN_ROWS, TopKScorer
from piarec.scoring.topk import top_k_rows, top_k_torch
from piarec.scoring.arrow import OUTPUT_SCHEMA, WRITE_SCHEMA, map_arrow_lists, map_histories, to_record_batch
from piarec.data.csr import CSR

N_USERS, N_ITEMS = 40, 60


def make_bundle(n_items=N_ITEMS, seed=0, popularity=None, decoder_hidden=()) -> ModelBundle:
    torch.manual_seed(seed)
    model = MultiVAE(n_items, ModelConfig(hidden_dim=16, latent_dim=8, decoder_hidden=list(decoder_hidden))).eval()
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


def full_scores(bundle: ModelBundle, history: CSR, exact64: bool = False) -> np.ndarray:
    """float32 [U, I]: every user's score for every item, all users in one forward pass
    (at least MIN_ROWS rows, so the same BLAS kernels as the scorer's blocks). With
    ``exact64`` the decoder is evaluated in float64 and rounded (the bf16 path's scores)."""
    full = np.tile(bundle.popularity, (history.n_rows, 1))
    model_rows = np.flatnonzero(history.row_lengths() > 0)
    if len(model_rows):
        rows = np.concatenate([model_rows, np.repeat(model_rows[:1], max(0, MIN_ROWS - len(model_rows)))])
        with torch.inference_mode():
            mu, _ = bundle.model.encode(SparseBatch.from_csr(history.take_rows(rows)), keep_prob=1.0)
            if exact64:
                layer = bundle.model.decoder[-1]
                logits = (mu.double() @ layer.weight.double().T + layer.bias.double()).float()
            else:
                logits = bundle.model.logits(mu)
        full[model_rows] = logits.numpy()[: len(model_rows)]
    return full


def reference(bundle: ModelBundle, history: CSR, seen: CSR, k: int, exact64: bool = False):
    """Brute force: per user the full score row, seen removed, stable-sorted descending
    with ties by ascending item index."""
    has = history.row_lengths() > 0
    full = full_scores(bundle, history, exact64)
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


@pytest.mark.parametrize("batch_size", [1, 7, 4096])
def test_matches_full_sort_reference(batch_size):
    # Batches of 1 and 7 rows are padded to MIN_ROWS, so every batching gives the scores
    # of one full pass, bit for bit.
    bundle = make_bundle()
    history, seen = random_rows(N_USERS, N_ITEMS, 1), random_rows(N_USERS, N_ITEMS, 2, max_len=30, empty_every=7)
    scored = TopKScorer(bundle, k=10, batch_size=batch_size).score(history, seen)
    assert_matches(scored, reference(bundle, history, seen, 10), 10)
    # Seen titles never come back, for model and popularity users alike.
    for u in range(N_USERS):
        assert not set(scored.item_idx[u, : scored.count[u]]) & set(seen.row(u))
    # Posterior mean, no sampling: a second call is identical.
    again = TopKScorer(bundle, k=10, batch_size=batch_size).score(history, seen)
    np.testing.assert_array_equal(again.item_idx, scored.item_idx)


def test_blocks_smaller_than_the_batch_match_too():
    # Many items: the decoder runs in several row blocks per batch, the last one short.
    bundle = make_bundle(n_items=5000, seed=3, decoder_hidden=[12])
    scorer = TopKScorer(bundle, k=25)
    n_users = scorer._rows_per_block + 7  # a full block, then a short one of 7 rows
    history = random_rows(n_users, 5000, 5, max_len=40, empty_every=10**9)
    seen = random_rows(n_users, 5000, 6, max_len=60, empty_every=9)
    assert MIN_ROWS < scorer._rows_per_block < n_users < scorer.batch_size
    assert_matches(scorer.score(history, seen), reference(bundle, history, seen, 25), 25)


def test_constant_model_ties_break_by_item_index():
    # Zero decoder weights: every user's logits are the bias; a bias with three values
    # makes dozens of ties, straddling the k-th position.
    bundle = make_bundle()
    with torch.no_grad():
        bundle.model.decoder[-1].weight.zero_()
        bundle.model.decoder[-1].bias.copy_(torch.tensor([float(i % 3 == 0) for i in range(N_ITEMS)]))
    history, seen = random_rows(N_USERS, N_ITEMS, 3, empty_every=1000), random_rows(N_USERS, N_ITEMS, 4)
    for precision in ("fp32", "bf16"):
        scored = TopKScorer(bundle, k=10, precision=precision).score(history, seen)
        assert_matches(scored, reference(bundle, history, seen, 10), 10)
        # Hand-checkable for user 1: unseen items i % 3 == 0 first, by index, then the rest.
        assert scored.source[1] == "model"
        unseen = [i for i in range(N_ITEMS) if i not in set(seen.row(1))]
        expected = ([i for i in unseen if i % 3 == 0] + [i for i in unseen if i % 3])[:10]
        assert scored.item_idx[1].tolist() == expected


def test_bf16_pass_with_correction_is_exact_where_bf16_alone_is_not():
    # Decoder rows differ by far less than bf16 resolves: bf16 scores alone misorder them,
    # the corrected top-K equals the full sort of the exact (fp64, rounded) scores.
    bundle = make_bundle(n_items=200, seed=4)
    layer = bundle.model.decoder[-1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = torch.randn(1, layer.weight.shape[1], generator=g)
        layer.weight.copy_(base + 1e-3 * torch.randn(layer.weight.shape, generator=g))
        layer.bias.zero_()
    history, seen = random_rows(64, 200, 7, max_len=20, empty_every=8), random_rows(64, 200, 8, max_len=40)
    scored = TopKScorer(bundle, k=20, precision="bf16").score(history, seen)
    expected = reference(bundle, history, seen, 20, exact64=True)
    assert_matches(scored, expected, 20)
    # The test has teeth: ranking by the bf16 scores alone gets some users wrong.
    with torch.inference_mode():
        mu, _ = bundle.model.encode(SparseBatch.from_csr(history), keep_prob=1.0)
        rough = (mu.bfloat16().float() @ layer.weight.bfloat16().float().T).numpy()
    wrong = 0
    for u, (items, _, source) in enumerate(expected):
        if source == "model":
            unseen = np.setdiff1d(np.arange(200), seen.row(u))
            wrong += not np.array_equal(unseen[np.lexsort((unseen, -rough[u, unseen]))][:20], items)
    assert wrong > 0


def test_bf16_needs_an_affine_decoder():
    bundle = make_bundle(decoder_hidden=[12])
    with pytest.raises(ValueError, match="affine"):
        TopKScorer(bundle, k=5, precision="bf16")
    assert TopKScorer(bundle, k=5, precision="auto").precision == "fp32"  # CPU: fp32 anyway


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
    assert_matches(scored, reference(bundle, history, seen, 3), 3)


def test_k_larger_than_unseen_catalogue():
    bundle = make_bundle(n_items=12)
    history = CSR.from_lists([[0, 1], [], [3], []], 12)
    seen = CSR.from_lists([[0, 1], list(range(9)), list(range(12)), []], 12)
    for precision in ("fp32", "bf16"):
        scored = TopKScorer(bundle, k=50, precision=precision).score(history, seen)  # k' = 12
        assert scored.item_idx.shape == (4, 12)
        assert scored.count.tolist() == [10, 3, 0, 12]
        assert sorted(scored.item_idx[1, :3]) == [9, 10, 11]
        assert_matches(scored, reference(bundle, history, seen, 12, exact64=precision == "bf16"), 12)


def test_selection_equals_stable_sort_on_heavy_ties():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 4, (50, 30)).astype(np.float32)
    v[rng.random(v.shape) < 0.2] = -np.inf  # seen
    v[rng.random(v.shape) < 0.1] = -0.0  # ties with 0.0
    v[3] = -np.inf  # a row with nothing left
    cols = np.arange(30)
    for kk in (1, 5, 17, 30):
        expected = np.array([np.lexsort((cols, -row))[:kk] for row in v])
        np.testing.assert_array_equal(top_k_rows(v.copy(), kk), expected)
        idx, val = top_k_torch(torch.from_numpy(v.copy()), kk)
        np.testing.assert_array_equal(idx.numpy(), expected)
        np.testing.assert_array_equal(val.numpy(), np.take_along_axis(v, expected, 1))


def test_nan_scores_are_refused():
    v = np.zeros((3, 20), np.float32)
    v[1, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        top_k_rows(v, 5)
    with pytest.raises(ValueError, match="NaN"):
        top_k_torch(torch.from_numpy(v), 5)


def test_unknown_titles_counted_and_ignored():
    bundle = make_bundle()
    vocab = pa.array(bundle.item_ids.tolist(), pa.string())
    lists = [["t001", "new-1", "t005"], [], None, ["new-2", "new-2"], ["t005", "t005"]]
    csr, unknown = map_histories(lists, bundle.item_index(), N_ITEMS)
    assert unknown == 3
    assert [csr.row(u).tolist() for u in range(5)] == [[1, 5], [], [], [], [5]]
    # The Arrow path agrees, per row, on a sliced array and on dictionary-encoded values
    # (what the engines read), with nulls inside lists counted as unknown.
    arrow = pa.array([["x"], *lists, [None, "t002"]], pa.list_(pa.string())).slice(1)
    encoded = pa.ListArray.from_arrays(arrow.offsets, arrow.values.dictionary_encode()).slice(0)
    for column in (arrow, encoded, pa.chunked_array([arrow.slice(0, 2), arrow.slice(2)])):
        csr2, per_row = map_arrow_lists(column, vocab)
        assert per_row.tolist() == [1, 0, 0, 2, 0, 1]
        assert [csr2.row(u).tolist() for u in range(6)] == [[1, 5], [], [], [], [5], [2]]
    # A user whose only titles are unknown is scored from popularity.
    scored = TopKScorer(bundle, k=5).score(csr, csr)
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
    # The writer's variant holds the same values with item ids dictionary-encoded.
    encoded = to_record_batch(pa.array(["a", "b", "c"]), scored, pa.array(bundle.item_ids.tolist()), "7",
                              dictionary=True)
    assert encoded.schema == WRITE_SCHEMA
    assert pa.Table.from_batches([encoded]).cast(OUTPUT_SCHEMA).to_pylist() == rows


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
