"""experiment_report.py: paired differences and steps to threshold against hand computations."""
import json

from conftest import run_program


def write_run(path, mode, norm, seed, accuracies, fids, **table):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"mode": mode, "proto_norm": norm, "seed": seed, **table}))
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
    r = run_program("experiment_report.py", [*map(str, sorted(runs.iterdir())), "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    # step 168: accuracy differences +10 and +20 points -> +15.0 ± 7.1, ahead on 2/2; FID -0.5, -0.5 -> 2/2 ahead
    assert "| 168 | +15.0 ± 7.1 (2/2) / -0.50 ± 0.00 (2/2) |" in table
    # step 84: -10 and +10 points -> +0.0 ± 14.1, ahead on 1 of 2; FID +0.5 and -1.0 -> -0.25 ± 1.06, ahead on 1
    assert "| 84 | +0.0 ± 14.1 (1/2) / -0.25 ± 1.06 (1/2) |" in table
    # 50%: regular reaches it at 168 (seed 0) and never (seed 1); the arm at 168 and 168
    assert "| regular | 168, - / 168 / 1 |" in table and "| proto_frozen @ norm default | 168, 168 / 168 / 0 |" in table
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_arms_are_named_by_source_and_file_and_each_baseline_gets_a_table(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in ((0, 0.2), (1, 0.4)):
        write_run(runs / f"r{seed}", "regular", "keep", seed, [acc], [2.0])
        write_run(runs / f"c{seed}", "proto_frozen", "default", seed, [acc + 0.1], [1.5], path_proto="x/a.pt")
        write_run(runs / f"m{seed}", "proto_frozen", "default", seed, [acc + 0.3 * seed], [1.0],
                  path_proto="x/a.pt", proto_source="means")
        write_run(runs / f"b{seed}", "proto_frozen", "default", seed, [acc], [2.0], path_proto="x/b.pt")
        write_run(runs / f"x{seed}", "random_scaled", "default", seed, [acc + 0.05], [1.9], path_proto="x/a.pt")
    means, rnd = "proto_frozen means @ norm default [a]", "random_scaled @ norm default [a]"
    r = run_program("experiment_report.py", [*map(str, sorted(runs.iterdir())), "--out", str(tmp_path / "out"),
                                             "--baseline", "regular", rnd])
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    assert ("| step | regular | proto_frozen @ norm default [a] | proto_frozen @ norm default [b] | "
            f"{means} | {rnd} |") in table
    to_regular, to_random = table.split("arm minus regular")[1], table.split(f"arm minus {rnd}")[1]
    # means minus regular: +0 and +30 points -> +15.0 ± 21.2, ahead on 1 of 2; FID -1.0 twice
    assert "| 84 | +10.0 ± 0.0 (2/2) / -0.50 ± 0.00 (2/2) | +0.0 ± 0.0 (0/2) / +0.00 ± 0.00 (0/2) | " \
           "+15.0 ± 21.2 (1/2) / -1.00 ± 0.00 (2/2) | +5.0 ± 0.0 (2/2) / -0.10 ± 0.00 (2/2) |" in to_regular
    # to random directions: regular -5 points and +0.1 FID; means -5 and +25 points -> +10.0 ± 21.2
    assert "| 84 | -5.0 ± 0.0 (0/2) / +0.10 ± 0.00 (0/2) | +5.0 ± 0.0 (2/2) / -0.40 ± 0.00 (2/2) | " \
           "-5.0 ± 0.0 (0/2) / +0.10 ± 0.00 (0/2) | +10.0 ± 21.2 (1/2) / -0.90 ± 0.00 (2/2) |" in to_random
    r = run_program("experiment_report.py", [str(runs / "r0"), "--baseline", "regular", "nothing"])
    assert r.returncode == 2 and "--baseline 'nothing' is none of the arms found: regular" in r.stderr


def test_one_class_against_the_mean_of_the_others_and_compat_arms(tmp_path):
    import experiment_report
    for name, compat in (("r", "none"), ("p", "padding_idx")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"mode": "regular", "seed": 0, "compat": compat}))
        figures = {"n": [5, 5, 5], "fid": [1.0, 2.0, None], "class_accuracy": [0.1, 0.5, 0.9]}
        (run / "metrics.jsonl").write_text(json.dumps({"event": "fid", "epoch": 3, "step": 84, "value": 0.3,
                                                       "class_accuracy": 0.5, "per_class": figures}) + "\n")
    runs = [str(tmp_path / "r"), str(tmp_path / "p")]
    assert experiment_report.collect(runs, class_index=0)["regular --compat padding_idx"][0][84] == (1.0, 0.1, 3)
    fid, accuracy, _ = experiment_report.collect(runs, other_classes=0)["regular"][0][84]
    assert accuracy == 0.7 and fid != fid  # the mean of 0.5 and 0.9; a class without an FID makes the mean NaN
