"""Audit a model's class conditioning: is any class conditioned on a dead (zero or never-trained) table row?

    python audit.py results/regular/digits/RUN                  # a run dir of this code (config.json)
    python audit.py ORIGINAL_RUN --classes 10                   # the ProtoDiffusion code's run dir (params.txt)
    python audit.py model/ --classes 10                         # the upstream CFG code's checkpoint folder
    python audit.py ckpt_1500_checkpoint.pt --json              # one checkpoint file, numbers as JSON
The class table is `nn.Embedding` row `label`, and the UNet is conditioned on MLP(row) (`ConditionalEmbedding`; the
null condition of classifier-free guidance is the zero vector). With `padding_idx=0`, as in the ProtoDiffusion code
and in the public CFG code it grew from (coderpiaobozhe/classifier-free-diffusion-guidance-Pytorch, whose
`embedding.py` builds `nn.Embedding(num_labels + 1, d_model, padding_idx=0)` and whose `dataloader_cifar.py` feeds
it torchvision's CIFAR10 labels 0-9 unshifted), row 0 stays exactly zero and gets no gradient: class 0 is conditioned
on MLP(0), which only the MLP's biases, shared by every class, can move (docs/digits.md, study 3).

Per class it reports the row's norm at every checkpoint, whether the row is zero or never changed direction while
the others trained (AdamW's weight decay alone only rescales it), and the distances of its conditioning vector to
the null condition, to MLP(0) and to the nearest other class; then one verdict line. Files are read with
torch.load(weights_only=True); nothing in them is run.
"""
import argparse
import glob
import json
import os
import re

import torch

from checkpoints import load_file
from cli import ANY, UserError, at_least, check_flags, one_of, run_cli, str2bool, unset_or

TABLE = "condEmbedding.0.weight"
MLP = ("condEmbedding.1", "condEmbedding.3")
MOVED = 1e-5  # change of a row's unit direction, first to last checkpoint, below which it never moved (float32
# rounding of a row that weight decay alone rescales is about 1e-7)


def checkpoint_files(path: str) -> tuple[list[str], str, int | None]:
    """(checkpoint files oldest first, what the source is, its class count when it says) of a run dir of this code
    (config.json) or of the ProtoDiffusion code (params.txt), a folder of checkpoints (the upstream CFG code's
    `model/`), or one file."""
    if os.path.isfile(path):
        return [path], "checkpoint file", None
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist")
    classes, source = None, "checkpoint folder"
    if os.path.isfile(os.path.join(path, "config.json")):
        classes, source = json.load(open(os.path.join(path, "config.json"))).get("num_classes"), "run dir of this code"
    elif os.path.isfile(os.path.join(path, "params.txt")):
        source = "run dir of the ProtoDiffusion code"
    folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    files = glob.glob(os.path.join(folder, "ckpt_*_checkpoint.pt")) + glob.glob(os.path.join(folder, "step_*.pt"))
    if not files:
        raise UserError(f"{path} holds no checkpoints (ckpt_EPOCH_checkpoint.pt)")

    def order(f: str) -> tuple[int, int]:  # epochs first (ckpt_E), then step checkpoints by their step
        kind, number = re.match(r"(ckpt|step)_(\d+)", os.path.basename(f)).groups()
        return (0 if kind == "ckpt" else 1, int(number))
    return sorted(files, key=order), source, classes


def conditioning(path: str, weights: str) -> dict[str, torch.Tensor]:
    """The ConditionalEmbedding state dict of a checkpoint (`cemblayer`, or EMA's with weights ema)."""
    state = load_file(path)
    if isinstance(state, dict) and weights == "ema":
        if "ema" not in state:
            raise UserError(f"{path} holds no EMA weights (the original codes kept none); use --weights raw")
        state = state["ema"]
    if isinstance(state, dict) and "cemblayer" in state:
        state = state["cemblayer"]
    if not isinstance(state, dict) or TABLE not in state or any(f"{m}.weight" not in state for m in MLP):
        raise UserError(f"{path} holds no class conditioning (a `cemblayer` with {TABLE} and its MLP)")
    return {k: v.float() for k, v in state.items()}


