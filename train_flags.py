"""train.py's command line: every flag with its help text and default (the original train.py's names and
meaning, then this project's), and its rule of valid values (cli.py)."""
import argparse
import math

from cli import (AMP, ANY, AUTO_OR_BOOL, CLASSES_OR_BOOL, COMPILE_MODE, COMPILE_SCOPE, DEVICE, DIST_BACKEND,
                 NATIVE_OR_SIZE,
                 POSITIVE_LIST, Rule, above, at_least, between, bool_or_classes, finite, int_list, one_of, str2bool,
                 unset_or)
from compat import COMPAT
from datasets import DATASETS

MODES = ("regular", "proto_frozen", "proto_unfrozen", "random_scaled", "proto_shuffled")
# flags that describe this invocation rather than the run; everything else comes from config.json on resume
RUNTIME_FLAGS = ("path_resume", "run_dir", "device", "debug", "numworkers", "local_rank", "max_steps", "keep_last",
                 "dist_backend", "dist_timeout", "if_exists", "tensorboard")


def _norm_value(v: str) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) > 0
    except ValueError:
        return False


PROTO_NORM = Rule(lambda v: v in ("keep", "default") or _norm_value(v), "keep, default or a number > 0", "-1")
FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    **{flag: at_least(1) for flag in ("batchsize", "epoch", "interval", "sample_every", "log_every", "genbatch", "T",
                                      "modch", "cdim", "numres", "numworkers")},
    **{flag: at_least(0) for flag in ("global_batch", "max_steps", "keep_last", "fid_every", "weight_decay", "eta",
                                      "seed")},
    "fid_num": at_least(2),  # a covariance needs two images
    "num_steps": at_least(2),  # and at most --T, checked with it
    "image_size": NATIVE_OR_SIZE, "chmul": POSITIVE_LIST,
    "save_epochs": unset_or(POSITIVE_LIST, "only every --interval"),
    "save_steps": unset_or(POSITIVE_LIST, "no step saves"),
    **{flag: unset_or(at_least(1), "the dataset's channels") for flag in ("inch", "outch")},
    "clsnum": unset_or(at_least(1), "all classes, at most 10"),
    "lr": above(0), "multiplier": at_least(1),  # the warm-up starts at lr and rises to lr x multiplier
    "threshold": between(0, 1), "droprate": between(0, 1, below_hi=True), "ema_decay": between(0, 1),
    "low_t_frac": between(0, 1), "v": between(0, 1), "w": finite(),
    "schedule": one_of("linear", "cosine"), "select": one_of("linear", "quadratic"),
    "mode": one_of(*MODES), "dataset": one_of(*DATASETS), "fid_features": one_of("inception", "classifier"),
    "proto_norm": PROTO_NORM, "proto_source": one_of("centres", "means"),
    "amp": AMP, "compile": AUTO_OR_BOOL, "channels_last": AUTO_OR_BOOL,
    "compile_mode": COMPILE_MODE, "compile_scope": COMPILE_SCOPE, "device": DEVICE,
    "dist_backend": DIST_BACKEND, "dist_timeout": above(0), "compat": COMPAT, "if_exists": one_of("error", "continue"),
    "per_class": CLASSES_OR_BOOL,
    **{flag: ANY for flag in ("useconv", "ddim", "download", "crop", "tensorboard", "local_rank", "data_root",
                              "tiny_imagenet_path", "path_resume", "run_dir", "path_proto", "eval_classifier",
                              "results")},
}


