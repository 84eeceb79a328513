import numpy as np
import pytest

from piarec.evaluate.compare import paired_bootstrap


def test_constant_shift_has_a_degenerate_interval():
    a = np.linspace(0.1, 0.5, 50)
    cmp = paired_bootstrap(a, a + 0.1)
    assert cmp.diff == pytest.approx(0.1)
    assert cmp.diff_low == pytest.approx(0.1) and cmp.diff_high == pytest.approx(0.1)
    assert cmp.rel == pytest.approx(0.1 / 0.3)
    assert cmp.rel_low < cmp.rel < cmp.rel_high  # the ratio still varies with the users drawn


def test_interval_covers_the_true_difference_and_excludes_zero_when_clear():
    rng = np.random.default_rng(0)
    a = rng.random((3, 2000))
    b = a + 0.02 + rng.normal(0, 0.1, size=a.shape)
    cmp = paired_bootstrap(a, b)
    assert cmp.n_seeds == 3 and cmp.n_users == 2000
    assert cmp.diff_low < 0.02 < cmp.diff_high
    assert cmp.diff_low > 0


def test_no_difference_gives_an_interval_around_zero_and_nan_users_are_dropped():
    rng = np.random.default_rng(1)
    a = rng.random(500)
    b = a + rng.normal(0, 0.05, size=500)
    b -= (b - a).mean()
    a[:10] = np.nan
    cmp = paired_bootstrap(a, b, seed=3)
    assert cmp.n_users == 490
    assert cmp.diff_low < 0 < cmp.diff_high


def test_seed_level_resampling_widens_the_interval():
    rng = np.random.default_rng(2)
    a = rng.random((4, 300))
    noise_free = a + 0.01
    seed_noise = a + 0.01 + np.array([-0.03, 0.05, -0.02, 0.04])[:, None]
    narrow, wide = paired_bootstrap(a, noise_free), paired_bootstrap(a, seed_noise)
    assert (wide.diff_high - wide.diff_low) > 10 * (narrow.diff_high - narrow.diff_low)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no user"):
        paired_bootstrap(np.full(3, np.nan), np.zeros(3))
