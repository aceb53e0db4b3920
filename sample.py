"""Sample a trained run (DDPM or DDIM, classifier-free guidance), write PNGs and a class grid, measure FID.

    python sample.py --path RUN --epoch E --ddim True --genum 100 --genbatch 100 --fid True
    torchrun --standalone --nproc_per_node=gpu sample.py --path RUN --epoch E --ddim True --genum 50000 --fid True
    python sample.py --path RUN --epoch all --ddim True --genum 10000 --fid True --per_class True   # an FID curve
Image i's noise comes from seed `--seed + i` alone and, for `--label range`, its class is i mod clsnum, so the PNGs
do not depend on `--genbatch` or on the number of processes. Each rank writes its own PNGs;
only feature statistics travel between ranks. RUN may be a run dir of this code (config.json) or of the
original code (params.txt).
"""
import argparse
import dataclasses
import glob
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from checkpoints import load_epoch, load_run, saved_epochs, saved_steps
from compat import COMPAT, Compat
from datasets import save_grid
from diffusion import GaussianDiffusion, make_betas
from evaluate import Scoring, classifier_for, evaluate, few_images_warning, fid_record, real_images, reference_path
from fid import FEATURES, feature_width
from cli import (AMP, ANY, AUTO_OR_BOOL, CLASSES_OR_BOOL, COMPILE_MODE, DEVICE, FINITE_LIST, Rule, UserError,
                 append_line, at_least, bool_or_classes, check_flags, float_list, int_list, one_of, run_cli, str2bool,
                 unset_or)
from distributed import setup_distributed, teardown_distributed
from runlog import Board, RunLog, summary_writer_class
from sampling import Sampler, image_labels
from speed import resolve_fast_path


def parse_epochs(spec: str) -> list[int] | None:
    """--epoch's value as a list of epochs, None for `all`; ValueError when it is neither."""
    if str(spec).strip().lower() == "all":
        return None
    epochs = [int(p) for p in str(spec).replace(",", " ").split()]
    if not epochs or len(set(epochs)) != len(epochs) or min(epochs) < 0:
        raise ValueError(spec)
    return epochs


def _epochs_ok(spec: str) -> bool:
    try:
        parse_epochs(spec)
        return True
    except ValueError:
        return False


CLASS_LIST = Rule(lambda v: len(v) > 0 and len(set(v)) == len(v) and min(v) >= 0, "distinct class indices like 0,3,7",
                  "1,1")
EPOCHS = Rule(_epochs_ok, "a saved epoch, a comma list of distinct ones (50,100,150) or all", "1,x")
STEPS = Rule(lambda v: v is None or _epochs_ok(v), "a saved step, a comma list of distinct ones or all", "1,x")
FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    **{flag: at_least(0) for flag in ("eta", "seed")},
    **{flag: at_least(1) for flag in ("genum", "genbatch")},
    "epoch": EPOCHS, "step": STEPS,
    "num_steps": at_least(2),  # and at most the run's T, checked with it
    "clsnum": unset_or(at_least(1), "all of the run's classes"), "w": unset_or(FINITE_LIST, "the run's --w"),
    "classes": unset_or(CLASS_LIST, "the first --clsnum classes"),
    "weights": unset_or(one_of("ema", "raw"), "ema when the checkpoint has it"),
    "select": one_of("linear", "quadratic"), "label": one_of("range", "random"), "fid_features": one_of(*FEATURES),
    "amp": AMP, "compile": AUTO_OR_BOOL, "channels_last": AUTO_OR_BOOL, "compile_mode": COMPILE_MODE,
    "device": DEVICE, "png": AUTO_OR_BOOL, "compat": unset_or(COMPAT, "the run's --compat"),
    **{flag: ANY for flag in ("path", "ddim", "fid", "path_proto", "eval_classifier", "ref_stats", "inception_weights",
                              "data_root", "out", "local_rank", "skip_scored", "tensorboard")},
    "real": one_of("False", "test", "all"),
    "per_class": CLASSES_OR_BOOL,
}


