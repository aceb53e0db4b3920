"""Draw FID (or proto-FID) against epoch for several run dirs into one PNG, from their metrics.jsonl.

    python plot_fid.py results/regular/cifar10/RUN results/proto_frozen/cifar10/RUN --out fid.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runtime import ANY, UserError, check_flags, run_cli  # noqa: E402


def fid_curve(run_dir: str) -> tuple[str, str, list[int], list[float]]:
    """(label, metric name, epochs, values) of one run; the label is its mode and folder name."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.jsonl")
    rows = [r for r in map(json.loads, open(path)) if r.get("event") == "fid"]
    if not rows:
        raise UserError(f"{path} holds no FID records (train with --fid_every, or run sample.py --fid True)")
    last = {r["epoch"]: r for r in rows}  # a later measurement of the same epoch wins
    cfg_path = os.path.join(run_dir, "config.json")
    mode = json.load(open(cfg_path)).get("mode", "?") if os.path.isfile(cfg_path) else "original"
    epochs = sorted(last)
    return f"{mode} ({os.path.basename(os.path.normpath(run_dir))})", rows[-1]["metric"], epochs, \
        [last[e]["value"] for e in epochs]


FLAG_RULES = {flag: ANY for flag in ("runs", "out", "title")}  # run dirs are checked as they are read


def main(args: argparse.Namespace) -> None:
    check_flags(args, FLAG_RULES)
    curves = [fid_curve(r) for r in args.runs]
    metrics = {c[1] for c in curves}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, _, epochs, values in curves:
        ax.plot(epochs, values, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(" / ".join(sorted(metrics)))
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"{len(curves)} curve(s) -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plot FID against epoch for several runs.")
    p.add_argument("runs", nargs="+", help="run dirs with metrics.jsonl")
    p.add_argument("--out", default="fid_vs_epoch.png", help="PNG to write")
    p.add_argument("--title", default="FID vs epoch", help="plot title")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
