"""Train ProtoDiffusion's class-conditional diffusion model (random class table, or class prototypes).

One process (CPU or one GPU):
    python train.py --dataset digits --modch 64 --chmul 1,2 --numres 1 --epoch 40 --batchsize 64
One node, all its GPUs:
    torchrun --standalone --nproc_per_node=gpu train.py --dataset cifar10 --batchsize 64 --image_size 32 \
        --cdim 128 --mode proto_frozen --path_proto classifier.pt
Two nodes (run on each, NODE = 0 or 1):
    torchrun --nnodes=2 --node_rank=NODE --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
`--batchsize` is per device, as in the original; the global batch is batchsize x processes.
"""
import argparse
import math
import os

import torch
from torch import nn
from tqdm import tqdm

from checkpoints import (TrainState, build_models, make_run_dir, read_resume, restore, run_models,
                         save_checkpoint)
from cli import (AMP, ANY, AUTO_OR_BOOL, COMPILE_MODE, COMPILE_SCOPE, DEVICE, DIST_BACKEND, NATIVE_OR_SIZE,
                 POSITIVE_LIST, Rule, UserError, above, at_least, between, check_flags, finite, int_list, one_of,
                 run_cli, str2bool, unset_or)
from compat import COMPAT, Compat
from datasets import DATASETS, DatasetError, ImageData, ShardedBatches, StagedBatches, load_dataset
from diffusion import GaussianDiffusion, make_betas
from distributed import StopSignal, seed_everything, setup_distributed, teardown_distributed
from ema import EMA
from embedding import expected_row_norm, rows_at_norm, rows_with_norms_of, set_class_table, shuffled_rows
from evaluate import Sampler, evaluate_or_skip, make_evaluator, sample_grid
from runlog import Guards, LossMeter, RunLog
from speed import adamw, load_compile_cache, resolve_fast_path, save_compile_cache
from train_step import DiffusionLoss, TrainStep, compile_loss, wrap_ddp
from unet import check_unet_config

MODES = ("regular", "proto_frozen", "proto_unfrozen", "random_scaled", "proto_shuffled")
# controls: random_scaled = random directions with the prototypes' row norms, proto_shuffled = prototypes of
# other classes; both frozen like proto_frozen, so each differs from it in one property only
FROZEN = ("proto_frozen", "random_scaled", "proto_shuffled")
# flags that describe this invocation rather than the run; everything else comes from config.json on resume
RUNTIME_FLAGS = ("path_resume", "run_dir", "device", "debug", "numworkers", "local_rank", "max_steps", "keep_last",
                 "dist_backend", "dist_timeout")


def _norm_value(v: str) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) > 0
    except ValueError:
        return False


PROTO_NORM = Rule(lambda v: v in ("keep", "default") or _norm_value(v), "keep, default or a number > 0", "-1")
FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    **{flag: at_least(1) for flag in ("batchsize", "epoch", "interval", "sample_every", "log_every", "genbatch", "T",
                                      "modch", "cdim", "numres", "numworkers")},
    **{flag: at_least(0) for flag in ("max_steps", "keep_last", "fid_every", "weight_decay", "eta", "seed")},
    "fid_num": at_least(2),  # a covariance needs two images
    "num_steps": at_least(2),  # and at most --T, checked with it
    "image_size": NATIVE_OR_SIZE, "chmul": POSITIVE_LIST,
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
    "dist_backend": DIST_BACKEND, "dist_timeout": above(0), "compat": COMPAT,
    **{flag: ANY for flag in ("useconv", "ddim", "download", "per_class", "local_rank", "data_root",
                              "tiny_imagenet_path", "path_resume", "run_dir", "path_proto", "eval_classifier",
                              "results")},
}


def table_norm(args: argparse.Namespace) -> float | None:
    """The row norm --proto_norm asks for: None keeps the rows' own norms (the paper's behaviour)."""
    if args.proto_norm == "keep":
        return None
    if args.mode == "regular":
        raise UserError("--proto_norm applies to the tables built from prototypes (the proto modes and controls), "
                        "not to --mode regular")
    if args.proto_norm == "default":
        return expected_row_norm(args.cdim)
    return float(args.proto_norm)  # checked by PROTO_NORM