def build_parser() -> argparse.ArgumentParser:
    """Flags of the original train.py (same names and meaning) plus this project's additions."""
    p = argparse.ArgumentParser(description="Train a class-conditional diffusion model with classifier-free "
                                "guidance; --mode proto_* conditions it on class prototypes (ProtoDiffusion).")
    p.add_argument("--batchsize", type=int, default=256, help="batch size per device (with --global_batch: per "
                   "micro-batch, a memory setting)")
    p.add_argument("--global_batch", type=int, default=0, help="images per optimizer step over all processes, "
                   "reached by accumulating --global_batch / (--batchsize x processes) micro-batches per process, "
                   "so a run's schedule does not depend on its GPU count (0: --batchsize x processes, the original's)")
    p.add_argument("--numworkers", type=int, default=4, help="threads that decode image folders (batches come from "
                   "an in-memory uint8 tensor, so no loader workers are needed)")
    p.add_argument("--inch", type=int, default=None, help="UNet input channels (default: the dataset's)")
    p.add_argument("--modch", type=int, default=64, help="UNet base channels")
    p.add_argument("--outch", type=int, default=None, help="UNet output channels (default: the dataset's)")
    p.add_argument("--chmul", type=int_list, default=[1, 2, 4, 4], help="channel multipliers per level, e.g. 1,2,4,4")
    p.add_argument("--numres", type=int, default=2, help="residual blocks per level")
    p.add_argument("--cdim", type=int, default=128, help="class embedding width (the paper's prototypes are 128; "
                   "the original code's default of 10 was always overridden)")
    p.add_argument("--useconv", type=str2bool, default=True, help="strided conv (True) or average pooling to downsample")
    p.add_argument("--droprate", type=float, default=0.1, help="dropout in the residual blocks")
    p.add_argument("--T", type=int, default=1000, help="diffusion timesteps")
    p.add_argument("--schedule", default="linear", help="beta schedule: linear (the paper's) or cosine")
    p.add_argument("--low_t_frac", type=float, default=0.1, help="share of each batch whose t is drawn from {0..49}")
    p.add_argument("--lr", type=float, default=2e-4, help="base learning rate (warm-up peaks at lr x multiplier)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--w", type=float, default=1.8, help="classifier-free guidance strength of the sample grids")
    p.add_argument("--v", type=float, default=1.0, help="DDPM variance exp(v log beta + (1-v) log tilde_beta); "
                   "1 is what the original sampler actually used")
    p.add_argument("--epoch", type=int, default=1500, help="epochs to train")
    p.add_argument("--multiplier", type=float, default=2.5, help="warm-up peak as a multiple of --lr")
    p.add_argument("--threshold", type=float, default=0.1, help="probability of the null condition (CFG label drop)")
    p.add_argument("--interval", type=int, default=20, help="save a checkpoint every this many epochs (and at the end)")
    p.add_argument("--genbatch", type=int, default=80, help="images in each sample grid, and per forward pass of "
                   "the periodic FID")
    p.add_argument("--clsnum", type=int, default=None, help="classes (rows) in the sample grid (default: all, at most 10)")
    p.add_argument("--ddim", type=str2bool, default=False, help="sample grids with DDIM instead of T-step DDPM")
    p.add_argument("--num_steps", type=int, default=50, help="DDIM steps of the sample grids")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the sample grids")
    p.add_argument("--select", default="linear", help="DDIM timestep selection: linear or quadratic")
    p.add_argument("--local_rank", type=int, default=-1, help="accepted for torch.distributed.launch; LOCAL_RANK is used")
    p.add_argument("--image_size", type=int, default=-1, help="resize images to this size (-1: native)")
    p.add_argument("--crop", type=str2bool, default=True, help="image folders: resize the short side to --image_size and crop "
                   "the centre, as ADM, DiT and EDM do (False: squash each image to a square; square images: the same)")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data_root", default="datasets", help="folder holding the datasets (imagefolder: the folder "
                   "of class folders itself)")
    p.add_argument("--download", type=str2bool, default=True, help="download cifar10, stl10 or fashion_mnist when missing")
    p.add_argument("--tiny_imagenet_path", default=None, help="the unzipped tiny-imagenet-200 folder, or its train/ "
                   "folder as the original code took it (default DATA_ROOT/tiny-imagenet-200)")
    p.add_argument("--path_resume", default=None, help="run dir to continue, bit for bit, from its newest checkpoint, "
                   "with its own flags (config.json): a flag given here must equal the run's, except --epoch (a new "
                   "total; the LR schedule is rebuilt for it) and, with --global_batch, --batchsize")
    p.add_argument("--run_dir", default=None, help="run dir to create (default RESULTS/{mode}/{dataset}/{timestamp}); "
                   "must not exist yet, unless --if_exists continue")
    p.add_argument("--if_exists", default="error", help="what --run_dir does when it exists: error, or continue "
                   "(start-or-continue: resume it from its newest checkpoint, bit for bit, or start it when it holds "
                   "none; the command a requeued job runs again)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in all, with a checkpoint "
                   "to resume from (0: run all epochs)")
    p.add_argument("--keep_last", type=int, default=0, help="keep the full training state (for resuming) of the "
                   "newest K checkpoints only; every saved epoch keeps its sampling weights in weights_EPOCH.pt, so "
                   "sample.py --epoch all still sees them all (0: keep every full state, and no weights files)")
    p.add_argument("--save_epochs", type=int_list, default=None, help="also save at these epochs, e.g. the "
                   "log-spaced early ones 1,2,4,8,16,32 that an FID curve of early training needs (default: only "
                   "every --interval)")
    p.add_argument("--save_steps", type=int_list, default=None, help="also save at these global optimizer steps: a "
                   "checkpoint and the step's sampling weights (checkpoints/weights_step_S.pt, kept whatever "
                   "--keep_last is), e.g. the log-spaced early steps 100,200,400,800 of an FID curve over steps, "
                   "which sample.py --step all scores (default: no step saves)")
    p.add_argument("--mode", default="regular", help=f"class table: {' / '.join(MODES)}")
    p.add_argument("--path_proto", default=None, help="prototype file for the proto modes")
    p.add_argument("--proto_norm", default="keep", help="row norm of the table a proto mode or control builds: keep "
                   "(the rows' own norms, the paper's), default (the expected row norm of the regular N(0, 1) table "
                   "at --cdim, sqrt(2) Gamma((cdim + 1) / 2) / Gamma(cdim / 2) = 11.29 at 128) or a number > 0")
    p.add_argument("--proto_source", default="centres", help="what the table a proto mode or control builds starts "
                   "from: centres (the classifier's DCE prototypes, the paper's) or means (each class's mean "
                   "classifier feature over the training split: stored by train_classifier.py, else computed with "
                   "the file's classifier at the run's image size)")
    p.add_argument("--seed", type=int, default=0, help="global seed (rank r uses seed x world + r for noise)")
    p.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (warm-up min(decay, (1+n)/(10+n)))")
    p.add_argument("--log_every", type=int, default=100, help="read and log the loss every this many steps")
    p.add_argument("--tensorboard", type=str2bool, default=False, help="also write metrics.jsonl's numbers and the "
                   "sample grids as TensorBoard events in RUN/tensorboard (rank 0; needs the tensorboard package)")
    p.add_argument("--sample_every", type=int, default=20, help="save a sample grid every this many epochs (and at the end)")
    p.add_argument("--fid_every", type=int, default=0, help="measure FID (or proto-FID) of the EMA weights every this "
                   "many epochs and at the end, into metrics.jsonl (0: never)")
    p.add_argument("--fid_num", type=int, default=500, help="images per periodic FID (balanced classes, fixed seeds)")
    p.add_argument("--per_class", type=bool_or_classes, default=False, help="periodic FID records also give "
                   "each class's figures: KID of its samples against its own reference features (unbiased at the few "
                   "images a class gets), in a feature space of at most 256 dimensions (the classifier's) its FID "
                   "too, and class accuracy; True for every class, or a comma list of classes (one class: 5,)")
    p.add_argument("--fid_features", default="inception", help="inception (FID) or classifier (proto-FID, offline)")
    p.add_argument("--eval_classifier", default=None, help="classifier for proto-FID and class accuracy "
                   "(default: --path_proto)")
    p.add_argument("--results", default="results", help="runs go to RESULTS/{mode}/{dataset}/{timestamp}")
    p.add_argument("--amp", default="auto", help="autocast dtype: bf16, fp16 (with a GradScaler) or none; auto is "
                   "bf16 on CUDA and none on CPU")
    p.add_argument("--compile", default="auto", help="torch.compile the whole loss (class MLP, noise, UNet, MSE) "
                   "as one graph (True/False; auto: on CUDA only)")
    p.add_argument("--compile_mode", default="default", help="torch.compile mode: default, "
                   "max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs)")
    p.add_argument("--compile_scope", default="whole", help="what --compile compiles for training: whole (the "
                   "loss as one graph) or regional (each of the UNet's blocks; blocks of one shape share a graph)")
    p.add_argument("--channels_last", default="auto", help="channels_last memory format (True/False; auto: on)")
    p.add_argument("--compat", default="none", help="restore the original code's behaviours that this repo changed: "
                   "none, original (all), or a comma list of padding_idx (class 0's row at zero, untrained), "
                   "lr_schedule (back to lr after the warm-up), raw_weights (grids and FID without EMA), png_stretch "
                   "(per-image min-max stretch of samples), stl10_norm (CIFAR10 mean/std for STL10); kept in "
                   "config.json, so sample.py follows the run")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--dist_backend", default="auto", help="torchrun's backend: auto (nccl on CUDA, gloo on CPU), "
                   "nccl or gloo (gloo lets several ranks share one GPU, as scripts/gpu_check.sh does)")
    p.add_argument("--dist_timeout", type=float, default=30.0, help="minutes any collective may wait: it must "
                   "outlast what rank 0 does alone while the others wait (sample grids with the sampler's first "
                   "compile, checkpoint writes); a rank that hangs longer ends the job")
    return p
