"""Summarise runs of several modes and seeds: a markdown table (mean and spread per evaluation) and a plot.

    python experiment_report.py results/digits_experiment/runs/* --out results/digits_experiment
Reads each run's config.json (mode, seed) and the `fid` records of its metrics.jsonl.
"""
import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from runtime import UserError, run_cli  # noqa: E402

MODE_ORDER = ["regular", "proto_frozen", "proto_unfrozen", "random_scaled", "proto_shuffled"]


def collect(run_dirs: list[str]) -> dict:
    """{mode: {epoch: [(proto-FID, accuracy, step) per seed]}}."""
    table = defaultdict(lambda: defaultdict(list))
    for run in run_dirs:
        cfg_path, metrics = os.path.join(run, "config.json"), os.path.join(run, "metrics.jsonl")
        if not (os.path.isfile(cfg_path) and os.path.isfile(metrics)):
            raise UserError(f"{run} is not a finished run dir (config.json and metrics.jsonl)")
        mode = json.load(open(cfg_path))["mode"]
        for r in map(json.loads, open(metrics)):
            if r.get("event") == "fid":
                table[mode][r["epoch"]].append((r["value"], r.get("class_accuracy", float("nan")), r["step"]))
    if not table:
        raise UserError("no FID records found in the given runs")
    return table


def main(args: argparse.Namespace) -> None:
    table = collect(args.runs)
    modes = [m for m in MODE_ORDER if m in table] + sorted(set(table) - set(MODE_ORDER))
    epochs = sorted({e for m in modes for e in table[m]})
    lines = []
    for e in epochs:
        step = next(v[0][2] for m in modes if (v := table[m].get(e)))
        lines += [f"\n**epoch {e} (step {step})**\n", "| mode | proto-FID mean ± sd | class accuracy mean ± sd | seeds |",
                  "|---|---|---|---|"]
        for m in modes:
            vals = np.array([v[:2] for v in table[m].get(e, [])])
            if len(vals):
                sd = vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(2)
                lines.append(f"| {m} | {vals[:, 0].mean():.3f} ± {sd[0]:.3f} | {100 * vals[:, 1].mean():.1f}% ± "
                             f"{100 * sd[1]:.1f} | {len(vals)} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in modes:
        es = sorted(table[m])
        steps = [table[m][e][0][2] for e in es]
        for ax, k in zip(axes, (0, 1)):
            vals = [np.array([v[k] for v in table[m][e]]) for e in es]
            mean = np.array([v.mean() for v in vals])
            ax.plot(steps, mean, marker="o", label=m)
            ax.fill_between(steps, [v.min() for v in vals], [v.max() for v in vals], alpha=0.15)
    axes[0].set_ylabel("proto-FID (independent classifier), lower is better")
    axes[1].set_ylabel("class accuracy of samples")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)
    print("\n".join(lines))
    print(f"-> {os.path.join(args.out, 'table.md')}, {os.path.join(args.out, 'curves.png')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Mean and spread over seeds of proto-FID and class accuracy per mode.")
    p.add_argument("runs", nargs="+", help="run dirs")
    p.add_argument("--out", default="results/experiment", help="folder for table.md and curves.png")
    p.add_argument("--title", default="digits: mean over seeds, band = min..max", help="plot title")
    run_cli(main, p)
