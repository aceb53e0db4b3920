"""experiment_report.py: paired differences and steps to threshold against hand computations."""
import json
import os
import subprocess
import sys

from conftest import ROOT, run_env


def write_run(path, mode, norm, seed, accuracies, fids):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"mode": mode, "proto_norm": norm, "seed": seed}))
    with open(path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "epoch", "epoch": 1, "step": 28, "loss": 0.5}) + "\n")
        for k, (a, v) in enumerate(zip(accuracies, fids)):
            f.write(json.dumps({"event": "fid", "epoch": 3 * (k + 1), "step": 84 * (k + 1), "value": v,
                                "class_accuracy": a}) + "\n")


def test_paired_differences_and_steps_to_threshold(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "r0", "regular", "keep", 0, [0.2, 0.6], [3.0, 1.0])
    write_run(runs / "r1", "regular", "keep", 1, [0.3, 0.4], [2.0, 2.0])
    write_run(runs / "p0", "proto_frozen", "default", 0, [0.1, 0.7], [3.5, 0.5])
    write_run(runs / "p1", "proto_frozen", "default", 1, [0.4, 0.6], [1.0, 1.5])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiment_report.py"), *map(str, sorted(runs.iterdir())),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=run_env())
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    # step 168: accuracy differences +10 and +20 points -> +15.0 ± 7.1, ahead on 2/2; FID -0.5, -0.5 -> 2/2 ahead
    assert "| 168 | +15.0 ± 7.1 (2/2) / -0.50 ± 0.00 (2/2) |" in table
    # step 84: -10 and +10 points -> +0.0 ± 14.1, ahead on 1 of 2; FID +0.5 and -1.0 -> -0.25 ± 1.06, ahead on 1
    assert "| 84 | +0.0 ± 14.1 (1/2) / -0.25 ± 1.06 (1/2) |" in table
    # 50%: regular reaches it at 168 (seed 0) and never (seed 1); the arm at 168 and 168
    assert "| regular | 168, - / 168 / 1 |" in table and "| proto_frozen @ norm default | 168, 168 / 168 / 0 |" in table
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
