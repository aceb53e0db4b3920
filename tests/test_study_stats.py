"""study_stats.py against closed forms, hand computations, scipy.stats (an independent implementation) and
simulated studies whose true difference is known."""
import math

import numpy as np
import pytest
import scipy.stats

import study_stats as st


def test_the_t_interval_is_the_textbook_one():
    # [1, 2, 3, 4]: mean 2.5, sd sqrt(5/3), t(0.975, 3) = 3.182446 -> 2.5 -/+ 3.182446 * 1.290994 / 2
    lo, hi = st.t_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    assert lo == pytest.approx(2.5 - 2.054255, abs=1e-5) and hi == pytest.approx(2.5 + 2.054255, abs=1e-5)
    assert all(math.isnan(v) for v in st.t_interval(np.array([1.0])))


def test_the_t_interval_covers_95_percent_and_the_bootstrap_does_not_at_5_seeds():
    # 2,000 simulated studies of 5 seeds, paired differences N(0.3, 1): the share of 95% intervals that hold 0.3.
    # The t interval's coverage is 0.95 exactly (binomial sd 0.005 at 2,000); the percentile bootstrap's is about
    # 0.85 (its half-width about sqrt(4/5) 1.96 / 2.776 = 0.63 of the t interval's)
    x = np.random.default_rng(7).normal(0.3, 1.0, (2000, 5))
    t_cover = np.mean([lo <= 0.3 <= hi for lo, hi in map(st.t_interval, x)])
    boot_cover = np.mean([lo <= 0.3 <= hi for lo, hi in (st.bootstrap_interval(row, resamples=2000) for row in x)])
    assert abs(t_cover - 0.95) <= 0.015, t_cover
    assert 0.80 <= boot_cover <= 0.89, boot_cover


def test_the_bootstrap_of_known_distributions_and_only_from_ten_seeds_in_a_summary():
    # two values 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    assert st.bootstrap_interval(np.array([0.0, 1.0])) == (0.0, 1.0)
    # nine 0s and a 1: a resample's mean is Binomial(10, 0.1) / 10, P(<= 0.2) = 0.930 and P(<= 0.3) = 0.987
    assert st.bootstrap_interval(np.array([0.0] * 9 + [1.0])) == pytest.approx((0.0, 0.3))
    assert st.summary(np.arange(9.0), True)["bootstrap"] is None
    assert st.summary(np.arange(10.0), True)["bootstrap"] is not None


def test_the_sign_flip_p_value_by_hand_and_as_scipy_computes_it():
    assert st.sign_flip_p(np.array([0.5, 1.0, 2.0, 0.1, 3.0])) == pytest.approx(2 / 32)  # all ahead: the floor
    assert st.smallest_p(5) == pytest.approx(0.0625) and st.smallest_p(6) == pytest.approx(2 / 64)
    # [3, 1, 1, 1]: sums of +-3 +-1 +-1 +-1 at least 6 away from 0: all plus, all minus -> 2/16
    assert st.sign_flip_p(np.array([3.0, 1.0, 1.0, 1.0])) == pytest.approx(2 / 16)
    assert st.sign_flip_p(np.array([1.0, -1.0])) == 1.0  # a mean of 0: every pattern is as far
    rng = np.random.default_rng(3)
    for n in (3, 6, 9):
        x = rng.normal(0.4, 1.0, n)
        ref = scipy.stats.permutation_test((x,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                           alternative="two-sided").pvalue
        assert st.sign_flip_p(x) == pytest.approx(ref, abs=1e-9)
    assert st.sign_flip_p(np.full(18, 0.5)) <= 1e-4  # above EXACT_UP_TO: random patterns, the observed one counted


def test_holm_adjusts_step_down_and_keeps_nan():
    # sorted 0.01, 0.03, 0.04 of 3 tests: 0.03, max(0.03, 0.06), max(0.06, 0.04)
    assert st.holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(st.holm([0.5, math.nan])[1]) and st.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def test_equivalence_is_two_one_sided_t_tests():
    x = np.array([0.01, -0.02, 0.015, 0.0, 0.005, -0.01])
    eq = st.equivalence(x, -0.05, 0.05)
    se, df = x.std(ddof=1) / math.sqrt(len(x)), len(x) - 1
    p = max(scipy.stats.t.sf((x.mean() + 0.05) / se, df), scipy.stats.t.cdf((x.mean() - 0.05) / se, df))
    assert eq["p"] == pytest.approx(p, rel=1e-9) and eq["shown"]
    half = scipy.stats.t.ppf(0.95, df) * se  # the 90% interval
    assert eq["interval"] == pytest.approx((x.mean() - half, x.mean() + half))
    assert not st.equivalence(x + 0.04, -0.05, 0.05)["shown"]  # the interval crosses the upper margin


def test_time_to_a_threshold_is_interpolated_on_the_descent_and_censored():
    # from FID 10 at step 1 to 2 at step 4, 6 is half-way in log-step: step 2
    assert st.time_to_reach({1: 10.0, 4: 2.0, 8: 1.0}, 6.0) == pytest.approx((2.0, "reached"))
    assert st.time_to_reach({2: 5.0, 4: 1.0}, 5.0) == (2.0, "at first")
    assert st.time_to_reach({2: 5.0, 4: 3.0, 8: 3.5}, 1.0) == (8.0, "never")  # censored at the last evaluation
    # a single noisy dip (0.98 at 2, then 1.3) does not count: the fit pools 0.98 and 1.3 to 1.14, so the crossing
    # lies between 4 (1.14) and 8 (0.9): 4 * 2^((1.14 - 1) / (1.14 - 0.9))
    assert st.time_to_reach({1: 5.0, 2: 0.98, 4: 1.3, 8: 0.9}, 1.0)[0] == pytest.approx(4 * 2 ** (0.14 / 0.24))
    # a rise after the lowest point cannot undo the descent: 2 * 2^((3 - 1) / (3 - 0.9))
    assert st.time_to_reach({1: 5.0, 2: 3.0, 4: 0.9, 8: 0.95, 16: 1.2}, 1.0)[0] == pytest.approx(2 * 2 ** (2 / 2.1))


def test_the_ratio_keeps_censored_runs_at_their_evaluation():
    arm = {0: (2.0, "reached"), 1: (8.0, "reached"), 2: (21.0, "never"), 3: (1.0, "at first")}
    base = {0: (4.0, "reached"), 1: (4.0, "reached"), 2: (3.0, "reached"), 3: (1.0, "at first")}
    s = st.censored_log_ratio(arm, base)
    assert s["logs"] == pytest.approx([math.log(0.5), math.log(2), math.log(7), 0.0])
    assert s["mean"] == pytest.approx(7 ** 0.25) and s["n"] == 4 and s["ahead"] == 1
    assert s["censored"] == {"arm": {"never": 1, "at first": 1}, "baseline": {"never": 0, "at first": 1}}


def test_the_early_mean_is_the_trapezoid_area_over_log_steps_divided_by_their_range():
    # steps 1, 2, 4 at 4, 2, 2 (and 8, past the limit): (3 log 2 + 2 log 2) / log 4 = 2.5
    assert st.early_mean({1: 4.0, 2: 2.0, 4: 2.0, 8: 100.0}, until=4) == pytest.approx(2.5)
    assert st.early_mean({1: 4.0, 8: 1.0}, until=4) is None
