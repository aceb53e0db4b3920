"""Which records are a study's: the fid records of its whole evaluation (image count, w, sampling seed, sampler
and its steps, feature space, weights, labels) scored by its evaluation classifier (by the content of its file,
so that a rescore with another classifier at the same path is no longer the study's), gathered per arm, training
seed and scored point; any other record is left out and counted. The real-vs-real floor is the records of real
test images (sample.py --real True) scored by the same evaluation. Read by study_report.py.
"""
import argparse
import json
import os
import shlex

import numpy as np

from cli import UserError, file_digest, str2bool

# metric key -> (label, lower is better)
METRICS = {"fid": ("FID", True), "accuracy": ("class accuracy %", False),
           "kid_class0": ("class 0: KID", True), "accuracy_class0": ("class 0: accuracy %", False),
           "kid_others": ("other classes: KID (mean)", True),
           "accuracy_others": ("other classes: accuracy % (mean)", False)}


def axis(study: dict) -> str:
    """What a study's scored points are: global steps where it declares early_steps (epoch ends then count by their
    step too), else epochs."""
    return "step" if study.get("early_steps") else "epoch"


def expected_evaluation(study: dict) -> dict:
    """The fields every fid record of this study's evaluation has, as evaluate.fid_record writes them."""
    ev = study["evaluation"]
    flags = argparse.ArgumentParser(add_help=False)  # sample.py's defaults for the sampler flags a study gives
    flags.add_argument("--ddim", type=str2bool, default=False)
    flags.add_argument("--num_steps", type=int, default=50)
    flags.add_argument("--eta", type=float, default=0.0)
    flags.add_argument("--select", default="linear")
    flags.add_argument("--T", type=int, default=1000)
    sampler = flags.parse_known_args(shlex.split(ev.get("sampler", "")))[0]
    T = flags.parse_known_args(shlex.split(study.get("train", "")))[0].T
    return {"n": ev["images"], "w": ev.get("w", 1.8), "seed": ev.get("seed", 0),
            "sampler": "ddim" if sampler.ddim else "ddpm", "steps": sampler.num_steps if sampler.ddim else T,
            "eta": sampler.eta if sampler.ddim else None, "select": sampler.select if sampler.ddim else None,
            "weights": ev.get("weights", "ema"), "label": "range", "features": ev.get("features", "inception")}


def scorer(record: dict) -> str:
    """Which network made a record's features: inception, or the evaluation classifier's file digest (older records:
    its file name)."""
    features = record.get("features", "inception")
    if features == "inception":
        return "inception"
    return record.get("classifier_sha1") or os.path.basename(features.partition(" ")[2])


def matches(record: dict, expected: dict) -> bool:
    """Whether a fid record was made by the study's evaluation (all but the scoring network's identity)."""
    kind = record.get("features", "inception").split(" ")[0]
    return kind == expected["features"] and all(record.get(k) == v for k, v in expected.items() if k != "features")


def record_values(record: dict) -> dict[str, float]:
    """The metrics of one fid record: FID, class accuracy and, with per-class figures, class 0 and the rest."""
    out = {"fid": record["value"]}
    if "class_accuracy" in record:
        out["accuracy"] = 100 * record["class_accuracy"]
    figures = record.get("per_class")
    if figures and figures.get("classes", [0])[0] == 0 and len(figures.get("classes", [])) > 1:
        for key, name, scale in (("kid", "kid", 1), ("accuracy", "class_accuracy", 100)):
            values = [v * scale for v in (figures.get(name) or []) if v is not None]
            if len(values) > 1 and figures[name][0] is not None:
                out[f"{key}_class0"], out[f"{key}_others"] = values[0], float(np.mean(values[1:]))
    return out


def read_records(run_dir: str) -> list[dict]:
    """A run's fid records, in order (a line torn by a crash skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records = []
    for line in open(path) if os.path.isfile(path) else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if r.get("event") == "fid"]


def collect(runs: list, study: dict, classifier_file: str | None = None) -> tuple[dict, dict]:
    """({metric: {arm: {training seed: {point: value}}}} (points: epochs or steps, `axis`), the mean over classifier seeds present at an epoch, and
    what was read: the scoring network and the records of other evaluations left out). The scoring network is the
    evaluation classifier's file when it is here, else the one network all matching records share."""
    expected = expected_evaluation(study)
    want = "inception" if expected["features"] == "inception" else None
    if want is None and classifier_file and os.path.isfile(classifier_file):
        want = file_digest(classifier_file)[:12]
    records = [(task, r) for task in runs for r in read_records(task.run_dir)]
    mine = [(task, r) for task, r in records if matches(r, expected)]
    if want is None:
        found = sorted({scorer(r) for _, r in mine})
        if len(found) > 1:
            raise UserError(f"the study's records were scored by {len(found)} evaluation classifiers "
                            f"({', '.join(found)}) and {classifier_file} is not there to say which is the study's")
        want = found[0] if found else None
    by_seed, scored, point = {}, set(), axis(study)
    for task, r in mine:
        if scorer(r) == want:
            scored.add(task.run_dir)
            for metric, v in record_values(r).items():
                by_seed.setdefault(metric, {}).setdefault(task.arm, {}).setdefault(task.seed, {}) \
                    .setdefault(r[point], {})[task.classifier_seed] = v  # a rescore replaces
    floors = [r for _, r in records if r.get("sampler") == "real" and r.get("n") == expected["n"] and
              r.get("label") == expected["label"] and scorer(r) == want]
    floor = {m: float(np.mean(v)) for m in METRICS if (v := [record_values(r)[m] for r in floors
                                                               if m in record_values(r)])}
    used = sum(scorer(r) == want for _, r in mine)
    data = {m: {a: {s: {e: float(np.mean(list(v.values()))) for e, v in c.items()} for s, c in seeds.items()}
                for a, seeds in arms.items()} for m, arms in by_seed.items()}
    return data, {"scorer": want, "expected": expected, "used": used, "left_out": len(records) - used - len(floors),
                  "scored_runs": len(scored), "floor": floor, "floor_records": len(floors),
                  "floor_split": ", ".join(sorted({str(r.get("split")) for r in floors})) or "test"}
