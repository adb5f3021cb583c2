"""Small statistics for comparing matched runs: paired t-intervals and tests, Holm's adjustment, tokens-to-target.

    mpirouter compare --routers linear,mpi --seeds 0,1,2 --out runs/compare   # uses these in report.md

Pure Python, no scipy: the Student-t quantile is computed by inverting its CDF, which is a
regularized incomplete beta function evaluated with a continued fraction (Numerical Recipes §6.4).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


ALPHA, MARK = 0.05, "†"
"""Family-wise level of the Holm adjustment, and the marker of Δ cells that survive it."""

def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of `xs`; the std of a single value is 0. NaN in, (NaN, NaN) out
    (e.g. the alignment of a router without rows in the experts' input space)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_std of an empty sequence")
    if any(math.isnan(x) for x in xs):
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df = inf: standard normal)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(df):
        return statistics.NormalDist().cdf(t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom, e.g. t_quantile(0.975, 4) = 2.776."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(df):
        return statistics.NormalDist().inv_cdf(p)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection: the CDF is monotone, 200 halvings reach float precision
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def paired_ci(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): two-sided t-interval for the mean of paired differences.

    mean ± t_{(1+level)/2, n-1} · sd / sqrt(n); with fewer than two differences the bounds are nan.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean, sd = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_t_pvalue(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of mean(diffs) = 0: 2·P(T_{n-1} <= -|t|), t = mean / (sd/√n).

    nan with fewer than two differences, and nan when they have zero variance: t is then 0/0 or ±inf,
    and identical differences over seeds (typically runs that are bit-identical up to a constant) are
    not evidence of anything, so such a comparison gets no p-value rather than p = 0 or 1.
    """
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, sd = mean_std(diffs)
    if not sd > 0 or not math.isfinite(mean):
        return math.nan
    t = mean / (sd / math.sqrt(n))
    return min(1.0, 2.0 * t_cdf(-abs(t), n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (controls the family-wise error rate), in the input order.

    With the m finite p-values sorted, p_(1) <= ... <= p_(m): adj_(i) = max_{j<=i} min(1, (m - j + 1)·p_(j)).
    nan entries are not comparisons: they do not count in m and stay nan.
    """
    ps = [float(p) for p in pvalues]
    bad = [p for p in ps if not (math.isnan(p) or 0.0 <= p <= 1.0)]
    if bad:
        raise ValueError(f"p-values must be in [0, 1] (or nan), got {bad}")
    order = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    adjusted = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))  # the max keeps the adjusted order monotone
        adjusted[i] = running
    return adjusted


def weighted_slope(xs: Sequence[float], means: Sequence[float], ses: Sequence[float], df: float, level: float = 0.95) -> dict:
    """Fixed-effect meta-regression of `means` on `xs` with inverse-variance weights w = 1/se², e.g. the
    scale ladder's mean Δ per rung against log10 N (results/ladder/PLAN.md).

    slope β = Σ w (x − x̄)(y − ȳ) / Σ w (x − x̄)², x̄ and ȳ the w-weighted means; SE(β) = (Σ w (x − x̄)²)^−½;
    the interval β ± t_{(1+level)/2, df}·SE and the two-sided p of β = 0 use Student's t with `df` degrees
    of freedom (the plan: the smallest rung's n − 1, since each se is estimated). "q" = Σ w (y − fit)², the
    residual heterogeneity (about len(xs) − 2 when the line fits within the errors). Returns slope, se, lo,
    hi, p, intercept (at x = 0), q.
    """
    if not (len(xs) == len(means) == len(ses)) or len(xs) < 3:
        raise ValueError(f"weighted_slope needs at least 3 points of equal length lists, got {len(xs)}, {len(means)}, {len(ses)}")
    if not all(math.isfinite(v) for v in [*xs, *means, *ses, df]):
        raise ValueError(f"weighted_slope needs finite inputs, got xs={list(xs)}, means={list(means)}, ses={list(ses)}, df={df}")
    if any(not se > 0 for se in ses) or not df > 0:
        raise ValueError(f"standard errors and df must be > 0, got {list(ses)}, df={df}")
    w = [1.0 / se**2 for se in ses]
    x_bar = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    y_bar = sum(wi * y for wi, y in zip(w, means)) / sum(w)
    sxx = sum(wi * (x - x_bar) ** 2 for wi, x in zip(w, xs))
    if not sxx > 0:
        raise ValueError("weighted_slope needs at least two distinct x values")
    slope = sum(wi * (x - x_bar) * (y - y_bar) for wi, x, y in zip(w, xs, means)) / sxx
    se = 1.0 / math.sqrt(sxx)
    half = t_quantile(0.5 + level / 2.0, df) * se
    intercept = y_bar - slope * x_bar
    q = sum(wi * (y - intercept - slope * x) ** 2 for wi, x, y in zip(w, xs, means))
    p = min(1.0, 2.0 * t_cdf(-abs(slope / se), df))
    return {"slope": slope, "se": se, "lo": slope - half, "hi": slope + half, "p": p, "intercept": intercept, "q": q}


def ratio_ci(ratios: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, lo, hi) of positive ratios: `paired_ci` of their logs, exponentiated.

    Ratios are multiplicative (2× and 0.5× cancel), so the interval is taken on the log scale, where it
    is symmetric, and stays positive after exponentiating; with fewer than two ratios the bounds are nan.
    """
    if any(not r > 0 for r in ratios):
        raise ValueError(f"ratios must be > 0, got {list(ratios)}")
    return tuple(math.exp(v) for v in paired_ci([math.log(r) for r in ratios], level))  # exp(nan) is nan


def tokens_to_target(tokens: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """Tokens at which a loss curve first reaches `target` (linear interpolation); None if never.

    If the first point is already at or below the target, its token count is returned.
    """
    if len(tokens) != len(losses):
        raise ValueError(f"tokens and losses differ in length: {len(tokens)} vs {len(losses)}")
    prev = None
    for x, y in zip(tokens, losses):
        if y <= target:
            if prev is None:
                return float(x)
            (x0, y0) = prev
            return float(x0 + (y0 - target) / (y0 - y) * (x - x0))
        prev = (x, y)
    return None


def mean_curve(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[list[float], list[float], list[float]]:
    """(x, mean, std) over curves given as (x, y) pairs, on the x values every curve has."""
    if not curves:
        return [], [], []
    maps = [dict(zip(x, y)) for x, y in curves]
    common = sorted(set.intersection(*(set(m) for m in maps)))
    stats = [mean_std([m[x] for m in maps]) for x in common]
    return [float(x) for x in common], [s[0] for s in stats], [s[1] for s in stats]
