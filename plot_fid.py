"""Draw FID (or proto-FID) against epoch, or against the guidance strength w, for several run dirs into one PNG,
from their metrics.jsonl.

    python plot_fid.py results/regular/cifar10/RUN results/proto_frozen/cifar10/RUN --out fid.png
    python plot_fid.py RUN_A RUN_B --against w --epoch 1500 --out fid_vs_w.png   # after sample.py --w 0,0.5,1,2,4
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cli import ANY, UserError, at_least, check_flags, finite, one_of, run_cli, unset_or  # noqa: E402


def fid_records(run_dir: str) -> tuple[str, list[dict]]:
    """(label, fid records) of one run; the label is its mode and folder name."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.jsonl")
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a crash
            continue
    rows = [r for r in rows if r.get("event") == "fid"]
    if not rows:
        raise UserError(f"{path} holds no FID records (train with --fid_every, or run sample.py --fid True)")
    cfg_path = os.path.join(run_dir, "config.json")
    mode = json.load(open(cfg_path)).get("mode", "?") if os.path.isfile(cfg_path) else "original"
    return f"{mode} ({os.path.basename(os.path.normpath(run_dir))})", rows


def fid_curve(run_dir: str, class_index: int | None = None, against: str = "epoch", epoch: int | None = None,
              w: float | None = None) -> tuple[str, str, list[float], list[float]]:
    """(label, metric name, x values, FID values) of one run, or of one class's per-class figures: against epoch
    (at guidance `w`, default any), or against w at `epoch` (default the newest scored one)."""
    label, rows = fid_records(run_dir)
    if against == "w":
        epoch = max(r["epoch"] for r in rows) if epoch is None else epoch
        rows = [r for r in rows if r["epoch"] == epoch]
    elif w is not None:
        rows = [r for r in rows if r["w"] == w]
    if not rows:
        raise UserError(f"{run_dir} has no FID record at " + (f"epoch {epoch}" if against == "w" else f"w {w}"))
    last = {r[against]: r for r in rows}  # a later measurement of the same point wins
    xs = sorted(last)
    if class_index is None:
        return label, rows[-1]["metric"], xs, [last[x]["value"] for x in xs]
    xs = [x for x in xs if "per_class" in last[x]]
    if not xs:
        raise UserError(f"{run_dir} holds no per-class figures (sample.py or train.py with --per_class True)")
    figure = "fid" if "fid" in last[xs[0]]["per_class"] else "kid"  # per-class FID in a narrow feature space only
    if class_index >= len(last[xs[0]]["per_class"][figure]):
        raise UserError(f"--class_index {class_index} is not a class of {run_dir}")
    values = [last[x]["per_class"][figure][class_index] for x in xs]
    name = rows[-1]["metric"] if figure == "fid" else "KID"
    return label, f"{name} of class {class_index}", xs, [float("nan") if v is None else v for v in values]


FLAG_RULES = {**{flag: ANY for flag in ("runs", "out", "title")},  # run dirs are checked as they are read
              "class_index": unset_or(at_least(0), "every class together"),
              "against": one_of("epoch", "w"), "epoch": unset_or(at_least(0), "the newest scored epoch"),
              "w": unset_or(finite(), "every w")}


def main(args: argparse.Namespace) -> None:
    check_flags(args, FLAG_RULES)
    curves = [fid_curve(r, args.class_index, args.against, args.epoch, args.w) for r in args.runs]
    metrics = {c[1] for c in curves}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, _, epochs, values in curves:
        ax.plot(epochs, values, marker="o", label=label)
    ax.set_xlabel("epoch" if args.against == "epoch" else "guidance strength w")
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
    p.add_argument("--against", default="epoch", help="x axis: epoch, or w (the guidance strengths sample.py --w "
                   "scored at one epoch)")
    p.add_argument("--epoch", type=int, default=None, help="with --against w: the epoch (default: the newest scored)")
    p.add_argument("--w", type=float, default=None, help="with --against epoch: only the records at this w (default: "
                   "all, a later record of an epoch winning)")
    p.add_argument("--class_index", type=int, default=None, help="plot this class's per-class FID (records written "
                   "with --per_class True) instead of the all-class FID")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
