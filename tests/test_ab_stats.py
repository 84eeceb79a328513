"""Online A/B statistics (piarec/evaluate/ab.py): the delta-method interval against
hand-computed cases, its coverage over simulated experiments with a known effect, the
chi-square tail against tabulated quantiles, and the sample-ratio-mismatch check on a
planted 52/48 split and on the pipeline's own hash assignment."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from piarec.evaluate.ab import chi2_sf, ratio, srm, uplift
from piarec.scoring.arrow import in_share


def test_ratio_matches_the_hand_computed_delta_method():
    # y = [1, 2, 3], x = [2, 2, 4]: R = 6 / 8; s_y^2 = 1, s_x^2 = 4/3, s_xy = 1, mean(x) = 8/3;
    # Var(R) = (1 - 2 * 0.75 * 1 + 0.75^2 * 4/3) / (3 * 64/9) = 0.25 * 9 / 192 = 0.01171875.
    got = ratio([1, 2, 3], [2, 2, 4])
    assert got.value == pytest.approx(0.75)
    assert got.se == pytest.approx(math.sqrt(0.01171875))
    assert (got.low, got.high) == pytest.approx((0.75 - 1.959964 * got.se, 0.75 + 1.959964 * got.se), rel=1e-6)
    assert got.n_users == 3


def test_a_per_user_mean_is_the_ratio_over_ones():
    # x = 1: the delta method reduces to s / sqrt(n). y = [0, 2, 4, 6]: mean 3, s^2 = 20/3.
    got = ratio([0, 2, 4, 6], [1, 1, 1, 1], confidence=0.9)
    assert got.value == pytest.approx(3.0) and got.se == pytest.approx(math.sqrt(20 / 3 / 4))
    assert got.high - got.value == pytest.approx(1.644854 * got.se, rel=1e-6)


def test_uplift_by_hand():
    control, treatment = ratio([1, 2, 3], [2, 2, 4]), ratio([2, 3, 4], [2, 2, 4])  # R_t = 9/8
    up = uplift(control, treatment)
    assert up.rel == pytest.approx(9 / 8 / 0.75 - 1) and up.diff == pytest.approx(0.375)
    se_log = math.hypot(treatment.se / treatment.value, control.se / control.value)
    assert up.rel_low == pytest.approx(math.exp(math.log(1.5) - 1.959964 * se_log) - 1, rel=1e-6)
    assert up.diff_high - up.diff == pytest.approx(1.959964 * math.hypot(treatment.se, control.se), rel=1e-6)
    assert 0 < up.p_value < 1 and up.rel_low > -1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2 users"):
        ratio([1], [1])
    with pytest.raises(ValueError, match="sums to zero"):
        ratio([0, 0], [0, 0])
    with pytest.raises(ValueError, match="equal-length"):
        ratio([1, 2], [1])
    with pytest.raises(ValueError, match="confidence"):
        ratio([1, 2], [1, 1], confidence=1.5)


def simulate(rng, n_experiments: int, users: int, p_control: float, p_treatment: float):
    """Per-user views (1 + Poisson(10)) and clicks (Binomial(views, p_u)) for both arms of each
    experiment, where each user's own click propensity p_u is p * Beta(0.5, 0.5) / 0.5: users
    differ, so a user's views are not independent trials (a per-view binomial interval covers
    87 % of the time here); the click rate per view of an arm is still p exactly, in expectation."""
    def arm(p):
        views = 1 + rng.poisson(10.0, size=(n_experiments, users))
        propensity = p * rng.beta(0.5, 0.5, size=views.shape) / 0.5
        return rng.binomial(views, propensity), views

    return arm(p_control), arm(p_treatment)


def test_the_95_interval_covers_a_known_effect_in_95_percent_of_experiments():
    rng = np.random.default_rng(7)
    (cc, cv), (tc, tv) = simulate(rng, 1000, 1500, 0.10, 0.11)
    true_rel, true_diff = 0.11 / 0.10 - 1, 0.01
    covered_rel = covered_diff = 0
    for i in range(1000):
        up = uplift(ratio(cc[i], cv[i]), ratio(tc[i], tv[i]))
        covered_rel += up.rel_low <= true_rel <= up.rel_high
        covered_diff += up.diff_low <= true_diff <= up.diff_high
    assert 0.935 <= covered_rel / 1000 <= 0.965, covered_rel
    assert 0.935 <= covered_diff / 1000 <= 0.965, covered_diff


def test_with_no_effect_5_percent_of_experiments_are_significant():
    rng = np.random.default_rng(11)
    (cc, cv), (tc, tv) = simulate(rng, 1000, 1500, 0.10, 0.10)
    significant = sum(uplift(ratio(cc[i], cv[i]), ratio(tc[i], tv[i])).p_value < 0.05 for i in range(1000))
    assert 0.03 <= significant / 1000 <= 0.07, significant


@pytest.mark.parametrize("x, df, p", [(3.841459, 1, 0.05), (10.827566, 1, 0.001), (5.991465, 2, 0.05),
                                      (7.814728, 3, 0.05), (16.266236, 3, 0.001), (9.487729, 4, 0.05),
                                      (11.070498, 5, 0.05), (0.0, 3, 1.0)])
def test_chi2_tail_matches_the_tables(x, df, p):
    assert chi2_sf(x, df) == pytest.approx(p, rel=1e-5)


def test_srm_fires_on_a_planted_52_48_split_of_a_50_50_design():
    check = srm({"champion": 5200, "control": 4800}, {"champion": 0.5, "control": 0.5})
    assert check.chi2 == pytest.approx(16.0) and check.df == 1
    assert check.p_value == pytest.approx(chi2_sf(16.0, 1)) and check.p_value < 1e-4
    assert check.mismatch and check.to_dict()["mismatch"] is True


def test_srm_is_quiet_on_the_pipelines_own_50_50_assignment():
    users = pa.array([f"user-{i:07d}" for i in range(10_000)])
    challenger = np.asarray(in_share(users, "piarec-ab-v1", 0.5))
    counts = {"challenger": int(challenger.sum()), "champion": int((~challenger).sum())}
    check = srm(counts, {"challenger": 0.5, "champion": 0.5})
    assert not check.mismatch, check
    # Three arms with unequal shares are normalised: 20/30/50 observed on a 2:3:5 design is exact.
    assert srm({"a": 200, "b": 300, "c": 500}, {"a": 2, "b": 3, "c": 5}).chi2 == pytest.approx(0.0)


def test_srm_refuses_mismatched_arms():
    with pytest.raises(ValueError, match="differ from configured"):
        srm({"a": 1, "b": 2}, {"a": 0.5, "c": 0.5})
