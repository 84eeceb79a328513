import numpy as np
import pytest

from piarec.evaluate.protocol import per_user_evaluation
from piarec.scoring.topk import masked_top_k as scores_topk
from piarec.evaluate.metrics import PAPER_GROUPS, interaction_groups, per_user_metrics, summarize_groups
from piarec.data.snapshot import Split
from piarec.data.csr import CSR


def test_paper_groups_when_every_group_is_populated():
    counts = np.array([5] * 10 + [10] * 2 + [11] * 12 + [60] * 12 + [101] * 11 + [4])
    groups = interaction_groups(counts, min_users=10)
    assert [g for g, _ in groups] == ["[5-10]", "[11-50]", "[51-100]", "[100+]"]
    assert [int(m.sum()) for _, m in groups] == [12, 12, 12, 11]  # the user with 4 is in none
    assert len(PAPER_GROUPS) == 4


def test_quantile_groups_when_the_data_lacks_the_paper_groups():
    counts = np.arange(20, 60)  # nobody under 20 interactions (like MovieLens-100K)
    groups = interaction_groups(counts, min_users=5, n_quantiles=4)
    assert [g for g, _ in groups] == ["[20-30]", "[31-40]", "[41-49]", "[50-59]"]
    masks = np.stack([m for _, m in groups])
    assert (masks.sum(axis=0) == 1).all()  # a partition of the users


def test_group_means_hand_computed_and_users_without_heldout_skipped():
    held = CSR.from_lists([[1], [2], [3], []], n_cols=5)
    topk = np.array([[1, 0], [0, 2], [0, 1], [0, 1]])
    per_user = per_user_metrics(topk, held)
    np.testing.assert_allclose(per_user["recall_at_20"][:3], [1.0, 1.0, 0.0])
    groups = [("a", np.array([True, True, False, False])), ("b", np.array([False, False, True, True]))]
    rows = summarize_groups({"ndcg_at_100": per_user["ndcg_at_100"]}, groups)
    assert rows[0] == {"group": "a", "users": 2, "ndcg_at_100": pytest.approx((1 + 1 / np.log2(3)) / 2)}
    assert rows[1]["ndcg_at_100"] == 0.0 and rows[1]["users"] == 2


def test_scores_topk_masks_fold_in_and_counts_interactions():
    fold = CSR.from_lists([[0], [1, 2]], n_cols=4)
    held = CSR.from_lists([[3], [0]], n_cols=4)
    import torch

    score = lambda part: torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(part.n_rows, 1)  # noqa: E731
    top = scores_topk(score, fold, k=2, batch_size=1)
    assert top.tolist() == [[1, 2], [0, 3]]
    out = per_user_evaluation(top, Split(np.array(["u", "v"], dtype=object), fold, held))
    assert out["n_interactions"].tolist() == [2.0, 3.0]
    assert out["recall_at_20"].tolist() == [0.0, 1.0]


def test_evaluation_breaks_ties_like_the_scorer():
    """Ties go to the lower item index in evaluation, exactly as in the daily scorer: the
    ranking of a model (and of popularity) is the same wherever it is computed."""
    import torch

    from piarec.evaluate.protocol import model_topk, popularity_topk
    from piarec.models.bundle import ModelBundle
    from piarec.models.factory import build_model
    from piarec.config import ModelConfig
    from piarec.scoring.scorer import TopKScorer

    fold = CSR.from_lists([[5], [], [0, 9]], n_cols=12)
    tied = lambda part: torch.zeros(part.n_rows, 12)  # noqa: E731 - every item ties
    assert scores_topk(tied, fold, k=4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 4]]
    pop = np.array([3, 5, 5, 1, 5, 5, 0, 0, 0, 0, 0, 2], np.float32)
    assert popularity_topk(pop, fold, k=5).tolist() == [[1, 2, 4, 0, 11], [1, 2, 4, 5, 0], [1, 2, 4, 5, 11]]

    torch.manual_seed(0)
    model = build_model(12, ModelConfig(hidden_dim=8, latent_dim=3)).eval()
    with torch.no_grad():
        model.decoder[0].weight[6:].zero_()  # items 6..11 tie at the bias ...
        model.decoder[0].bias[6:] = 10.0  # ... and outrank the rest
    history = CSR.from_lists([[5], [3], [0, 9]], n_cols=12)  # every row has a history: no fallback
    ranked = model_topk(model, history, k=6)
    scored = TopKScorer(ModelBundle(model, np.array([f"t{i}" for i in range(12)], dtype=object), pop), 6).score(history, history)
    np.testing.assert_array_equal(ranked, scored.item_idx)
    assert ranked[0].tolist() == [6, 7, 8, 9, 10, 11]  # the tied block, by ascending index
    assert ranked[2][:5].tolist() == [6, 7, 8, 10, 11]  # 9 is known