def make_lr_schedule(optimizer: torch.optim.Optimizer, epochs: int, multiplier: float, original: bool = False):
    """Per epoch: linear warm-up from lr to lr*multiplier over max(1, epochs//20) epochs, then cosine to 0.

    The optimizer's lr must already be the peak (lr * multiplier). The original's GradualWarmupScheduler
    fell back to the base lr after warm-up; we keep the peak, as its own docstring intended. `original` restores
    its trajectory: epoch e <= W = epochs//20 runs at lr (1 + (multiplier - 1) e / W), every later epoch at
    lr (1 + cos(pi (e - W - 1) / epochs)) / 2, a cosine over all epochs restarted from the base lr.
    """
    warm = max(1, epochs // 20)
    if original:
        def factor(e: int) -> float:  # of the peak lr the optimizer holds
            if e <= warm:
                return (1 + (multiplier - 1) * e / warm) / multiplier
            return (1 + math.cos(math.pi * (e - warm - 1) / epochs)) / 2 / multiplier
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / multiplier, end_factor=1.0,
                                               total_iters=warm)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warm), eta_min=0.0)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warm])


def validate(args: argparse.Namespace) -> None:
    """Refuse flag values and combinations that cannot work, before any data is touched or file written."""
    check_flags(args, FLAG_RULES)
    table_norm(args)
    if args.mode == "regular" and args.proto_source != "centres":
        raise UserError("--proto_source applies to the tables built from prototypes (the proto modes and controls), "
                        "not to --mode regular")
    if args.mode != "regular" and not args.path_proto:
        raise UserError(f"--mode {args.mode} needs --path_proto (a prototype checkpoint from train_classifier.py, "
                        "the authors' best_model.pt, or a [classes, cdim] tensor)")
    try:
        check_unet_config(args.modch, args.chmul)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.run_dir and not args.path_resume and os.path.exists(args.run_dir):
        raise UserError(f"--run_dir {args.run_dir} already exists; pick a new one or continue it with --path_resume")
    if args.ddim and not 2 <= args.num_steps <= args.T:
        raise UserError(f"--num_steps must be between 2 and --T ({args.T}); got {args.num_steps}")
    if args.fid_every and args.fid_features == "classifier" and not (args.eval_classifier or args.path_proto):
        raise UserError("--fid_every with --fid_features classifier needs --eval_classifier (or --path_proto)")


def read_data(args: argparse.Namespace, world: int) -> tuple[ImageData, dict]:
    """The dataset (decoded once, uint8) and the run config it completes; refuses what does not fit it."""
    try:
        data = load_dataset(args.dataset, "all", args.data_root, args.image_size, args.download,
                            args.tiny_imagenet_path, args.numworkers)
    except DatasetError as e:
        raise UserError(str(e)) from None
    try:
        check_unet_config(args.modch, args.chmul, data.size)
    except ValueError as e:
        raise UserError(str(e)) from None
    for flag in ("inch", "outch"):
        if getattr(args, flag) not in (None, data.channels):
            raise UserError(f"--{flag} {getattr(args, flag)} does not match {args.dataset}'s {data.channels} "
                            "channel(s); leave it unset to follow the dataset")
    clsnum = min(len(data.classes), 10) if args.clsnum is None else args.clsnum
    if not 1 <= clsnum <= len(data.classes) or args.genbatch < clsnum:
        raise UserError(f"the sample grid needs 1 <= --clsnum <= {len(data.classes)} and --genbatch >= --clsnum; "
                        f"got clsnum {clsnum}, genbatch {args.genbatch}")
    cfg = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}
    cfg.update(inch=data.channels, outch=data.channels, image_size=data.size, num_classes=len(data.classes),
               classes=data.classes, clsnum=clsnum, world_size=world, torch=str(torch.__version__),
               proto_row_norm=table_norm(args))
    return data, cfg


