import numpy as np
import pytest
import torch

from piarec.evaluate.protocol import fit_ease_on_validation
from piarec.evaluate.metrics import EVAL_K, SELECTION_METRIC, summarize
from piarec.models.baselines import EASE, EaseDual, ease_weights, fit_ease, gram
from piarec.scoring.topk import masked_top_k
from piarec.data.snapshot import Split
from piarec.data.csr import CSR


def test_ease_two_items_hand_computed():
    # X = [[1,1],[1,0],[1,0]]: G = [[3,1],[1,1]]. Column j regresses item j on the other item:
    # with lambda = 1, B_01 = G_01 / (G_00 + 1) = 1/4 and B_10 = G_10 / (G_11 + 1) = 1/2.
    x = CSR.from_lists([[0, 1], [0], [0]], n_cols=2)
    torch.testing.assert_close(gram(x), torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
    b = fit_ease(x, 1.0).weights
    torch.testing.assert_close(b, torch.tensor([[0.0, 0.25], [0.5, 0.0]]))


def test_ease_columns_are_ridge_regressions_on_the_other_items():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 6)) < 0.4).astype(np.float64)
    csr = CSR.from_lists([np.flatnonzero(r) for r in x], n_cols=6)
    lam = 2.5
    b = ease_weights(gram(csr), lam).numpy()
    g = x.T @ x
    for j in range(6):
        others = [i for i in range(6) if i != j]
        want = np.linalg.solve(g[np.ix_(others, others)] + lam * np.eye(5), g[others, j])
        np.testing.assert_allclose(b[others, j], want, rtol=1e-9, atol=1e-12)
        assert b[j, j] == 0.0
    with pytest.raises(ValueError, match="lambda > 0"):
        ease_weights(gram(csr), 0.0)


def test_ease_scores_sum_rows_and_lambda_is_picked_on_validation():
    b = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    part = CSR.from_lists([[0, 2], [3]], n_cols=4)
    torch.testing.assert_close(EASE(b, 1.0).scores(part), torch.stack([b[0] + b[2], b[3]]))
    # Two item blocks {0..3}, {4..7}; validation users hold out an item of their block.
    train = CSR.from_lists([[0, 1, 2, 3], [4, 5, 6, 7]] * 10 + [[0, 1, 2], [5, 6, 7]], n_cols=8)
    val = Split(np.array(["a", "b"], dtype=object), CSR.from_lists([[0, 1], [4, 5]], 8),
                CSR.from_lists([[2, 3], [6, 7]], 8))
    ease = fit_ease_on_validation(train, val, lambdas=(0.5, 5.0))
    assert set(ease.val_ndcg) == {0.5, 5.0}
    assert ease.val_ndcg[ease.lam] == max(ease.val_ndcg.values()) == 1.0
    assert masked_top_k(ease.scores, val.fold_in, k=2)[0].tolist() in ([2, 3], [3, 2])


def _random_csr(n_rows: int, n_cols: int, density: float, seed: int) -> CSR:
    rng = np.random.default_rng(seed)
    x = rng.random((n_rows, n_cols)) < density
    x[np.arange(n_rows), rng.integers(0, n_cols, n_rows)] = True  # no empty rows
    return CSR.from_lists([np.flatnonzero(r) for r in x], n_cols=n_cols)


@pytest.mark.parametrize("lam", [0.5, 10.0, 300.0])
def test_dual_ease_scores_equal_the_primal_ones(lam):
    train, part = _random_csr(30, 80, 0.15, 0), _random_csr(7, 80, 0.1, 1)
    primal = EASE(ease_weights(gram(train), lam), lam).scores(part).double()
    dual = EaseDual(train)
    got = dual.scores(part, lam).double()
    torch.testing.assert_close(got, primal, rtol=1e-5, atol=1e-5)  # float32 output of float64 work
    b = ease_weights(gram(train), lam)
    a = gram(train).clone()
    a.diagonal().add_(lam)
    p = torch.linalg.inv(a)
    torch.testing.assert_close(dual.diagonal(lam), lam * p.diagonal(), rtol=1e-10, atol=1e-12)
    assert b.abs().max() > 0.01  # a non-trivial B, so the equality above says something
    with pytest.raises(ValueError, match="lambda > 0"):
        dual.scores(part, 0.0)
    with pytest.raises(ValueError, match="fewer users than items"):
        EaseDual(_random_csr(10, 8, 0.3, 2))


def test_validation_picks_the_same_lambda_through_the_dual_form():
    train = _random_csr(40, 120, 0.1, 3)
    val = Split(np.array([f"u{i}" for i in range(12)], dtype=object), _random_csr(12, 120, 0.08, 4),
                _random_csr(12, 120, 0.04, 5))
    grid = (1.0, 5.0, 20.0, 80.0)
    g = gram(train).float()
    want = {lam: summarize(masked_top_k(EASE(ease_weights(g, lam), lam).scores, val.fold_in, EVAL_K),
                           val.held_out)[SELECTION_METRIC] for lam in grid}
    assert len(set(want.values())) > 1  # the grid matters on this data
    fitted = fit_ease_on_validation(train, val, grid)
    # Equal to rounding: near-tied scores may swap ranks (at most a few 1e-5 of NDCG here).
    assert fitted.val_ndcg == pytest.approx(want, abs=1e-3)
    assert fitted.lam == max(want, key=want.__getitem__)
    torch.testing.assert_close(fitted.weights, ease_weights(g, fitted.lam))  # B formed at the chosen lambda
    lean = fit_ease_on_validation(train, val, grid, weights=False)
    assert lean.weights is None and lean.lam == fitted.lam
    torch.testing.assert_close(lean.scores(val.fold_in), fitted.scores(val.fold_in), rtol=1e-4, atol=1e-5)
