"""study_report.py: the intervals, the endpoints and the report against closed forms and hand computations."""
import json
import math

import numpy as np
import pytest

import study_report
from study_run import Task


def test_the_t_interval_is_the_textbook_one():
    # [1, 2, 3, 4]: mean 2.5, sd sqrt(5/3), t(0.975, 3) = 3.182446 -> 2.5 -/+ 3.182446 * 1.290994 / 2
    lo, hi = study_report.t_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    assert lo == pytest.approx(2.5 - 2.054255, abs=1e-5) and hi == pytest.approx(2.5 + 2.054255, abs=1e-5)
    assert all(math.isnan(v) for v in study_report.t_interval(np.array([1.0])))


def test_the_bootstrap_of_known_distributions():
    # two values 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles of the resampled means are 0 and 1
    assert study_report.bootstrap_interval(np.array([0.0, 1.0])) == (0.0, 1.0)
    # nine 0s and a 1: a resample's mean is Binomial(10, 0.1) / 10, P(<= 0.2) = 0.930 and P(<= 0.3) = 0.987, so
    # the 97.5% quantile is 0.3 (a resample of 9 would give 1/3)
    assert study_report.bootstrap_interval(np.array([0.0] * 9 + [1.0])) == pytest.approx((0.0, 0.3))
    # a large normal sample: the bootstrap interval of the mean approaches mean -/+ 1.96 sd / sqrt(n)
    x = np.random.default_rng(1).normal(3.0, 2.0, 400)
    lo, hi = study_report.bootstrap_interval(x)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)


def test_epochs_to_a_threshold_are_interpolated_on_log_epochs():
    # from FID 10 at epoch 1 to 2 at epoch 4, 6 is half-way: log-epoch half-way between 0 and log 4, epoch 2
    assert study_report.epochs_to_reach({1: 10.0, 4: 2.0, 8: 1.0}, 6.0) == pytest.approx(2.0)
    assert study_report.epochs_to_reach({2: 5.0, 4: 1.0}, 5.0) == 2.0  # reached at the first evaluation
    assert study_report.epochs_to_reach({2: 5.0, 4: 3.0}, 1.0) is None  # never


def test_the_early_mean_is_the_trapezoid_area_over_log_epochs_divided_by_their_range():
    # epochs 1, 2, 4 at 4, 2, 2 (and 8, past the limit): (3 log 2 + 2 log 2) / log 4 = 2.5
    assert study_report.early_mean({1: 4.0, 2: 2.0, 4: 2.0, 8: 100.0}, until=4) == pytest.approx(2.5)
    assert study_report.early_mean({1: 4.0, 8: 1.0}, until=4) is None


def test_the_ratio_of_epochs_is_a_geometric_mean_and_counts_the_runs_that_never_reach_it():
    s = study_report.summary_log_ratio({0: 2.0, 1: 8.0, 2: None}, {0: 4.0, 1: 4.0, 2: 3.0})
    assert s["mean"] == pytest.approx(1.0) and s["n"] == 2 and s["never"] == {"arm": 1, "baseline": 0}


def write_run(run_dir, records):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "epoch", "epoch": 1, "loss": 0.5}) + "\n")
        for epoch, fid, accuracy, per_class in records:
            f.write(json.dumps({"event": "fid", "epoch": epoch, "value": fid, "class_accuracy": accuracy, "n": 100,
                                "w": 1.8, "seed": 0, "per_class": per_class}) + "\n")
        # another evaluation (other image count) of the same epoch: not this study's
        f.write(json.dumps({"event": "fid", "epoch": 1, "value": 99.0, "n": 50, "w": 1.8, "seed": 0}) + "\n")


def test_the_report_pairs_by_seed_and_keeps_class_0_apart(tmp_path):
    study = {"path": "s.toml", "dataset": "digits", "out": str(tmp_path / "out"), "train_seeds": [0, 1, 2],
             "arms": {"base": "--mode regular", "proto": "--mode proto_frozen"}, "eval_classifier": {"seed": 1},
             "evaluation": {"images": 100, "w": 1.8, "seed": 0},
             "endpoints": {"baselines": ["base"], "fid_threshold": 3.0, "early_until": 4}}
    base = {0: [8.0, 4.0, 2.0], 1: [6.0, 4.0, 2.0], 2: [7.0, 5.0, 1.0]}
    proto = {0: [6.0, 2.0, 1.0], 1: [6.0, 3.0, 1.0], 2: [7.0, 2.0, 1.0]}
    runs = []
    for arm, curves in (("base", base), ("proto", proto)):
        for seed, fids in curves.items():
            per_class = {"classes": [0, 1, 2], "kid": [fids[0] / 10, 0.1, 0.3], "class_accuracy": [0.1, 0.5, 0.7]}
            write_run(tmp_path / f"{arm}-s{seed}", [(e, f, 0.5, per_class) for e, f in zip((1, 2, 4), fids)])
            runs.append(Task(f"{arm}-s{seed}", [], "run", arm=arm, seed=seed, run_dir=str(tmp_path / f"{arm}-s{seed}")))
    line = study_report.write_report(study, runs)
    assert line.startswith("report of 6/6 runs with scores")
    text = (tmp_path / "out" / "report.md").read_text()
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    # epoch 2, proto minus base per seed: -2, -1, -3: mean -2, sd 1, t interval -2 -/+ 4.302653 / sqrt(3)
    cell = result["paired"]["fid"]["base"]["proto"]["2"]
    assert cell["mean"] == pytest.approx(-2.0) and cell["n"] == 3 and cell["ahead"] == 3
    assert cell["t"] == pytest.approx([-2 - 4.302653 / math.sqrt(3), -2 + 4.302653 / math.sqrt(3)], abs=1e-5)
    assert cell["bootstrap"][0] >= -3 and cell["bootstrap"][1] <= -1  # resampled means of {-1, -2, -3}
    assert "| 2 | -2.000 [-4.484, +0.484] [" in text and "## FID: mean over seeds" in text  # Inception: FID
    # epoch 1 had a record of another evaluation (99.0): the base curve's mean stays (8 + 6 + 7) / 3
    assert result["curves"]["fid"]["base"]["1"]["mean"] == pytest.approx(7.0)
    # class 0 apart: its KID is FID / 10 here, the other classes' mean (0.1 + 0.3) / 2 for every run
    assert result["curves"]["fid_class0"]["proto"]["1"]["mean"] == pytest.approx(19 / 30)
    assert result["curves"]["fid_others"]["base"]["4"]["mean"] == pytest.approx(0.2)
    assert result["curves"]["accuracy_class0"]["base"]["4"]["mean"] == pytest.approx(10.0)
    # epochs to FID <= 3: base 2 * 2^((4-3)/(4-2)) = 2.83 (seed 0), ...; proto 1 * 2^((6-3)/4) = 1.68, ...
    reach = result["endpoints"]["epochs_to_threshold"]["per_seed"]
    assert reach["base"]["0"] == pytest.approx(2 * 2 ** 0.5) and reach["proto"]["0"] == pytest.approx(2 ** 0.75)
    assert reach["base"]["2"] == pytest.approx(2 * 2 ** (2 / 4))  # 5 at 2, 1 at 4: (5 - 3) / (5 - 1)
    # the early mean up to epoch 4 of base seed 0: ((8 + 4) / 2 + (4 + 2) / 2) * log 2 / log 4 = 4.5
    assert result["endpoints"]["early_mean_fid"]["per_seed"]["base"]["0"] == pytest.approx(4.5)
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000