def read_prototypes(args: argparse.Namespace, cfg: dict, device: torch.device) -> tuple[torch.Tensor, str] | None:
    """The class table a proto mode or control starts from (checked before anything is written)."""
    if args.mode == "regular":
        return None
    from prototypes import load_class_means, load_prototypes  # only the proto modes need the classifier code
    if args.proto_source == "means":
        def train_split() -> tuple[torch.Tensor, torch.Tensor]:
            split = load_dataset(args.dataset, "train", args.data_root, cfg["image_size"], args.download,
                                 args.tiny_imagenet_path, args.numworkers)
            return split.images, split.labels
        protos, source = load_class_means(args.path_proto, train_split, device)
    else:
        protos, source = load_prototypes(args.path_proto)
    if tuple(protos.shape) != (cfg["num_classes"], args.cdim):
        raise UserError(f"prototypes in {args.path_proto} are {protos.shape[0]} x {protos.shape[1]} and do not fit "
                        f"this run, which needs {cfg['num_classes']} classes (--dataset {args.dataset}) x "
                        f"{args.cdim} (--cdim)")
    return protos, source


def make_models(args: argparse.Namespace, cfg: dict, resume: dict | None, protos: tuple | None, run_dir: str,
                log: RunLog) -> nn.ModuleDict:
    """net and cemblayer: the same init on every rank (DDP also broadcasts rank 0's), or the checkpoint's weights."""
    seed_everything(args.seed)
    if resume is not None:
        net, cemblayer, _ = run_models(run_dir, resume)
    else:
        net, cemblayer = build_models(cfg)
    if protos is not None:
        table, source = protos
        if args.mode == "random_scaled":
            table = rows_with_norms_of(table, args.seed)
        elif args.mode == "proto_shuffled":
            table = shuffled_rows(table, args.seed)
        if cfg["proto_row_norm"] is not None:
            table = rows_at_norm(table, cfg["proto_row_norm"])
        set_class_table(cemblayer, table, trainable=args.mode == "proto_unfrozen")
        norms = table.norm(dim=1)
        log.line(f"loaded {args.proto_source} from {args.path_proto}: {table.shape[0]} x {table.shape[1]} ({source}); "
                 f"table = {args.mode}, {'trained' if args.mode == 'proto_unfrozen' else 'frozen'}, row norms "
                 f"{norms.min():.2f}-{norms.max():.2f} (--proto_norm {args.proto_norm})")
    elif args.mode in FROZEN:
        cemblayer.table.requires_grad_(False)
    return nn.ModuleDict({"net": net, "cemblayer": cemblayer})