def resolve_points(path: str, epochs: str, steps: str | None) -> list[tuple[int | None, int | None]]:
    """The saved (epoch, None) points --epoch names or, with --step, the saved (None, step) points, each checked
    against the run's checkpoints before anything is sampled."""
    if not os.path.isdir(path):
        raise UserError(f"--path {path} is not a directory")
    what, spec, saved = ("step", steps, saved_steps(path)) if steps is not None else \
        ("epoch", epochs, saved_epochs(path))
    chosen = parse_epochs(spec) or saved
    missing = [e for e in chosen if e not in saved]
    if missing or not chosen:
        raise UserError(f"no checkpoint for {what} {missing[0] if missing else spec} in {path}/checkpoints; saved "
                        f"{what}s: {', '.join(map(str, saved)) or 'none'}")
    return [(None, e) if what == "step" else (e, None) for e in chosen]


def point_name(epoch: int | None, step: int | None) -> str:
    """How a point names its folders and files: the epoch, or step{S}."""
    return str(epoch) if step is None else f"step{step}"


def already_scored(path: str, template: dict, per_class: list[int]) -> bool:
    """Whether RUN/metrics.jsonl holds an fid record with every setting of `template` (its epoch, or for a step
    point its step, included) and, when `per_class` names classes, per-class figures of exactly those."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return False
    position = "epoch" if template["step"] is not None else "step"  # the one the template leaves open
    settings = {k: v for k, v in template.items() if k not in ("value", position)}
    for line in open(metrics):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(record.get(k) == v for k, v in settings.items()) and \
                (not per_class or record.get("per_class", {}).get("classes") == per_class):
            return True
    return False


def main(args: argparse.Namespace) -> None:
    """Sample (and score) every epoch --epoch names with one network, compiled once, and one scorer."""
    check_flags(args, FLAG_RULES)
    d = setup_distributed(args.device)
    say = RunLog(None, d.is_main).line  # rank 0 prints
    clf_path = args.eval_classifier or args.path_proto
    if args.fid_features == "classifier" and not clf_path:
        raise UserError("--fid_features classifier needs --path_proto or --eval_classifier (a train_classifier.py "
                        "checkpoint)")
    if not args.path:
        raise UserError("--path (a run dir) is required")
    if args.tensorboard:
        summary_writer_class()  # the package is there, or one line before anything is sampled
    points = resolve_points(args.path, args.epoch, args.step)
    net, cemblayer, cfg, _ = load_run(args.path, points[0][0], args.weights, points[0][1])  # weights per point
    spec = args.compat or cfg.get("compat", "none")
    compat = Compat.of(spec, cfg["dataset"])
    weights = args.weights or ("raw" if compat.weights == "raw" else None)  # None: EMA when the checkpoint has it
    if note := compat.describe(spec):
        say(note)
    fast = resolve_fast_path(args.amp, args.compile, args.channels_last, d.device, args.compile_mode)
    net.to(d.device, memory_format=torch.channels_last if fast.channels_last else torch.preserve_format)
    cemblayer.to(d.device)
    diffusion = GaussianDiffusion(make_betas(cfg.get("schedule", "linear"), cfg["T"]), d.device, v=cfg.get("v", 1.0))
    if args.ddim and not 2 <= args.num_steps <= diffusion.T:
        raise UserError(f"--num_steps must be between 2 and T ({diffusion.T}); got {args.num_steps}")
    ws = [cfg.get("w", 1.8)] if args.w is None else args.w
    if args.classes is not None:
        if max(args.classes) >= cfg["num_classes"]:
            raise UserError(f"--classes {max(args.classes)} is not a class of the run (it has {cfg['num_classes']})")
        if args.fid:
            raise UserError("--classes samples a subset of the classes, and the FID reference holds every class; "
                            "leave --fid out (images and grids), or leave --classes out")
    classes = list(range(cfg["num_classes"] if args.clsnum is None else args.clsnum)) if args.classes is None \
        else args.classes
    clsnum = len(classes)
    if not 1 <= clsnum <= cfg["num_classes"]:
        raise UserError(f"--clsnum must be between 1 and the run's {cfg['num_classes']} classes")
    n = args.genum
    if args.label == "range" and n % clsnum:
        raise UserError(f"--label range needs the image count ({n}) to be a multiple of --clsnum ({clsnum})")
    if args.fid and n < 2:
        raise UserError(f"--fid True needs --genum >= 2 (a covariance needs two images); got {n}")
    if args.real != "False" and not (args.fid and args.label == "range"):
        raise UserError(f"--real {args.real} scores --genum real images in balanced classes: it needs --fid True and "
                        "--label range")
    # (point, w) pairs: one, PNGs in --out (default RUN/samples_E); several: a curve needs numbers, so PNGs only with
    # --png True, in OUT/samples_E (default RUN/samples_E; a step: samples_stepS), with _w{w} when several w are asked
    runs = [(p, w) for p in points for w in ws]
    several = len(runs) > 1
    write_png = (not several if str(args.png).lower() == "auto" else str2bool(args.png)) and args.real == "False"
    base = {(p, w): args.out if args.out and not several else os.path.join(
        args.out or args.path, f"samples_{point_name(*p)}" + (f"_w{w:g}" if len(ws) > 1 else "")) for p, w in runs}
    if write_png:
        taken = [f for f in base.values() if os.path.isdir(f) and glob.glob(os.path.join(f, "*.png"))]
        if d.is_main and taken:
            raise UserError(f"{taken[0]} already holds PNGs; pass another --out (nothing was overwritten)")
        if d.world > 1:
            dist.barrier()  # nobody writes before rank 0 has checked the folders
        for folder in base.values():
            os.makedirs(folder, exist_ok=True)
    elif args.out:
        os.makedirs(args.out, exist_ok=True)  # the grids' folder
    classifier = classifier_for(clf_path).to(d.device) if clf_path else None
    data_root = args.data_root or cfg.get("data_root", "datasets")
    ref = args.ref_stats or reference_path(cfg, args.fid_features, data_root, clf_path)
    sampler = Sampler.from_args(args, w=ws[0], fast=fast, pixels=compat.pixels)
    if args.fid and (warning := few_images_warning(n, feature_width(args.fid_features, classifier))):
        say(warning)
    outcomes = []  # the compiles' outcomes, once the first batch has compiled the noise and the network
    sampling_net = sampler.prepare(net, (cfg["inch"], cfg["image_size"], cfg["image_size"]), cfg["cdim"], d.device,
                                   say, outcomes.append)
    labels = torch.tensor(classes)[image_labels(n, clsnum, args.label, args.seed)]
    per_class = min(10, n // clsnum) if args.label == "range" else 10
    rows = [[i for i in range(n) if labels[i] == c][:per_class] for c in classes]
    grid_indices = [i for row in rows for i in row] if all(len(r) == per_class for r in rows) else []
    scoring = Scoring(args.fid_features, ref, data_root, classifier, clf_path, args.inception_weights,
                      args.per_class) if args.fid else None
    if scoring is not None:  # the reference first: a training set that cannot be read stops before any sampling
        scoring.reference_stats(cfg, d.device, d.rank, d.world, d.control)
    if args.real != "False":
        return score_real(args, cfg, diffusion, net, cemblayer, labels, sampler, scoring, spec, d, say)
    board = Board(args.path) if args.tensorboard and args.fid and d.is_main else None
    position, loaded = None, None
    for point, w in runs:
        (epoch, step), label = point, f"epoch {point[0]}" if point[1] is None else f"step {point[1]}"
        sampler = dataclasses.replace(sampler, w=w)  # the prepared network and noise serve every w
        if scoring is not None and args.skip_scored and already_scored(args.path, fid_record(
                {"fid": None, "n": n}, scoring, sampler, diffusion.T, epoch, step, weights or "ema", spec, args.label),
                scoring.classes(cfg["num_classes"])):
            say(f"{label}, w {w}: already scored with these settings ({args.path}/metrics.jsonl); skipped")
            continue
        if loaded != point:  # each w of a point samples the weights loaded once
            position, loaded = load_epoch(net, cemblayer, args.path, epoch, weights, step), point
            position |= {"name": point_name(*point), "label": label}
        say(f"sampling {n} images of {args.path} {label} ({position['weights']} weights) with "
            f"{sampler.name(diffusion.T)}, w {w}, {d.world} process(es)")
        result = evaluate(diffusion, sampling_net, cemblayer, cfg, labels, sampler, scoring, d.rank, d.world,
                          base[point, w] if write_png else None, keep=frozenset(grid_indices), progress=d.is_main,
                          group=d.control)
        kept = result["kept"]
        if d.world > 1:  # the grid's few images, from whichever rank drew them
            shares = [None] * d.world
            dist.all_gather_object(shares, kept)
            kept = {i: img for share in shares for i, img in share.items()}
        if d.is_main:
            write_outputs(args, result, kept, grid_indices, per_class, base[point, w], write_png, position, sampler,
                          diffusion.T, scoring, outcomes, spec, board)
    if board is not None:
        board.close()
    teardown_distributed()


REAL = {"sampler": "real", "steps": None, "eta": None, "select": None, "w": None, "weights": None}


def score_real(args: argparse.Namespace, cfg: dict, diffusion: GaussianDiffusion, net: torch.nn.Module,
               cemblayer: torch.nn.Module, labels: torch.Tensor, sampler: Sampler, scoring: Scoring, compat: str,
               d: Any, say: Any) -> None:
    """--real test|all: --genum real images of that split, one per label, scored as the samples are, into
    RUN/metrics.jsonl: the floor a perfect model would reach in this evaluation (its sampling noise at this n)."""
    real_fields = REAL | {"split": args.real}
    template = fid_record({"fid": None, "n": args.genum}, scoring, sampler, diffusion.T, None, None, "", compat,
                          args.label) | real_fields
    if args.skip_scored and already_scored(args.path, template, scoring.classes(cfg["num_classes"])):
        say(f"the real-vs-real floor of {args.genum} {args.real}-split images: already scored ({args.path}/metrics.jsonl); skipped")
        return teardown_distributed()
    real = real_images(cfg, args.data_root or cfg.get("data_root", "datasets"), labels, args.real)
    result = evaluate(diffusion, net, cemblayer, cfg, labels, sampler, scoring, d.rank, d.world, group=d.control,
                      real=real)
    if d.is_main:
        record = fid_record(result, scoring, sampler, diffusion.T, None, None, "", compat, args.label) | real_fields
        print(f"real-vs-real floor: {scoring.metric} {result['fid']:.4f} of {result['n']} {args.real}-split images" +
              (f", class accuracy {result['class_accuracy']:.4f}" if "class_accuracy" in result else ""), flush=True)
        append_line(os.path.join(args.path, "metrics.jsonl"), json.dumps(record) + "\n")
    teardown_distributed()


def write_outputs(args: argparse.Namespace, result: dict, kept: dict, grid_indices: list[int], per_class: int,
                  base: str, write_png: bool, position: dict, sampler: Sampler, T: int, scoring: Scoring | None,
                  outcomes: list[dict], compat: str, board: Board | None) -> None:
    """Rank 0: one point's class grid, and with --fid its record in RUN/fid_E.txt (a step: fid_stepS.txt) and
    RUN/metrics.jsonl (and with --tensorboard in the run's TensorBoard events)."""
    epoch = position["epoch"]
    grid_path = base.rstrip("/") + "_grid.png"
    if grid_indices:
        save_grid(torch.stack([kept[i] for i in grid_indices]), per_class, grid_path)
        print((f"{args.genum} PNGs -> {base}/, " if write_png else "") + f"class grid -> {grid_path}", flush=True)
    if not args.fid:
        return
    record = fid_record(result, scoring, sampler, T, epoch, position["global_step"], position["weights"], compat,
                        args.label)
    if outcomes:
        record["compile"] = outcomes
    line = f"{scoring.metric} {result['fid']:.4f}" + (f", class accuracy {result['class_accuracy']:.4f}"
                                                     if "class_accuracy" in result else "")
    print(f"{position['label']}: {line} ({result['n']} images, {sampler.name(T)}, w {sampler.w}, {position['weights']} "
          f"weights, reference {scoring.reference})", flush=True)
    for path in (os.path.join(args.path, f"fid_{position['name']}.txt"), os.path.join(args.path, "metrics.jsonl")):
        append_line(path, json.dumps(record) + "\n")
    if board is not None:
        board.record(record)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images from a trained run and measure FID.")
    p.add_argument("--path", default=None, help="run dir (this code's config.json or the original's params.txt)")
    p.add_argument("--epoch", default="1000", help="the saved epoch to sample, a comma list of them (50,100,150) or "
                   "all: the network is built and compiled once, each epoch's weights are loaded into it, and each "
                   "epoch gets its own FID record")
    p.add_argument("--step", default=None, help="sample saved global steps instead of epochs (train.py "
                   "--save_steps): a step, a comma list of them or all; each gets its own FID record, whose epoch "
                   "is the epochs trained by then (a fraction)")
    p.add_argument("--real", default="False", help="with --fid, score --genum real images instead of samples (the "
                   "first of each class, balanced as --label range): the real-vs-real floor of the same evaluation, one "
                   "record with sampler 'real' in PATH/metrics.jsonl; test: the held-out split, all: the training "
                   "images, which the reference holds too (digits has too few held out), False: sample")
    p.add_argument("--ddim", type=str2bool, default=False, help="DDIM instead of T-step ancestral DDPM")
    p.add_argument("--num_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--select", default="linear", help="DDIM timestep selection: linear or quadratic")
    p.add_argument("--w", type=float_list, default=None, help="guidance strength, or a comma list of them (0,1,1.8,3): "
                   "each is sampled (and scored) in turn by the same network, one record per value; default: the "
                   "run's --w")
    p.add_argument("--genum", type=int, default=5600, help="images to generate (with or without --fid)")
    p.add_argument("--genbatch", type=int, default=80, help="images per forward pass on each device")
    p.add_argument("--clsnum", type=int, default=None, help="classes to sample (default: all of the run's)")
    p.add_argument("--classes", type=int_list, default=None, help="sample these classes only (a comma list of class "
                   "indices, image i of class classes[i mod count]); not with --fid, whose reference holds every "
                   "class")
    p.add_argument("--label", default="range", help="range: class i mod clsnum (balanced); random: uniform")
    p.add_argument("--fid", type=str2bool, default=False, help="also measure FID of the generated images")
    p.add_argument("--fid_features", default="inception", help="inception (FID) or classifier (proto-FID, offline)")
    p.add_argument("--path_proto", default=None, help="prototype classifier checkpoint: proto-FID features and "
                   "class accuracy")
    p.add_argument("--eval_classifier", default=None, help="classifier for proto-FID and class accuracy, e.g. one "
                   "trained with another seed than the one that supplied the prototypes (overrides --path_proto)")
    p.add_argument("--ref_stats", default=None, help="reference statistics .npz (pytorch-fid format); computed "
                   "from the training set and saved there if missing (default DATA_ROOT/fid_stats/...)")
    p.add_argument("--inception_weights", default=None, help="pytorch-fid Inception weights file (default: "
                   "$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth, downloaded when online)")
    p.add_argument("--data_root", default=None, help="datasets folder for reference statistics (default: the run's)")
    p.add_argument("--weights", default=None, help="ema or raw (default: ema when the checkpoint has it, raw under "
                   "--compat raw_weights)")
    p.add_argument("--compat", default=None, help="the original code's behaviours to restore when sampling (see "
                   "train.py --compat; raw_weights, png_stretch and stl10_norm act here); default: the run's own")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--out", default=None, help="PNG folder (default PATH/samples_EPOCH); with several epochs the "
                   "folder that holds a samples_EPOCH folder and grid per epoch")
    p.add_argument("--png", default="auto", help="write every image as a PNG (True/False; auto: for one epoch only, "
                   "since a curve over many epochs needs the numbers)")
    p.add_argument("--per_class", type=bool_or_classes, default=False, help="with --fid, also each class's figures: "
                   "KID of its samples against its own reference features (cached beside the all-class file; unbiased "
                   "at the few images a class gets), in a feature space of at most 256 dimensions (the classifier's) "
                   "its FID too, and class accuracy; True for every class, or a comma list of classes (one class: 5,)")
    p.add_argument("--skip_scored", type=str2bool, default=False, help="with --fid, skip the (epoch, w) pairs that "
                   "PATH/metrics.jsonl already has a record of with every setting of this command (a rerun after a "
                   "preemption)")
    p.add_argument("--tensorboard", type=str2bool, default=False, help="with --fid, also write each record's numbers "
                   "to the run's TensorBoard events (PATH/tensorboard; needs the tensorboard package)")
    p.add_argument("--local_rank", type=int, default=-1, help="accepted for torch.distributed.launch; LOCAL_RANK is used")
    p.add_argument("--amp", default="auto", help="autocast dtype of the sampler: bf16, fp16 or none (auto: bf16 on "
                   "CUDA, none on CPU); features for FID are always computed in fp32")
    p.add_argument("--channels_last", default="auto", help="channels_last memory format (True/False; auto: on)")
    p.add_argument("--compile", default="auto", help="torch.compile the network once for the --genbatch shape (the "
                   "last batch is padded) (True/False; auto: on CUDA only)")
    p.add_argument("--compile_mode", default="default", help="torch.compile mode: default, "
                   "max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
