"""study_report.py and study_records.py: a report from hand-made records, checked against hand computations; the
records of other evaluations left out."""
import json
import math

import pytest

import study_report
from study_run import Task


STUDY = {"path": "s.toml", "dataset": "digits", "train_seeds": [0, 1, 2], "train": "--modch 32",
         "arms": {"base": "--mode regular", "proto": "--mode proto_frozen"}, "eval_classifier": {"seed": 1},
         "evaluation": {"images": 100, "w": 1.8, "seed": 0, "sampler": "--ddim True --num_steps 20 --genbatch 100",
                        "features": "classifier"},
         "endpoints": {"baselines": ["base"], "fid_threshold": 3.0, "early_until": 4,
                       "equivalence": {"early_mean": 5.0, "ratio": 1.5}}}


def record(epoch, value, **changes):
    """A fid record as evaluate.fid_record writes it for STUDY's evaluation, with `changes`."""
    r = {"event": "fid", "epoch": epoch, "step": 10 * epoch, "metric": "proto-FID", "value": value, "n": 100,
         "sampler": "ddim", "steps": 20, "eta": 0.0, "select": "linear", "w": 1.8, "weights": "ema",
         "compat": "none", "label": "range", "seed": 0, "reference": "/elsewhere/ref.npz",
         "features": "classifier /elsewhere/eval_classifier-c1.pt", "classifier_sha1": "aaaaaaaaaaaa"}
    return r | changes


OTHER_EVALUATIONS = [{"n": 50}, {"w": 0.0}, {"seed": 1}, {"sampler": "ddpm", "steps": 1000, "eta": None,
                                                           "select": None}, {"steps": 50}, {"weights": "raw"},
                     {"features": "inception"}, {"label": "random"}]


def write_run(run_dir, records, other=True):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "epoch", "epoch": 1, "loss": 0.5}) + "\n")
        for epoch, fid, accuracy, per_class in records:
            f.write(json.dumps(record(epoch, fid, class_accuracy=accuracy, per_class=per_class)) + "\n")
        for change in OTHER_EVALUATIONS if other else []:  # the same epoch, another evaluation: not the study's
            f.write(json.dumps(record(1, 99.0, **change)) + "\n")
        f.write('{"event": "fid", "epo')  # a line torn by a crash


