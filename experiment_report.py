"""Summarise runs of several arms and seeds: mean and spread per evaluation, differences paired by seed to each
arm --baseline names (`regular` by default), steps to an accuracy threshold, and plots.

    python experiment_report.py results/digits_experiment/runs/* --out results/digits_experiment
An arm is a run's --mode, plus its --proto_source when not `centres`, its --proto_norm when not `keep`, and the
prototype file's name when the runs use several (e.g. `proto_frozen means @ norm default [classifier]`).
Reads each run's config.json (mode, proto_source, proto_norm, path_proto, seed) and the `fid` records of its
metrics.jsonl.
"""
import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cli import ANY, Rule, UserError, at_least, check_flags, run_cli, unset_or  # noqa: E402

MODE_ORDER = ["regular", "proto_frozen", "proto_unfrozen", "random_scaled", "proto_shuffled"]


def arm_of(cfg: dict, with_file: bool) -> str:
    """The arm a run belongs to, named by the flags that set its class table."""
    name = cfg["mode"]
    if cfg.get("proto_source", "centres") != "centres":
        name += f" {cfg['proto_source']}"
    if cfg.get("proto_norm", "keep") != "keep":
        name += f" @ norm {cfg['proto_norm']}"
    if cfg.get("compat", "none") != "none":
        name += f" --compat {cfg['compat']}"
    if with_file and cfg["mode"] != "regular":
        name += f" [{os.path.splitext(os.path.basename(cfg['path_proto']))[0]}]"
    return name


def point(record: dict, class_index: int | None, other_classes: int | None = None) -> tuple[float, float, int]:
    """(proto-FID, class accuracy, epoch) of a `fid` record, of its class `class_index`'s per-class figures, or the
    mean of the per-class figures of every class but `other_classes`."""
    if class_index is None and other_classes is None:
        return record["value"], record.get("class_accuracy", float("nan")), record["epoch"]
    figures = record["per_class"]
    fids = [float("nan") if v is None else v for v in figures["fid" if "fid" in figures else "kid"]]
    accuracies = [float("nan") if v is None else v for v in figures.get("class_accuracy", [None] * len(fids))]
    if class_index is not None:
        return fids[class_index], accuracies[class_index], record["epoch"]
    rest = [c for c in range(len(fids)) if c != other_classes]
    return float(np.mean([fids[c] for c in rest])), float(np.mean([accuracies[c] for c in rest])), record["epoch"]


def collect(run_dirs: list[str], class_index: int | None = None, other_classes: int | None = None) -> dict:
    """{arm: {seed: {step: (proto-FID, accuracy, epoch)}}}, of one class with class_index, of the mean over the
    others with other_classes."""
    per_class = class_index is not None or other_classes is not None
    found = []
    for run in run_dirs:
        cfg_path, metrics = os.path.join(run, "config.json"), os.path.join(run, "metrics.jsonl")
        if not (os.path.isfile(cfg_path) and os.path.isfile(metrics)):
            raise UserError(f"{run} is not a finished run dir (config.json and metrics.jsonl)")
        points = {r["step"]: point(r, class_index, other_classes) for r in map(json.loads, open(metrics))
                  if r.get("event") == "fid" and r.get("step") is not None and (not per_class or "per_class" in r)}
        if points:
            found.append((json.load(open(cfg_path)), points))
    if not found:
        raise UserError("no FID records found in the given runs" + (" with per-class figures (--per_class True)"
                                                                    if per_class else ""))
    with_file = len({cfg.get("path_proto") for cfg, _ in found if cfg["mode"] != "regular"}) > 1
    runs = defaultdict(dict)
    for cfg, points in found:
        runs[arm_of(cfg, with_file)][cfg["seed"]] = points
    return runs


def order(arms) -> list[str]:
    """Arms by mode in MODE_ORDER, each mode's own-norm arm before its rescaled ones."""
    def key(arm: str):
        mode = arm.split()[0]
        return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), " @ " in arm, arm)
    return sorted(arms, key=key)


def first_step_reaching(points: dict, threshold: float) -> int | None:
    """First evaluation step at which class accuracy reaches `threshold` (None: never)."""
    return next((s for s in sorted(points) if points[s][1] >= threshold), None)


def mean_sd(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    **{flag: unset_or(at_least(0), "all classes together") for flag in ("class_index", "other_classes")},
    "thresholds": Rule(lambda v: len(v) > 0 and all(0 <= x <= 1 for x in v), "class accuracies in [0, 1]", "2"),
    **{flag: ANY for flag in ("runs", "out", "baseline", "title")},  # run dirs and the arm are checked when read
}


