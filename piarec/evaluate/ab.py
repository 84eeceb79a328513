"""Online A/B statistics at the unit of randomisation: the user.

Users are assigned to arms (a salted hash of ``user_id``), so a user's days are not
independent observations: every metric is first summed per user over the period, then
compared across arms. The online metrics of the method's test (card clicks per view, clicks
per daily user view, playtime per user view) are all *ratios of sums*: ``R = sum(Y) / sum(X)``
over an arm's users, with per-user numerators ``Y`` and denominators ``X`` (a per-user mean is
the ratio with ``X = 1``). Their standard errors come from the delta method on the user
aggregates (Deng et al., "Applying the Delta Method in Metric Analytics", KDD 2018):

    Var(R) ~ (s_y^2 - 2 R s_xy + R^2 s_x^2) / (n * mean(X)^2)

The relative uplift of a treatment arm against the control is ``R_t / R_c - 1``; its interval
is taken on the log ratio (``se^2 = (se_t / R_t)^2 + (se_c / R_c)^2``, arms independent) and
mapped back, so it stays above -100 %. The absolute difference and its two-sided p-value use
``se^2 = se_t^2 + se_c^2``. The sample-ratio-mismatch check is Pearson's chi-square of the
users observed per arm against the configured shares; a p-value under ``alpha`` (0.001 by
default) means the assignment or the logging is broken and no metric of the test is to be read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Mapping

import numpy as np

__all__ = ["RatioEstimate", "Srm", "Uplift", "UserSums", "chi2_sf", "ratio", "ratio_from_sums", "srm", "uplift"]


@dataclass(frozen=True)
class RatioEstimate:
    """``sum(Y) / sum(X)`` over one arm's users, with its delta-method interval."""

    value: float
    se: float
    low: float
    high: float
    n_users: int
    confidence: float


@dataclass(frozen=True)
class Uplift:
    """Treatment against control: absolute and relative difference with intervals."""

    control: float
    treatment: float
    diff: float
    diff_low: float
    diff_high: float
    rel: float  # treatment / control - 1
    rel_low: float
    rel_high: float
    p_value: float  # two-sided, of diff = 0
    confidence: float


@dataclass(frozen=True)
class Srm:
    """Sample-ratio-mismatch check of the users per arm against the configured shares."""

    chi2: float
    df: int
    p_value: float
    alpha: float
    observed: dict[str, int]
    expected: dict[str, float]

    @property
    def mismatch(self) -> bool:
        return self.p_value < self.alpha

    def to_dict(self) -> dict:
        return {**asdict(self), "mismatch": self.mismatch}


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def ratio(numerator, denominator, *, confidence: float = 0.95) -> RatioEstimate:
    """``sum(numerator) / sum(denominator)`` over users (one value of each per user) with
    the delta-method standard error and a normal interval. Needs two or more users and a
    positive denominator sum."""
    y = np.asarray(numerator, dtype=np.float64)
    x = np.asarray(denominator, dtype=np.float64)
    if y.shape != x.shape or y.ndim != 1:
        raise ValueError(f"numerator and denominator must be two equal-length vectors, got {y.shape} and {x.shape}")
    return ratio_from_sums(UserSums.of(y, x), confidence=confidence)


@dataclass(frozen=True)
class UserSums:
    """What the delta method needs of a ratio's per-user values ``y`` (numerator) and ``x``
    (denominator): ``n`` and the sums of ``y, x, y^2, x^2, x y``. A Spark job sums these in
    one aggregation, so no per-user vector reaches the driver."""

    n: int
    y: float
    x: float
    yy: float
    xx: float
    xy: float

    @classmethod
    def of(cls, y: np.ndarray, x: np.ndarray) -> "UserSums":
        return cls(len(y), float(y.sum()), float(x.sum()), float(y @ y), float(x @ x), float(x @ y))


