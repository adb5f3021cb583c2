"""Statistics for the router comparison: t quantiles, paired intervals, curve means, tokens-to-target."""

import math

import pytest

from mpirouter.stats import mean_curve, mean_std, paired_ci, t_cdf, t_quantile, tokens_to_target

# Reference two-sided 95% (and one 99%) Student-t critical values from standard tables.
T_TABLE = [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 3, 3.1824), (0.975, 4, 2.7764), (0.975, 9, 2.2622),
           (0.975, 29, 2.0452), (0.975, 120, 1.9799), (0.995, 5, 4.0321), (0.9, 10, 1.3722)]


@pytest.mark.parametrize("p,df,expected", T_TABLE, ids=[f"p={p}-df={df}" for p, df, _ in T_TABLE])
def test_t_quantile_matches_the_table(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_is_symmetric_and_inverts_the_cdf():
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4), rel=1e-12)
    assert t_quantile(0.5, 7) == 0.0
    for df in (1, 3, 17):
        assert t_cdf(t_quantile(0.8, df), df) == pytest.approx(0.8, abs=1e-10)


def test_t_cdf_with_one_degree_of_freedom_is_the_cauchy_cdf():
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


def test_t_quantile_tends_to_the_normal_quantile():
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)


@pytest.mark.parametrize("p,df", [(0.0, 3), (1.0, 3), (0.5, 0)], ids=["p=0", "p=1", "df=0"])
def test_t_quantile_rejects_bad_arguments(p, df):
    with pytest.raises(ValueError):
        t_quantile(p, df)


def test_paired_ci_by_hand():
    # diffs 1, 2, 3: mean 2, sd 1, n 3 -> 2 ± 4.302653 / sqrt(3)
    mean, lo, hi = paired_ci([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (lo, hi) == (pytest.approx(2.0 - half, abs=1e-9), pytest.approx(2.0 + half, abs=1e-9))


def test_paired_ci_level_widens_the_interval_and_constant_diffs_give_a_point():
    _, lo95, hi95 = paired_ci([-0.1, -0.2, -0.05, -0.15])
    _, lo99, hi99 = paired_ci([-0.1, -0.2, -0.05, -0.15], level=0.99)
    assert lo99 < lo95 < hi95 < 0 < hi99  # significant at 95%, not at 99%
    assert paired_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))


def test_paired_ci_of_one_difference_has_no_bounds():
    mean, lo, hi = paired_ci([-0.2])
    assert mean == -0.2 and math.isnan(lo) and math.isnan(hi)


def test_mean_std_uses_the_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


CURVES = [
    ("between-points", [0, 100, 200, 300], [5.0, 4.0, 3.0, 2.0], 2.5, 250.0),
    ("exactly-on-a-point", [0, 100, 200, 300], [5.0, 4.0, 3.0, 2.0], 3.0, 200.0),
    ("first-crossing-of-non-monotone", [10, 20, 30, 40], [4.0, 2.0, 5.0, 1.0], 3.0, 15.0),
    ("already-below-at-start", [50, 100], [1.0, 0.5], 2.0, 50.0),
    ("never-reached", [0, 100, 200], [5.0, 4.0, 3.5], 3.0, None),
]


@pytest.mark.parametrize("tokens,losses,target,expected", [c[1:] for c in CURVES], ids=[c[0] for c in CURVES])
def test_tokens_to_target_interpolates_linearly(tokens, losses, target, expected):
    got = tokens_to_target(tokens, losses, target)
    assert got == (None if expected is None else pytest.approx(expected))


def test_tokens_to_target_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        tokens_to_target([1, 2], [1.0], 0.5)


def test_mean_curve_averages_on_the_common_points():
    x, m, s = mean_curve([([0, 1, 2], [1.0, 2.0, 3.0]), ([1, 2], [4.0, 5.0])])
    assert x == [1.0, 2.0]
    assert m == [3.0, 4.0]
    assert s == [pytest.approx(math.sqrt(2)), pytest.approx(math.sqrt(2))]
    assert mean_curve([]) == ([], [], [])