def test_the_report_pairs_by_seed_tests_the_declared_endpoints_and_keeps_class_0_apart(tmp_path):
    study = STUDY | {"out": str(tmp_path / "out")}
    base = {0: [8.0, 4.0, 2.0], 1: [6.0, 4.0, 2.0], 2: [7.0, 5.0, 1.0]}
    proto = {0: [6.0, 2.0, 1.0], 1: [6.0, 3.0, 1.0], 2: [7.0, 2.0, 1.0]}
    runs = []
    for arm, curves in (("base", base), ("proto", proto)):
        for seed, fids in curves.items():
            per_class = {"classes": [0, 1, 2], "kid": [fids[0] / 10, 0.1, 0.3], "class_accuracy": [0.1, 0.5, 0.7],
                         "fid": [None, 1.0, 2.0]}  # per-class FID: not read (KID is)
            write_run(tmp_path / f"{arm}-s{seed}", [(e, f, 0.5, per_class) for e, f in zip((1, 2, 4), fids)])
            runs.append(Task(f"{arm}-s{seed}", [], "run", arm=arm, seed=seed, run_dir=str(tmp_path / f"{arm}-s{seed}")))
    line = study_report.write_report(study, runs, str(tmp_path / "no-classifier.pt"))
    assert line.startswith("report of 6/6 runs with scores")
    text = (tmp_path / "out" / "report.md").read_text()
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    # epoch 2, proto minus base per seed: -2, -1, -3: mean -2, sd 1, t interval -2 -/+ 4.302653 / sqrt(3)
    cell = result["paired"]["fid"]["base"]["proto"]["2"]
    assert cell["mean"] == pytest.approx(-2.0) and cell["n"] == 3 and cell["ahead"] == 3
    assert cell["t"] == pytest.approx([-2 - 4.302653 / math.sqrt(3), -2 + 4.302653 / math.sqrt(3)], abs=1e-5)
    assert cell["bootstrap"] is None and cell["p"] == pytest.approx(2 / 8)  # 3 seeds: no bootstrap; all ahead
    assert "| 2 | -2.000 [-4.484, +0.484] 3/3 |" in text and "### proto-FID: mean over seeds" in text
    # epoch 1 had records of 8 other evaluations (99.0): the base curve's mean stays (8 + 6 + 7) / 3
    assert result["curves"]["fid"]["base"]["1"]["mean"] == pytest.approx(7.0)
    assert "18 records of it read, 48 of other evaluations left out" in text
    # class 0 apart: its KID is FID / 10 here, the other classes' mean (0.1 + 0.3) / 2 for every run
    assert result["curves"]["kid_class0"]["proto"]["1"]["mean"] == pytest.approx(19 / 30)
    assert result["curves"]["kid_others"]["base"]["4"]["mean"] == pytest.approx(0.2)
    assert result["curves"]["accuracy_class0"]["base"]["4"]["mean"] == pytest.approx(10.0)
    # steps to proto-FID <= 3 (curves already non-increasing): base 2 * 2^((4-3)/(4-2)) (seed 0), ...; proto
    # 1 * 2^((6-3)/4), ...
    reach = result["per_run"]["steps_to_threshold"]
    assert reach["base"]["0"] == pytest.approx([2 * 2 ** 0.5, "reached"])
    assert reach["proto"]["0"] == pytest.approx([2 ** 0.75, "reached"])
    assert reach["base"]["2"][0] == pytest.approx(2 * 2 ** (2 / 4))  # 5 at 2, 1 at 4: (5 - 3) / (5 - 1)
    # the early mean up to epoch 4 of base seed 0: ((8 + 4) / 2 + (4 + 2) / 2) * log 2 / log 4 = 4.5
    assert result["per_run"]["early_mean"]["base"]["0"] == pytest.approx(4.5)
    ratio, early = result["tests"]
    assert ratio["endpoint"] == "steps_to_threshold" and (ratio["arm"], ratio["baseline"]) == ("proto", "base")
    # proto seed 1: 3 at 2, reached there; seed 2: 7 at 1, 2 at 2: 2^((7-3)/(7-2)); every base seed 2 * 2^0.5
    logs = [math.log(t / (2 * 2 ** 0.5)) for t in (2 ** 0.75, 2.0, 2 ** 0.8)]
    assert ratio["logs"] == pytest.approx(logs) and ratio["ahead"] == 3 and ratio["p"] == pytest.approx(0.25)
    assert early["p"] == pytest.approx(0.25) and early["holm"] == pytest.approx(0.5)  # 2 tests: 2 x 0.25
    assert early["equivalence"]["margin"] == [-5.0, 5.0] and ratio["equivalence"]["margin"] == pytest.approx(
        [1 / 1.5, 1.5])
    assert "## Declared tests: 2, Holm-corrected across all of them" in text
    assert "with 3 seeds the smallest is 0.2500, so a Holm-adjusted p below 0.05 needs at most 0 tests" in text
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000
    # one endpoint declared as the test: Holm over it alone, the other endpoint's comparison exploratory
    study["endpoints"] = study["endpoints"] | {"declared": ["early_mean"]}
    study_report.write_report(study, runs, str(tmp_path / "no-classifier.pt"))
    ratio, early = json.loads((tmp_path / "out" / "report.json").read_text())["tests"]
    assert not ratio["declared"] and "holm" not in ratio and early["holm"] == pytest.approx(early["p"])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Declared tests: 1, Holm" in text and "Exploratory (an endpoint not declared as a test" in text


def test_the_records_of_another_evaluation_classifier_are_not_the_study_s(tmp_path):
    from cli import UserError
    study = STUDY | {"out": str(tmp_path / "out")}
    clf = tmp_path / "eval_classifier-c1.pt"
    clf.write_bytes(b"the evaluation classifier")
    from cli import file_digest
    mine = file_digest(str(clf))[:12]
    runs = []
    for seed in (0, 1):
        run_dir = tmp_path / f"base-s{seed}"
        write_run(run_dir, [], other=False)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write("\n" + json.dumps(record(1, 5.0 + seed, classifier_sha1=mine)) + "\n")
            f.write(json.dumps(record(2, 1.0)) + "\n")  # a rescore by another classifier (same path)
        runs.append(Task(f"base-s{seed}", [], "run", arm="base", seed=seed, run_dir=str(run_dir)))
    study_report.write_report(study, runs, str(clf))
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(result["curves"]["fid"]["base"]) == ["1"] and result["curves"]["fid"]["base"]["1"]["mean"] == 5.5
    with pytest.raises(UserError, match="scored by 2 evaluation classifiers"):  # no file to say which
        study_report.write_report(study, runs, str(tmp_path / "gone.pt"))


def test_the_published_digits_study_rebuilds_from_its_records_on_a_fresh_clone(tmp_path, monkeypatch):
    import os
    import shutil
    from conftest import ROOT, run_program
    published = os.path.join(ROOT, "docs", "results", "digits_study3")
    shutil.copytree(published, tmp_path / "study")
    for made in ("report.md", "report.json", "report.png"):
        os.remove(tmp_path / "study" / made)
    monkeypatch.chdir(ROOT)  # the report names its study file as given
    r = run_program("study.py", ["studies/digits_study3.toml", "--set", f"out={tmp_path / 'study'}", "--task", "report"])
    assert r.returncode == 0 and "report of 20/20 runs with scores" in r.stdout, r.stderr
    assert (tmp_path / "study" / "report.json").read_text() == open(os.path.join(published, "report.json")).read()
    assert (tmp_path / "study" / "report.md").read_text() == open(os.path.join(published, "report.md")).read()