def paired(runs: dict, arms: list[str], base: str, steps: list[int]) -> tuple[list[str], dict]:
    """Markdown lines of each arm minus `base` paired by seed, and {arm: {step: (accuracy points, FID)}}."""
    others = [a for a in arms if a != base]
    lines = ["", f"## Paired by seed, arm minus {base}: class accuracy points / proto-FID "
                 f"(mean ± sd; seeds where the arm is ahead)", "",
             "| step | " + " | ".join(others) + " |", "|---" * len(arms) + "|"]
    diffs = {}
    for s in steps:
        cells = []
        for a in others:
            seeds = [k for k in runs[a] if k in runs[base] and s in runs[a][k] and s in runs[base][k]]
            d = np.array([np.subtract(runs[a][k][s][:2], runs[base][k][s][:2]) for k in seeds])
            diffs.setdefault(a, {})[s] = (100 * d[:, 1], d[:, 0])
            (acc, accsd), (f, fsd) = mean_sd(100 * d[:, 1]), mean_sd(d[:, 0])
            cells.append(f"{acc:+.1f} ± {accsd:.1f} ({(d[:, 1] > 0).sum()}/{len(d)}) / "
                         f"{f:+.2f} ± {fsd:.2f} ({(d[:, 0] < 0).sum()}/{len(d)})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines, diffs


def main(args: argparse.Namespace) -> None:
    check_flags(args, FLAG_RULES)
    if args.class_index is not None and args.other_classes is not None:
        raise UserError("give --class_index or --other_classes, not both")
    runs = collect(args.runs, args.class_index, args.other_classes)
    arms = order(runs)
    for base in args.baseline:
        if base not in runs and base != "regular":  # without the default arm the report simply has no paired table
            raise UserError(f"--baseline '{base}' is none of the arms found: {', '.join(arms)}")
    bases = [base for base in args.baseline if base in runs]
    steps = sorted({s for a in arms for seed in runs[a] for s in runs[a][seed]})
    lines = ["## Mean ± sd over seeds: class accuracy % / proto-FID", "",
             "| step | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in steps:
        cells = []
        for a in arms:
            vals = np.array([runs[a][seed][s][:2] for seed in runs[a] if s in runs[a][seed]])
            (f, fsd), (acc, accsd) = mean_sd(vals[:, 0]), mean_sd(100 * vals[:, 1])
            cells.append(f"{acc:.1f} ± {accsd:.1f} / {f:.2f} ± {fsd:.2f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")

    diffs = {}  # baseline -> arm -> step -> (accuracy differences, FID differences) per shared seed
    for base in bases:
        more, diffs[base] = paired(runs, arms, base, steps)
        lines += more

    lines += ["", "## Steps to reach a class accuracy (first evaluation step; per seed, '-' = never)", "",
              "| arm | " + " | ".join(f"{100 * t:.0f}%: per seed / mean of runs that reach it / never"
                                      for t in args.thresholds) + " |", "|---" * (len(args.thresholds) + 1) + "|"]
    for a in arms:
        cells = []
        for t in args.thresholds:
            hit = {seed: first_step_reaching(runs[a][seed], t) for seed in sorted(runs[a])}
            reached = [v for v in hit.values() if v is not None]
            cells.append(", ".join(str(v) if v is not None else "-" for v in hit.values()) +
                         f" / {np.mean(reached):.0f} / {len(hit) - len(reached)}" if reached else
                         ", ".join("-" for _ in hit) + f" / - / {len(hit)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1 + len(bases), 2, figsize=(11, 4 * (1 + len(bases))), squeeze=False)
    color = {a: f"C{i}" for i, a in enumerate(arms)}  # one colour per arm in every panel
    for a in arms:
        for ax, k, scale in zip(axes[0], (1, 0), (100, 1)):
            per_step = [np.array([scale * runs[a][seed][s][k] for seed in runs[a] if s in runs[a][seed]]) for s in steps]
            ax.plot(steps, [v.mean() for v in per_step], marker="o", label=a, color=color[a])
    axes[0][0].set_ylabel("class accuracy % (mean over seeds)")
    axes[0][1].set_ylabel("proto-FID (mean over seeds), lower is better")
    for row, base in zip(axes[1:], bases):
        for a, by_step in diffs[base].items():
            xs = sorted(by_step)
            for ax, k in zip(row, (0, 1)):
                m = np.array([by_step[s][k].mean() for s in xs])
                sd = np.array([by_step[s][k].std(ddof=1) if len(by_step[s][k]) > 1 else 0.0 for s in xs])
                ax.plot(xs, m, marker="o", label=a, color=color[a])
                ax.fill_between(xs, m - sd, m + sd, alpha=0.12, color=color[a])
        row[0].set_ylabel(f"accuracy points, arm minus\n{base}\n(paired; band = ± sd)", fontsize=9)
        row[1].set_ylabel(f"proto-FID, arm minus\n{base}\n(paired; band = ± sd)", fontsize=9)
        for ax in row:
            ax.axhline(0, color="k", lw=0.5)
    for ax in axes.flat:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)
    print("\n".join(lines))
    print(f"-> {os.path.join(args.out, 'table.md')}, {os.path.join(args.out, 'curves.png')}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Mean and spread over seeds of proto-FID and class accuracy per arm, "
                                "and differences to regular paired by seed.")
    p.add_argument("runs", nargs="+", help="run dirs")
    p.add_argument("--out", default="results/experiment", help="folder for table.md and curves.png")
    p.add_argument("--baseline", nargs="+", default=["regular"], help="the arm(s) the paired differences are taken "
                   "to, one table and one row of plots each, e.g. regular 'random_scaled @ norm default'")
    p.add_argument("--class_index", type=int, default=None, help="report this class's per-class proto-FID and "
                   "class accuracy (records written with --per_class True) instead of all classes together")
    p.add_argument("--other_classes", type=int, default=None, help="report the mean of the per-class proto-FIDs and "
                   "class accuracies of every class but this one (e.g. next to --class_index 0)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.65],
                   help="class accuracies for the steps-to-threshold table")
    p.add_argument("--title", default="digits: mean over seeds (top), paired differences to each baseline (below)",
                   help="plot title")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