def condition_vectors(state: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """MLP(rows): Linear, SiLU, Linear, as ConditionalEmbedding applies it after the table lookup."""
    first, second = MLP
    h = torch.nn.functional.silu(rows @ state[f"{first}.weight"].T + state[f"{first}.bias"])
    return h @ state[f"{second}.weight"].T + state[f"{second}.bias"]


def audit(path: str, classes: int | None, weights: str) -> dict:
    """The per-class figures and the verdict of one source."""
    files, source, configured = checkpoint_files(path)
    states = [conditioning(f, weights) for f in files]
    tables = [s[TABLE] for s in states]
    if any(t.shape != tables[0].shape for t in tables):
        raise UserError(f"the checkpoints of {path} have class tables of different shapes")
    n_rows = tables[0].shape[0]
    classes = classes or configured or n_rows
    if classes > n_rows:
        raise UserError(f"--classes {classes} but the class table of {path} has only {n_rows} rows")
    first, last = tables[0], tables[-1]
    norms = torch.stack([t.norm(dim=1) for t in tables], 1)  # [rows, checkpoints]
    zero = (last == 0).all(dim=1)
    unit = torch.nn.functional.normalize
    moved = (unit(first, dim=1) - unit(last, dim=1)).norm(dim=1) > MOVED  # a zero row normalises to zero: unmoved
    cond = condition_vectors(states[-1], last[:classes])
    at_zero = condition_vectors(states[-1], torch.zeros(1, last.shape[1]))[0]
    pairwise = torch.cdist(cond, cond).fill_diagonal_(float("inf"))
    nearest = pairwise.min(dim=1)
    report = {"path": path, "source": source, "files": [os.path.basename(f) for f in files], "weights": weights,
              "classes": classes, "table_rows": n_rows, "classes_rows": []}
    for k in range(n_rows):
        row = {"row": k, "norms": [round(float(v), 4) for v in norms[k]], "zero": bool(zero[k])}
        if len(files) > 1:
            row["moved"] = bool(moved[k])
        if k < classes:
            row.update(to_null=round(float(cond[k].norm()), 4), to_mlp0=round(float((cond[k] - at_zero).norm()), 4),
                       nearest_class=int(nearest.indices[k]) if classes > 1 else None,
                       to_nearest=round(float(nearest.values[k]), 4) if classes > 1 else None)
        report["classes_rows"].append(row)
    report["verdict"] = verdict(report, len(files))
    return report


def verdict(report: dict, checkpoints: int) -> str:
    """One plain line: the dead-class pattern, a frozen row, a frozen table, or healthy."""
    rows, classes = report["classes_rows"], report["classes"]
    dead = [r["row"] for r in rows[:classes] if r["zero"]]
    if dead:
        return (f"DEAD CLASS ROW: class(es) {', '.join(map(str, dead))} sit on an exactly zero table row (the "
                "padding_idx pattern): they are conditioned on MLP(0), which no class-specific weight reaches")
    if checkpoints > 1:
        still = [r["row"] for r in rows[:classes] if not r["moved"]]
        if len(still) == classes:
            return ("frozen table: no row changed direction across the checkpoints (as proto_frozen keeps it); "
                    "no class row is zero")
        if still:
            return (f"FROZEN CLASS ROW: class(es) {', '.join(map(str, still))} never changed direction while the "
                    "other rows trained")
    unused = f"; rows {classes}-{len(rows) - 1} no label reaches" if len(rows) > classes else ""
    moved = "" if checkpoints > 1 else " (one checkpoint: whether rows moved is not known)"
    return f"healthy: every class row is non-zero{moved}{unused}"


def print_report(report: dict) -> None:
    """The per-class table and the verdict, as text."""
    print(f"== {report['path']} ({report['source']}; {report['weights']} weights; {report['classes']} classes, "
          f"table {report['table_rows']} rows; checkpoints {', '.join(report['files'])})")
    print("row  norm (first -> last checkpoint)   zero  moved  |cond - null|  |cond - MLP(0)|  nearest class")
    for r in report["classes_rows"]:
        norms = " -> ".join(f"{v:.3f}" for v in dict.fromkeys([r["norms"][0], r["norms"][-1]]))
        moved = {True: "yes", False: "NO"}.get(r.get("moved"), "-")
        if "to_null" in r:
            near = f"{r['nearest_class']} at {r['to_nearest']:.3f}" if r["nearest_class"] is not None else "-"
            tail = f"{r['to_null']:12.3f}  {r['to_mlp0']:15.3f}  {near}"
        else:
            tail = "no label reaches this row"
        print(f"{r['row']:3d}  {norms:32s}  {'YES' if r['zero'] else 'no':4s}  {moved:5s}  {tail}")
    print(f"verdict: {report['verdict']}")


FLAG_RULES = {"classes": unset_or(at_least(1), "the run's classes, else every table row"),
              "weights": one_of("raw", "ema"), **{flag: ANY for flag in ("sources", "json")}}


def main(args: argparse.Namespace) -> list[dict]:
    """Audit every source; returns the reports."""
    check_flags(args, FLAG_RULES)
    reports = [audit(path, args.classes, args.weights) for path in args.sources]
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        for report in reports:
            print_report(report)
    return reports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Report dead or frozen class rows in a model's class conditioning.")
    p.add_argument("sources", nargs="+", help="run dirs of this code or of the ProtoDiffusion code, folders of "
                   "checkpoints (the upstream CFG code's model/), or checkpoint files")
    p.add_argument("--classes", type=int, default=None, help="labels 0..N-1 are used (default: the run's classes, "
                   "else every table row; the upstream CFG code's table has one row more than it has classes)")
    p.add_argument("--weights", default="raw", help="raw (what every code saves) or ema (this code's EMA copy)")
    p.add_argument("--json", type=str2bool, default=False, help="print the reports as JSON instead of tables")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
