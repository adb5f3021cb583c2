"""Statistics for the router comparison: t quantiles, paired intervals and tests, Holm, curve means, tokens-to-target."""

import math
import random

import pytest

from mpirouter.experiments.stats import holm, mean_curve, mean_std, paired_ci, paired_t_pvalue, ratio_ci, t_cdf, t_quantile, tokens_to_target

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


def diffs_with_t(t, n):
    """n paired differences whose t statistic is exactly `t`: mean t·se around a symmetric spread."""
    spread = [i - (n - 1) / 2 for i in range(n)]
    sd = mean_std(spread)[1]
    return [t * sd / math.sqrt(n) + x for x in spread]


# Two-sided p-values from t-table critical values: t_{0.975, df} gives p = 0.05, t_{0.995, df} gives 0.01.
P_TABLE = [(2.7764, 5, 0.05), (4.3027, 3, 0.05), (2.2622, 10, 0.05), (4.0321, 6, 0.01), (-2.7764, 5, 0.05), (0.0, 4, 1.0)]


@pytest.mark.parametrize("t,n,expected", P_TABLE, ids=[f"t={t}-df={n - 1}" for t, n, _ in P_TABLE])
def test_paired_t_pvalue_matches_the_table(t, n, expected):
    assert paired_t_pvalue(diffs_with_t(t, n)) == pytest.approx(expected, abs=2e-5)


def test_paired_t_pvalue_by_hand_on_one_degree_of_freedom():
    # diffs 1, 3: mean 2, sd √2, se 1, t = 2; with 1 df T is Cauchy: p = 1 - 2·atan(2)/π
    assert paired_t_pvalue([1.0, 3.0]) == pytest.approx(1 - 2 * math.atan(2) / math.pi, abs=1e-12)


UNDEFINED = [("one-difference", [0.3]), ("no-differences", []), ("zero-variance", [0.2, 0.2, 0.2]), ("all-zero", [0.0, 0.0])]


@pytest.mark.parametrize("diffs", [u[1] for u in UNDEFINED], ids=[u[0] for u in UNDEFINED])
def test_paired_t_pvalue_is_nan_without_a_sample_variance(diffs):
    assert math.isnan(paired_t_pvalue(diffs))


def test_paired_t_pvalue_agrees_with_the_interval():
    diffs = [-0.1, -0.2, -0.05, -0.15]  # the 95% interval excludes 0, the 99% one does not
    assert 0.01 < paired_t_pvalue(diffs) < 0.05


HOLM = [
    ("worked-by-hand", [0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
    ("nan-is-not-counted", [0.01, math.nan, 0.04, 0.03, 0.005], [0.03, math.nan, 0.06, 0.06, 0.02]),
    ("capped-at-one", [0.5, 0.6], [1.0, 1.0]),
    ("single-p-unchanged", [0.04], [0.04]),
    ("empty", [], []),
]


@pytest.mark.parametrize("ps,expected", [h[1:] for h in HOLM], ids=[h[0] for h in HOLM])
def test_holm_by_hand(ps, expected):
    got = holm(ps)
    assert [math.isnan(g) for g in got] == [math.isnan(e) for e in expected]
    assert [g for g in got if not math.isnan(g)] == pytest.approx([e for e in expected if not math.isnan(e)])


def test_holm_is_monotone_in_the_raw_p_and_never_below_it():
    rng = random.Random(0)
    ps = [rng.random() ** 3 for _ in range(40)]
    adjusted = holm(ps)
    pairs = sorted(zip(ps, adjusted))
    assert all(a0 <= a1 for (_, a0), (_, a1) in zip(pairs, pairs[1:]))
    assert all(p <= a <= 1.0 for p, a in pairs)
    assert min(adjusted) == pytest.approx(40 * min(ps)) or min(adjusted) == 1.0


def test_holm_rejects_values_that_are_not_probabilities():
    with pytest.raises(ValueError):
        holm([0.1, 1.5])


def test_ratio_ci_is_the_exponentiated_log_interval():
    gm, lo, hi = ratio_ci([1.0, 4.0])  # logs 0, ln 4: mean ln 2, sd ln4/√2, half-width t·ln2
    t = 12.706204736174698
    assert gm == pytest.approx(2.0) and lo == pytest.approx(2 ** (1 - t)) and hi == pytest.approx(2 ** (1 + t))
    assert ratio_ci([2.0, 0.5])[0] == pytest.approx(1.0)  # 2× and 0.5× cancel
    assert math.isnan(ratio_ci([1.5])[1])
    with pytest.raises(ValueError):
        ratio_ci([1.0, 0.0])
