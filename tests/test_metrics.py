import math

import numpy as np

from piarec.evaluate.metrics import ndcg_at_k, recall_at_k
from piarec.data.csr import CSR


def test_recall_uses_min_of_k_and_heldout_count():
    held = CSR.from_lists([[1, 2, 3], [7], [0, 1, 2, 3, 4]], n_cols=10)
    topk = np.array([[1, 9, 3, 8], [5, 6, 8, 7], [9, 8, 0, 1]])
    # user 0: hits {1,3} / min(2,3)=2 at k=2 -> hit only 1 -> 0.5 ; at k=4 -> 2/3
    # user 1: k=2 -> 0/1 ; k=4 -> 1/1
    # user 2: k=2 -> 0/2 ; k=4 -> 2/4
    np.testing.assert_allclose(recall_at_k(topk, held, 2), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(recall_at_k(topk, held, 4), [2 / 3, 1.0, 0.5])


def test_ndcg_binary_relevance_hand_computed():
    held = CSR.from_lists([[1, 3], [4]], n_cols=10)
    topk = np.array([[1, 9, 3], [0, 4, 2]])
    d = [1 / math.log2(r + 1) for r in (1, 2, 3)]
    expected0 = (d[0] + d[2]) / (d[0] + d[1])
    expected1 = d[1] / d[0]
    np.testing.assert_allclose(ndcg_at_k(topk, held, 3), [expected0, expected1])


def test_perfect_ranking_scores_one_and_users_without_heldout_are_nan():
    held = CSR.from_lists([[2, 5], []], n_cols=6)
    topk = np.array([[5, 2, 0], [0, 1, 2]])
    assert ndcg_at_k(topk, held, 3)[0] == 1.0
    assert recall_at_k(topk, held, 3)[0] == 1.0
    assert np.isnan(ndcg_at_k(topk, held, 3)[1])


def test_padding_never_counts_as_a_hit():
    held = CSR.from_lists([[0]], n_cols=3)
    assert recall_at_k(np.array([[-1, -1]]), held, 2)[0] == 0.0