def ratio_from_sums(sums: UserSums, *, confidence: float = 0.95) -> RatioEstimate:
    """:func:`ratio` from the users' sums (:class:`UserSums`)."""
    n = sums.n
    if n < 2:
        raise ValueError(f"a ratio's interval needs at least 2 users, got {n}")
    mean_x, mean_y = sums.x / n, sums.y / n
    if not mean_x > 0:
        raise ValueError("the denominator sums to zero: no user has a view in this arm")
    r = mean_y / mean_x
    # sample (co)variances, ddof = 1, centred to keep the cancellation small
    s_yy = (sums.yy - n * mean_y * mean_y) / (n - 1)
    s_xx = (sums.xx - n * mean_x * mean_x) / (n - 1)
    s_xy = (sums.xy - n * mean_x * mean_y) / (n - 1)
    var = (s_yy - 2 * r * s_xy + r * r * s_xx) / (n * mean_x * mean_x)
    se = math.sqrt(max(float(var), 0.0))
    z = _z(confidence)
    return RatioEstimate(float(r), se, float(r - z * se), float(r + z * se), n, confidence)


def uplift(control: RatioEstimate, treatment: RatioEstimate) -> Uplift:
    """The treatment arm against the control arm (independent groups of users)."""
    if control.confidence != treatment.confidence:
        raise ValueError("both estimates must have the same confidence")
    z = _z(control.confidence)
    diff = treatment.value - control.value
    se_diff = math.hypot(treatment.se, control.se)
    if se_diff > 0:
        p = 2 * (1 - NormalDist().cdf(abs(diff) / se_diff))
    else:  # no variance at all: the difference is certain
        p = 1.0 if diff == 0 else 0.0
    if control.value > 0 and treatment.value > 0:
        log_ratio = math.log(treatment.value / control.value)
        se_log = math.hypot(treatment.se / treatment.value, control.se / control.value)
        rel, rel_low, rel_high = (math.expm1(log_ratio), math.expm1(log_ratio - z * se_log),
                                  math.expm1(log_ratio + z * se_log))
    else:  # a zero rate: no relative interval
        rel = rel_low = rel_high = float("nan")
    return Uplift(control.value, treatment.value, diff, diff - z * se_diff, diff + z * se_diff,
                  rel, rel_low, rel_high, float(p), control.confidence)


def chi2_sf(x: float, df: int) -> float:
    """``P(X >= x)`` for a chi-square variable with ``df`` (a positive integer) degrees of
    freedom: the closed forms for integer ``df`` (no SciPy)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if x <= 0:
        return 1.0
    half = x / 2
    if df % 2 == 0:  # exp(-x/2) * sum_{i < df/2} (x/2)^i / i!
        term = total = 1.0
        for i in range(1, df // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    # Odd df: erfc(sqrt(x/2)) + sqrt(2x/pi) exp(-x/2) * sum_{i=1}^{(df-1)/2} x^(i-1) / (1*3*...*(2i-1))
    term, total = 1.0, 0.0
    for i in range(1, (df + 1) // 2):
        term = 1.0 if i == 1 else term * x / (2 * i - 1)
        total += term
    return min(1.0, math.erfc(math.sqrt(half)) + math.sqrt(2 * x / math.pi) * math.exp(-half) * total)


def srm(observed: Mapping[str, int], shares: Mapping[str, float], *, alpha: float = 0.001) -> Srm:
    """Pearson's chi-square of the users seen per arm against the configured shares (which
    are normalised to sum to one). Arms must match; every share must be positive."""
    if set(observed) != set(shares):
        raise ValueError(f"observed arms {sorted(observed)} differ from configured arms {sorted(shares)}")
    if len(shares) < 2:
        raise ValueError("a sample-ratio check needs at least two arms")
    if any(s <= 0 for s in shares.values()):
        raise ValueError(f"every share must be positive, got {dict(shares)}")
    total_share = float(sum(shares.values()))
    n = int(sum(observed.values()))
    if n == 0:
        raise ValueError("no users observed in any arm")
    expected = {arm: n * shares[arm] / total_share for arm in shares}
    chi2 = sum((observed[arm] - e) ** 2 / e for arm, e in expected.items())
    df = len(shares) - 1
    return Srm(float(chi2), df, chi2_sf(chi2, df), alpha, {a: int(v) for a, v in observed.items()}, expected)