def main(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Train; returns this rank's final modules (net, cemblayer, ema) for callers such as tests."""
    # --- setup: torchrun's process group, the run's flags (its own on resume), the speed settings
    check_flags(args, FLAG_RULES)
    d = setup_distributed(args.device, args.dist_backend, args.dist_timeout)
    resume = read_resume(args.path_resume, args, RUNTIME_FLAGS) if args.path_resume else None
    validate(args)
    compat = Compat.of(args.compat, args.dataset)
    fast = resolve_fast_path(args.amp, args.compile, args.channels_last, d.device, args.compile_mode,
                             args.compile_scope)

    # --- data: uint8 images on the training device when they take under a quarter of its free memory
    data, cfg = read_data(args, d.world)
    protos = read_prototypes(args, cfg, d.device) if resume is None else None
    on_device = d.device.type == "cpu" or data.images.numel() < torch.cuda.mem_get_info(d.device)[0] // 4
    images = data.images.to(d.device) if on_device else data.images
    labels = data.labels.to(d.device)
    staged = None if on_device else StagedBatches(images, args.batchsize, d.device)
    batches = ShardedBatches(len(labels), args.batchsize, d.rank, d.world, args.seed)

    # --- run dir and log
    run_dir = make_run_dir(args.results, args.mode, args.dataset, args.path_resume or args.run_dir, cfg, d,
                           fresh=resume is None)
    log = RunLog(run_dir, d.is_main)
    if note := compat.describe(args.compat):
        log.line(note)

    # --- models, EMA, optimizer (AdamW at the warm-up's peak, scaled per epoch by the schedule), diffusion
    models = make_models(args, cfg, resume, protos, run_dir, log)
    models["net"].to(d.device, memory_format=torch.channels_last if fast.channels_last else torch.preserve_format)
    models["cemblayer"].to(d.device)
    optimizer = adamw([p for p in models.parameters() if p.requires_grad], args.lr * args.multiplier,
                      args.weight_decay)
    state = TrainState(models, EMA(models, args.ema_decay), optimizer,
                       make_lr_schedule(optimizer, args.epoch, args.multiplier, compat.original_lr),
                       torch.amp.GradScaler(d.device.type, enabled=fast.amp == torch.float16))  # fp16 only
    diffusion = GaussianDiffusion(make_betas(args.schedule, args.T), d.device, v=args.v, low_t_frac=args.low_t_frac)

    # --- the loss (CFG label drop, timesteps, noise, UNet, eps-MSE), one DDP around it, then compiled as one graph
    # proven on a batch of the training shape; compiles start warm from the run's own cache file when it has one
    loss = DiffusionLoss(models, diffusion, args.threshold, fast, compat.pixels)
    ddp_loss = wrap_ddp(loss, d)
    compile_cache = os.path.join(run_dir, "compile_cache.bin")
    if fast.compile:
        load_compile_cache(compile_cache, log.line)
        probe = torch.arange(args.batchsize, device=images.device) % len(labels)
        ddp_loss, outcome = compile_loss(loss, ddp_loss, d, (images[probe].to(d.device), labels[probe.to(d.device)]),
                                         log.line)
        log.record(event="compile", **outcome)
    train_step = TrainStep(ddp_loss, models, optimizer, state.scaler, state.ema, fast)

    def save(epoch: int, step_in_epoch: int) -> str:
        """The checkpoint (every rank hands in its RNG state) and, with compile, rank 0's compile cache."""
        path = save_checkpoint(run_dir, state, epoch, step_in_epoch, len(batches), cfg, d.world, args.keep_last)
        if fast.compile and d.is_main:
            save_compile_cache(compile_cache)
        return path

    # --- resume: optimizer, schedule, EMA, RNG and the position in the data
    start_epoch, skip = 0, 0
    if resume is not None:
        start_epoch, skip = restore(state, resume, args.seed, d, log.line)
        log.line(f"resumed {run_dir} at epoch {start_epoch + 1}, step {skip} of the epoch")
    else:
        seed_everything(args.seed * d.world + d.rank)  # distinct noise, timesteps and label drops per rank

    # --- evaluation: grids and --fid_every sample the EMA (or with --compat raw_weights the raw) weights through one
    # network, compiled at its first use for the sampler's batch (a run that stops before its first grid never does)
    sampler = Sampler.from_args(args, fast=fast, pixels=compat.pixels)
    sampled = state.ema.module if compat.weights == "ema" else models
    sampling_net = sampler.prepare(sampled["net"], (cfg["inch"], cfg["image_size"], cfg["image_size"]), args.cdim,
                                   d.device, log.line, lambda outcome: log.record(event="compile", **outcome))
    evaluator = make_evaluator(args, cfg, diffusion, d, sampler, log.line, compat.weights) if args.fid_every else None
    n_params = sum(p.numel() for p in models.parameters())
    log.line(f"run dir {run_dir}; {args.dataset} {tuple(images.shape)}; {n_params / 1e6:.2f} M parameters; "
             f"{d.world} process(es) on {d.device.type}; global batch {args.batchsize * d.world}")

    # --- training loop: nothing reads the device between log steps, so the CPU runs ahead of the GPU
    guards = Guards(StopSignal(d.world, d.control), args.max_steps, len(batches), d)
    step = start_epoch * len(batches) + skip
    for epoch in range(start_epoch, args.epoch):
        models.train()  # enables dropout; label dropout for CFG is inside DiffusionLoss
        order = batches.epoch(epoch).to(images.device)  # the epoch's indices reach the data's device once
        epoch_labels = labels[order.to(d.device)]  # and its labels are gathered once, on the training device
        window, whole_epoch, why = LossMeter(d.device), LossMeter(d.device), None
        bar = tqdm(range(skip, len(batches)), desc=f"epoch {epoch + 1}/{args.epoch}", disable=not d.is_main,
                   initial=skip, total=len(batches), dynamic_ncols=True, leave=False)
        for i in bar:
            idx = order[i]
            step_loss = train_step(images[idx] if on_device else staged(idx), epoch_labels[i])
            step += 1
            guards.watch(step_loss, step)
            window.add(step_loss)
            whole_epoch.add(step_loss)
            if step % args.log_every == 0:
                guards.check_finite()  # reading the device: the loop's one sync point
                mean_loss, rate = window.read(d.world, args.batchsize)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                log.record(event="train", epoch=epoch + 1, step=step, loss=mean_loss,
                           lr=optimizer.param_groups[0]["lr"], img_per_s=rate)
                window = LossMeter(d.device)
            if why := guards.stop_reason(step):
                break
        bar.close()
        guards.check_finite()
        if why:
            path = save(epoch, i + 1)
            log.line(f"stopped by {why} at step {step} (epoch {epoch + 1}); checkpoint -> {path}; "
                     f"resume with: python train.py --path_resume {run_dir}")
            break
        skip, done, last = 0, epoch + 1, epoch + 1 == args.epoch
        if whole_epoch.n:  # the epoch's mean loss on disk even when --log_every was never reached
            mean_loss, rate = whole_epoch.read(d.world, args.batchsize)
            log.record(event="epoch", epoch=done, step=step, loss=mean_loss, lr=optimizer.param_groups[0]["lr"],
                       img_per_s=rate, steps=whole_epoch.n)
        log.line(f"epoch {done}/{args.epoch} done, step {step}, lr {optimizer.param_groups[0]['lr']:.3g}")
        state.scheduler.step()
        sampled.eval()  # the raw models go back to train() at the next epoch's start
        if d.is_main and (done % args.sample_every == 0 or last):
            grid = os.path.join(run_dir, "samples", f"grid_{done}.png")
            log.line(f"sample grid ({compat.weights} weights) -> "
                     f"{sample_grid(diffusion, sampling_net, sampled['cemblayer'], cfg, sampler, grid)}")
        if evaluator is not None and (done % args.fid_every == 0 or last):
            evaluate_or_skip(evaluator, sampling_net, sampled["cemblayer"], done, step, log)
        if done % args.interval == 0 or last:
            log.line(f"checkpoint -> {save(done, 0)}")

    # --- teardown
    guards.stop.restore()
    teardown_distributed()
    return {"net": models["net"], "cemblayer": models["cemblayer"], "ema": state.ema.module}


def build_parser() -> argparse.ArgumentParser:
    """Flags of the original train.py (same names and meaning) plus this project's additions."""
    p = argparse.ArgumentParser(description="Train a class-conditional diffusion model with classifier-free "
                                "guidance; --mode proto_* conditions it on class prototypes (ProtoDiffusion).")
    p.add_argument("--batchsize", type=int, default=256, help="batch size per device")
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
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data_root", default="datasets", help="folder holding the datasets (imagefolder: the folder "
                   "of class folders itself)")
    p.add_argument("--download", type=str2bool, default=True, help="download cifar10/stl10 when missing")
    p.add_argument("--tiny_imagenet_path", default=None, help="the unzipped tiny-imagenet-200 folder, or its train/ "
                   "folder as the original code took it (default DATA_ROOT/tiny-imagenet-200)")
    p.add_argument("--path_resume", default=None, help="run dir to continue, bit for bit, from its newest checkpoint")
    p.add_argument("--run_dir", default=None, help="run dir to create (default RESULTS/{mode}/{dataset}/{timestamp}); "
                   "must not exist yet")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in all, with a checkpoint "
                   "to resume from (0: run all epochs)")
    p.add_argument("--keep_last", type=int, default=0, help="keep only the newest K checkpoints (0: keep all)")
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
    p.add_argument("--sample_every", type=int, default=20, help="save a sample grid every this many epochs (and at the end)")
    p.add_argument("--fid_every", type=int, default=0, help="measure FID (or proto-FID) of the EMA weights every this "
                   "many epochs and at the end, into metrics.jsonl (0: never)")
    p.add_argument("--fid_num", type=int, default=500, help="images per periodic FID (balanced classes, fixed seeds)")
    p.add_argument("--per_class", type=str2bool, default=False, help="periodic FID records also give each class's "
                   "FID (its samples against its own reference statistics) and class accuracy")
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


if __name__ == "__main__":
    run_cli(main, build_parser())
