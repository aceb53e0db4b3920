"""Draw FID (or proto-FID) against epoch for several run dirs into one PNG, from their metrics.jsonl.

    python plot_fid.py results/regular/cifar10/RUN results/proto_frozen/cifar10/RUN --out fid.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cli import ANY, UserError, at_least, check_flags, run_cli, unset_or  # noqa: E402


def fid_curve(run_dir: str, class_index: int | None = None) -> tuple[str, str, list[int], list[float]]:
    """(label, metric name, epochs, values) of one run, or of one class's per-class figures; the label is its mode
    and folder name."""
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
    label = f"{mode} ({os.path.basename(os.path.normpath(run_dir))})"
    if class_index is None:
        return label, rows[-1]["metric"], epochs, [last[e]["value"] for e in epochs]
    epochs = [e for e in epochs if "per_class" in last[e]]
    if not epochs:
        raise UserError(f"{path} holds no per-class figures (sample.py or train.py with --per_class True)")
    if class_index >= len(last[epochs[0]]["per_class"]["fid"]):
        raise UserError(f"--class_index {class_index} is not a class of {run_dir}")
    values = [last[e]["per_class"]["fid"][class_index] for e in epochs]
    return label, f"{rows[-1]['metric']} of class {class_index}", epochs, [float("nan") if v is None else v
                                                                            for v in values]


FLAG_RULES = {**{flag: ANY for flag in ("runs", "out", "title")},  # run dirs are checked as they are read
              "class_index": unset_or(at_least(0), "every class together")}


def main(args: argparse.Namespace) -> None:
    check_flags(args, FLAG_RULES)
    curves = [fid_curve(r, args.class_index) for r in args.runs]
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
    p.add_argument("--class_index", type=int, default=None, help="plot this class's per-class FID (records written "
                   "with --per_class True) instead of the all-class FID")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
