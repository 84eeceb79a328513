"""Beyond-accuracy metrics (piarec/evaluate/beyond.py) on hand-computed cases, the
intra-list similarity's |sum v|^2 identity against the brute-force pairwise mean, and which
item vectors a model gives it. (Their wiring into training and the gate: tests/test_gate.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from piarec.evaluate.beyond import (
    as_metrics, beyond_accuracy, coverage, describe, intra_list_similarity, item_vectors, novelty, popularity_bias,
)

TOPK = np.array([[0, 1, 2], [0, 3, -1]])  # user 2 has a short list (padding -1)
POP = np.array([8.0, 4.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # 10 titles, 8 users


def test_coverage_counts_distinct_titles_over_the_catalogue():
    assert coverage(TOPK, 10) == pytest.approx(4 / 10)
    assert coverage(np.full((3, 2), -1), 10) == 0.0


def test_novelty_is_the_mean_self_information():
    # p = 8/8, 4/8, 2/8, 1/8 -> 0, 1, 2, 3 bits; recommended: 0, 1, 2, 0, 3 -> mean 6/5.
    assert novelty(TOPK, POP, n_users=8) == pytest.approx(6 / 5)
    # A title nobody had counts as one user's: log2(8) = 3 bits.
    assert novelty(np.array([[5]]), POP, n_users=8) == pytest.approx(3.0)


def test_popularity_bias_is_the_share_of_slots_from_the_head():
    # Head: top 10 % of 10 titles = title 0; it holds 2 of the 5 slots.
    assert popularity_bias(TOPK, POP) == pytest.approx(2 / 5)
    # Top 30 %: titles 0, 1, 2 -> 4 of 5 slots.
    assert popularity_bias(TOPK, POP, head_share=0.3) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="head_share"):
        popularity_bias(TOPK, POP, head_share=0)


def test_intra_list_similarity_by_hand():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # List [0, 1, 2]: pairs (0,1) 1, (0,2) 0, (1,2) 0 -> 1/3. List [0, 3]: cos 45 deg = 1/sqrt 2.
    expected = (1 / 3 + 1 / math.sqrt(2)) / 2
    assert intra_list_similarity(TOPK[:, :3], np.vstack([vectors, np.zeros((6, 2))])) == pytest.approx(expected)
    assert intra_list_similarity(np.array([[0, 1]]), vectors) == pytest.approx(1.0)  # the same direction
    assert intra_list_similarity(np.array([[0, 2]]), vectors) == pytest.approx(0.0)  # orthogonal


def test_intra_list_similarity_equals_the_pairwise_mean():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(50, 8))
    topk = np.stack([rng.choice(50, 10, replace=False) for _ in range(30)])
    topk[5, 7:] = -1  # a short list
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    brute = []
    for row in topk:
        items = row[row >= 0]
        sims = unit[items] @ unit[items].T
        brute.append((sims.sum() - len(items)) / (len(items) * (len(items) - 1)))
    assert intra_list_similarity(topk, vectors) == pytest.approx(float(np.mean(brute)))
    assert intra_list_similarity(topk, vectors, batch_size=7) == pytest.approx(float(np.mean(brute)))  # batches


def test_beyond_accuracy_collects_them():
    got = beyond_accuracy(TOPK, POP, n_users=8, item_vectors=np.eye(10))
    assert got == pytest.approx({"coverage": 0.4, "novelty_bits": 1.2, "popularity_bias": 0.4,
                                 "intra_list_similarity": 0.0})
    assert beyond_accuracy(TOPK, POP, n_users=8)["intra_list_similarity"] is None


def test_metric_names_and_the_report_line():
    figures = {"coverage": 0.4123, "novelty_bits": 9.314, "popularity_bias": 0.381, "intra_list_similarity": 0.1234}
    assert as_metrics(figures, 100, "val_") == {"val_coverage_at_100": 0.4123, "val_novelty_at_100": 9.314,
                                                "val_popularity_bias_at_100": 0.381, "val_ils_at_100": 0.1234}
    assert describe(figures) == "coverage 0.412, novelty 9.31 bits, head share 0.38, ILS 0.12"
    figures["intra_list_similarity"] = None  # no item vectors: no metric, and the line says so
    assert "val_ils_at_100" not in as_metrics(figures, 100, "val_")
    assert describe(figures).endswith("ILS n/a")


def test_item_vectors_prefer_trained_anchors_then_the_affine_decoder():
    import torch

    from piarec.config import ModelConfig
    from piarec.models.factory import build_model

    torch.manual_seed(0)
    model = build_model(30, ModelConfig(hidden_dim=8, latent_dim=4))
    vectors, source = item_vectors(model)
    assert source == "pia_anchors" and np.array_equal(vectors, model.item_anchors().detach().numpy())
    vectors, source = item_vectors(model, anchors_trained=False)  # untrained anchors are noise
    assert source == "decoder" and vectors.shape == (30, 4)
    assert np.array_equal(vectors, model.affine_decoder().weight.detach().numpy())
    deep = build_model(30, ModelConfig(hidden_dim=8, latent_dim=4, decoder_hidden=[6]))  # not affine
    assert item_vectors(deep, anchors_trained=False) == (None, None)
