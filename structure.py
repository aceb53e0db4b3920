"""Does a class table carry class structure? Its rows' off-diagonal cosine similarities, and their rank
correlation with the classifier's own class similarity.

    python structure.py results/digits_experiment/prototypes.pt results/digits_experiment/runs/*-s0 \
        --classifier results/digits_experiment/eval_classifier.pt
    python structure.py best_model.pt results/proto_frozen/cifar10/RUN --classifier best_model.pt --dataset cifar10
A table is a prototype file (its centres, and its class means when stored) or a run dir (the class table in its
newest checkpoint). The reference is the classifier's confusion on the test split: the share of class i's test
images it assigns to class j, symmetrised. It is measured on images, so it does not presuppose any table; the
class means' cosines, the second reference, is 1 for the class-mean table by construction. train_classifier.py
stores both; for another classifier file (the authors' best_model.pt) --dataset measures them.
"""
import argparse
import os

import torch
from scipy.stats import spearmanr

from checkpoints import latest_checkpoint, load_file
from datasets import DATASETS, load_dataset
from cli import ANY, DEVICE, NATIVE_OR_SIZE, UserError, check_flags, one_of, run_cli, str2bool, unset_or
from distributed import setup_distributed


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The entries above the diagonal of a square matrix, one per unordered class pair."""
    i, j = torch.triu_indices(len(matrix), len(matrix), offset=1)
    return matrix[i, j]


def cosines(table: torch.Tensor) -> torch.Tensor:
    """[C, C] cosine similarity of the table's rows."""
    rows = torch.nn.functional.normalize(table.double(), dim=1)
    return rows @ rows.T


def confusion_similarity(confusion: torch.Tensor) -> torch.Tensor:
    """Symmetrised confusion rates: (P(predicted j | class i) + P(predicted i | class j)) / 2."""
    rates = confusion.double() / confusion.double().sum(1, keepdim=True)
    return (rates + rates.T) / 2


def table_structure(table: torch.Tensor, confusion: torch.Tensor, means: torch.Tensor) -> dict:
    """Off-diagonal cosines of `table` [C, D] and their Spearman correlation with the confusion similarity and
    with the class means' cosines (nan where a reference has no spread, e.g. a classifier that never errs)."""
    cos = off_diagonal(cosines(table))
    confused, similar = off_diagonal(confusion_similarity(confusion)), off_diagonal(cosines(means))
    rho = [float(spearmanr(cos.numpy(), ref.numpy()).statistic) if ref.unique().numel() > 1 else float("nan")
           for ref in (confused, similar)]
    return {"cosine_mean": cos.mean().item(), "cosine_sd": cos.std().item(), "cosine_min": cos.min().item(),
            "cosine_max": cos.max().item(), "rho_confusion": rho[0], "rho_class_means": rho[1]}


HEADER = ("| table | off-diagonal cosine mean ± sd [min, max] | Spearman with confusion | "
          "Spearman with class-mean cosines |\n|---|---|---|---|")


def structure_row(name: str, s: dict) -> str:
    """One markdown row of table_structure's figures."""
    return (f"| {name} | {s['cosine_mean']:+.3f} ± {s['cosine_sd']:.3f} [{s['cosine_min']:+.2f}, "
            f"{s['cosine_max']:+.2f}] | {s['rho_confusion']:+.2f} | {s['rho_class_means']:+.2f} |")


def tables_in(path: str) -> list[tuple[str, torch.Tensor]]:
    """(name, table) pairs: a run dir's class table, or a prototype file's centres and stored class means."""
    if os.path.isdir(path):
        state = load_file(latest_checkpoint(path))
        return [(os.path.basename(os.path.normpath(path)), state["cemblayer"]["condEmbedding.0.weight"].float())]
    from prototypes import load_prototypes, read_prototype_file
    name = os.path.basename(path)
    found = [(f"{name} centres", load_prototypes(path)[0])]
    obj = read_prototype_file(path)
    if isinstance(obj, dict) and "class_means" in obj:
        found.append((f"{name} class means", obj["class_means"].float()))
    return found


def reference_of(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(test-split confusion, training-split class means) of --classifier: stored by train_classifier.py, or
    measured with its network on --dataset."""
    from prototypes import class_statistics, classifier_in, read_prototype_file
    obj = read_prototype_file(args.classifier)
    if isinstance(obj, dict) and "confusion" in obj and "class_means" in obj:
        return obj["confusion"], obj["class_means"]
    if args.dataset is None:
        raise UserError(f"{args.classifier} stores no confusion matrix and class means; pass --dataset to measure "
                        "them with its classifier")
    model = classifier_in(obj, args.classifier)
    device = setup_distributed(args.device).device  # one process: this only picks and checks the device
    train, test = (load_dataset(args.dataset, split, args.data_root, args.image_size, args.download,
                                args.tiny_imagenet_path) for split in ("train", "test"))
    model.to(device)
    confusion = class_statistics(model, test.images.to(device), test.labels.to(device))[1]
    means = class_statistics(model, train.images.to(device), train.labels.to(device))[0]
    return confusion.cpu(), means.cpu()


FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    "dataset": unset_or(one_of(*DATASETS), "use the statistics the classifier file stores"),
    "image_size": NATIVE_OR_SIZE, "device": DEVICE,
    **{flag: ANY for flag in ("tables", "classifier", "out", "data_root", "download", "tiny_imagenet_path")},
}


def main(args: argparse.Namespace) -> None:
    check_flags(args, FLAG_RULES)
    confusion, means = reference_of(args)
    lines = [HEADER]
    for path in args.tables:
        for name, table in tables_in(path):
            if len(table) != len(confusion):
                raise UserError(f"{path}: the table has {len(table)} classes, the classifier {len(confusion)}")
            lines.append(structure_row(name, table_structure(table, confusion, means)))
    confused = off_diagonal(confusion_similarity(confusion))
    lines.append(f"\nReference: {args.classifier}'s test-split confusion ({int((confused > 0).sum())} of "
                 f"{len(confused)} class pairs ever confused) and its training-split class means"
                 f"{f', measured on {args.dataset}' if args.dataset else ''}.")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Class structure of class tables: off-diagonal cosines and their rank "
                                "correlation with a prototype classifier's confusion and class means.")
    p.add_argument("tables", nargs="+", help="prototype files and/or run dirs")
    p.add_argument("--classifier", required=True, help="prototype classifier that gives the reference: a "
                   "train_classifier.py checkpoint (it stores the reference), or any classifier file with --dataset")
    p.add_argument("--dataset", default=None, help=f"measure the reference on this dataset ({', '.join(DATASETS)}): "
                   "confusion on its test split, class means over its training split")
    p.add_argument("--data_root", default="datasets", help="folder holding the datasets")
    p.add_argument("--image_size", type=int, default=-1, help="resize images to this size (-1: native)")
    p.add_argument("--download", type=str2bool, default=True, help="download cifar10, stl10 or fashion_mnist when missing")
    p.add_argument("--tiny_imagenet_path", default=None, help="the unzipped tiny-imagenet-200 folder")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
