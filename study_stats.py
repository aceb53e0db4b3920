"""The statistics of a paired study over training seeds: the 95% Student t interval (the primary interval), the
exact paired sign-flip permutation test (Fisher 1935; Good 2005, ch. 3), Holm's step-down correction across the
declared endpoints (Holm 1979), equivalence by two one-sided t tests against a declared margin (Schuirmann 1987),
and the endpoints themselves: steps (or epochs) to an FID threshold with censoring, and the mean FID over the early
log-steps.

A percentile bootstrap of the mean covers about sqrt((n-1)/n) of the t interval's half-width times z/t: at n = 5
roughly 85% instead of 95%, so it is shown only from BOOTSTRAP_MIN seeds on (tests/test_study_stats.py measures
both coverages by simulation).
"""
import itertools
import math

import numpy as np
from scipy.special import stdtr, stdtrit  # the Student t CDF and quantile (scipy.stats costs a second to import)

LEVEL = 0.95
BOOTSTRAP_MIN = 10
RESAMPLES = 10_000
EXACT_UP_TO = 16  # seeds for which every sign flip is enumerated (2^16 = 65,536); above, 2^16 random flips


def t_interval(x: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of x (nan when fewer than two values)."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    half = stdtrit(len(x) - 1, (1 + level) / 2) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_interval(x: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of x over resamples with replacement (Efron & Tibshirani 1993, ch. 13)."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def sign_flip_p(x: np.ndarray) -> float:
    """Two-sided p-value of the paired sign-flip test of mean zero: the share of the 2^n sign patterns whose mean is
    at least as far from zero as the observed one (exact up to EXACT_UP_TO values). Its smallest value is 2 / 2^n:
    0.0625 at 5 seeds, 0.031 at 6. nan without values."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return math.nan
    if len(x) <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(x))))
    else:
        signs = np.random.default_rng(0).choice((1.0, -1.0), (2 ** EXACT_UP_TO, len(x)))
        signs[0] = 1.0  # the observed pattern counts, so p is never 0
    observed = abs(x.mean())
    return float((np.abs(signs @ x / len(x)) >= observed - 1e-12 * max(1.0, observed)).mean())


def smallest_p(n: int) -> float:
    """The smallest two-sided sign-flip p-value n seeds can give."""
    return 2 / 2 ** n if n else math.nan


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (nan stays nan and is not counted)."""
    valid = sorted((v, i) for i, v in enumerate(p) if not math.isnan(v))
    out, running = [math.nan] * len(p), 0.0
    for k, (v, i) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - k) * v))
        out[i] = running
    return out


def equivalence(x: np.ndarray, low: float, high: float, alpha: float = 1 - LEVEL) -> dict:
    """Two one-sided t tests that the mean of x lies inside (low, high): the (1 - 2 alpha) t interval, the larger
    of the two one-sided p-values, and whether equivalence is shown (that p below alpha)."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return {"interval": (math.nan, math.nan), "p": math.nan, "shown": False, "margin": (low, high)}
    se = x.std(ddof=1) / math.sqrt(len(x))
    df = len(x) - 1
    if se == 0:
        p = 0.0 if low < x.mean() < high else 1.0
    else:
        p = max(1 - stdtr(df, (x.mean() - low) / se), stdtr(df, (x.mean() - high) / se))
    return {"interval": t_interval(x, 1 - 2 * alpha), "p": float(p), "shown": bool(p < alpha),
            "margin": (low, high)}


def summary(x: np.ndarray, lower_is_better: bool) -> dict:
    """n, mean, the t interval, the bootstrap's (None below BOOTSTRAP_MIN seeds), the seeds ahead (below zero for
    a lower-is-better metric) and the sign-flip p-value of differences x."""
    x = np.asarray(x, dtype=float)
    ahead = int((x < 0).sum() if lower_is_better else (x > 0).sum())
    return {"n": len(x), "mean": float(x.mean()) if len(x) else math.nan, "t": t_interval(x),
            "bootstrap": bootstrap_interval(x) if len(x) >= BOOTSTRAP_MIN else None, "ahead": ahead,
            "p": sign_flip_p(x)}


def descent(curve: dict[int, float]) -> list[tuple[int, float]]:
    """The least-squares non-increasing fit (isotonic regression) of an FID curve up to its lowest point: a single
    noisy dip below a threshold no longer counts as reaching it, and a later rise cannot undo an earlier descent."""
    points = sorted(curve.items())
    points = points[:1 + int(np.argmin([v for _, v in points]))]
    if len(points) < 2:
        return points
    from sklearn.isotonic import IsotonicRegression  # here: the report alone needs it
    fit = IsotonicRegression(increasing=False).fit_transform(np.log([s for s, _ in points]), [v for _, v in points])
    return [(s, float(v)) for (s, _), v in zip(points, fit)]


def time_to_reach(curve: dict[int, float], threshold: float) -> tuple[float, str] | None:
    """(when the curve's descent first reaches `threshold`, linear in log-step between the fitted points around
    it; 'reached'), or censored at an evaluation: (the last, 'never') when it never does, (the first, 'at first') when
    it is already there at the first evaluation. None without evaluations."""
    if not curve:
        return None
    fit = descent(curve)
    for k, (step, value) in enumerate(fit):
        if value <= threshold:
            if k == 0:
                return float(step), "at first"
            s0, v0 = fit[k - 1]
            frac = (v0 - threshold) / (v0 - value)
            return float(math.exp(math.log(s0) + frac * (math.log(step) - math.log(s0)))), "reached"
    return float(max(curve)), "never"


def censored_log_ratio(arm: dict, base: dict, lower_is_better: bool = True) -> dict:
    """Per seed log(arm time / base time), censored times at their evaluation: a run that never reaches the
    threshold counts as reaching it at the last evaluation, one there at the first at the first. Every run shares
    the schedule, so under "the arms do not differ" each seed's pair is exchangeable and the sign-flip test stays
    exact; the interval is that of the censored times, pulled towards 1 by censoring (the counts say how much)."""
    seeds = [s for s in sorted(arm) if s in base and arm[s] and base[s]]
    logs = np.array([math.log(arm[s][0] / base[s][0]) for s in seeds])
    out = summary(logs, lower_is_better)
    out["mean"] = math.exp(out["mean"]) if len(logs) else math.nan
    out["t"] = tuple(math.exp(v) for v in out["t"])
    out["bootstrap"] = tuple(math.exp(v) for v in out["bootstrap"]) if out["bootstrap"] else None
    out["logs"] = logs.tolist()
    out["censored"] = {side: {status: sum(runs[s][1] == status for s in seeds) for status in ("never", "at first")}
                       for side, runs in (("arm", arm), ("baseline", base))}
    return out


def early_mean(curve: dict[int, float], until: int) -> float | None:
    """Area under an FID curve over log-step from its first evaluation to `until`, divided by that log-range: the
    curve's mean over the early steps, each doubling weighted alike. None without two points there."""
    points = sorted((e, v) for e, v in curve.items() if e <= until)
    if len(points) < 2:
        return None
    x = np.log([e for e, _ in points])
    y = np.array([v for _, v in points])
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))
