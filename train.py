"""Train ProtoDiffusion's class-conditional diffusion model (random class table, or class prototypes).

One process (CPU or one GPU):
    python train.py --dataset digits --modch 64 --chmul 1,2 --numres 1 --epoch 40 --batchsize 64
One node, all its GPUs:
    torchrun --standalone --nproc_per_node=gpu train.py --dataset cifar10 --batchsize 64 --image_size 32 \
        --cdim 128 --mode proto_frozen --path_proto classifier.pt
Two nodes (run on each, NODE = 0 or 1):
    torchrun --nnodes=2 --node_rank=NODE --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
`--batchsize` is per device, as in the original, and the global batch is batchsize x processes; `--global_batch N`
fixes it whatever the process count, by accumulating micro-batches of --batchsize.
"""
import argparse
import os

import torch
from torch import nn
from tqdm import tqdm

from batches import ShardedBatches, StagedBatches
from checkpoints import (TrainState, build_models, make_run_dir, read_resume, restore, run_models,
                         save_checkpoint)
from cli import UserError, check_flags, run_cli
from compat import Compat
from datasets import ImageData, load_dataset
from diffusion import GaussianDiffusion, make_betas
from distributed import StopSignal, main_rank_first, seed_everything, setup_distributed, teardown_distributed
from ema import EMA
from embedding import expected_row_norm, rows_at_norm, rows_with_norms_of, set_class_table, shuffled_rows
from evaluate import evaluate_or_skip, make_evaluator
from lr_schedule import continued_schedule, make_lr_schedule
from runlog import Guards, LossMeter, RunLog, summary_writer_class
from sampling import Sampler, sample_grid
from speed import adamw, load_compile_cache, resolve_fast_path, save_compile_cache
from train_flags import FLAG_RULES, RUNTIME_FLAGS, build_parser  # every flag, its help and its rule
from train_step import DiffusionLoss, TrainStep, compile_loss, wrap_ddp
from unet import check_unet_config

# controls: random_scaled = random directions with the prototypes' row norms, proto_shuffled = prototypes of
# other classes; both frozen like proto_frozen, so each differs from it in one property only
FROZEN = ("proto_frozen", "random_scaled", "proto_shuffled")


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


def read_resume_flags(args: argparse.Namespace) -> tuple[dict, dict]:
    """The newest checkpoint of --path_resume and its run's flags in args; a flag given on the command line that
    differs from the run's is refused, but --epoch (a new total) and, under --global_batch, --batchsize (a memory
    setting)."""
    given = getattr(args, "given_flags", None)  # run_cli's; a caller of main() gives the values it changed
    if given is None:
        defaults = vars(build_parser().parse_args([]))
        given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    resume, changes = read_resume(args.path_resume, args, RUNTIME_FLAGS, set(given), ("epoch", "batchsize"))
    if "batchsize" in changes and not args.global_batch:
        raise UserError(f"--batchsize {args.batchsize} (the run has {changes['batchsize'][0]}): without --global_batch "
                        "it sets the run's global batch, which a resumed run keeps")
    if "epoch" in changes and args.epoch <= resume["epoch"]:
        raise UserError(f"--epoch {args.epoch}: {args.path_resume} has trained {resume['epoch']} epoch(s) already; "
                        "a new total must be larger")
    return resume, changes


def micro_batches(global_batch: int, batchsize: int, world: int) -> int:
    """Micro-batches each process accumulates per optimizer step: --global_batch / (--batchsize x processes)."""
    if global_batch == 0:
        return 1
    if global_batch % world:
        raise UserError(f"--global_batch {global_batch} cannot be split over {world} processes; use a process count "
                        f"that divides it")
    if global_batch % (batchsize * world):
        raise UserError(f"--global_batch {global_batch} is not a multiple of --batchsize x processes "
                        f"({batchsize} x {world} = {batchsize * world}); use a --batchsize that divides "
                        f"{global_batch // world}")
    return global_batch // (batchsize * world)


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
    if args.run_dir and not args.path_resume and os.path.exists(args.run_dir) and args.if_exists == "error":
        raise UserError(f"--run_dir {args.run_dir} already exists; pick a new one, continue it with --path_resume, "
                        "or start-or-continue it with --if_exists continue")
    if args.ddim and not 2 <= args.num_steps <= args.T:
        raise UserError(f"--num_steps must be between 2 and --T ({args.T}); got {args.num_steps}")
    if args.fid_every and args.fid_features == "classifier" and not (args.eval_classifier or args.path_proto):
        raise UserError("--fid_every with --fid_features classifier needs --eval_classifier (or --path_proto)")
    if args.tensorboard:
        summary_writer_class()  # the package is there, or one line before anything is written


def read_data(args: argparse.Namespace, world: int) -> tuple[ImageData, dict]:
    """The dataset (decoded once, uint8) and the run config it completes; refuses what does not fit it."""
    data = load_dataset(args.dataset, "all", args.data_root, args.image_size, args.download, args.tiny_imagenet_path,
                        args.numworkers, args.crop)
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
    cfg = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS and k != "given_flags"}
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
                                 args.tiny_imagenet_path, args.numworkers, args.crop)
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
    if args.if_exists == "continue" and args.run_dir and not args.path_resume and \
            os.path.isfile(os.path.join(args.run_dir, "checkpoints", "last_epoch.pt")):
        args.path_resume = args.run_dir
    resume, changes = read_resume_flags(args) if args.path_resume else (None, {})
    validate(args)
    micro = micro_batches(args.global_batch, args.batchsize, d.world)
    finished = resume is not None and resume["epoch"] >= args.epoch  # a rerun of a finished run: nothing to train
    compat = Compat.of(args.compat, args.dataset)
    fast = resolve_fast_path(args.amp, args.compile, args.channels_last, d.device, args.compile_mode,
                             args.compile_scope)

    # --- data: uint8 images on the training device when they take under a quarter of its free memory
    data, cfg = main_rank_first(lambda: read_data(args, d.world), d)  # one rank downloads, then the rest read
    protos = read_prototypes(args, cfg, d.device) if resume is None else None
    on_device = d.device.type == "cpu" or data.images.numel() < torch.cuda.mem_get_info(d.device)[0] // 4
    images = data.images.to(d.device) if on_device else data.images
    labels = data.labels.to(d.device)
    staged = None if on_device else StagedBatches(images, args.batchsize * micro, d.device)
    batches = ShardedBatches(len(labels), args.batchsize, d.rank, d.world, args.seed, micro, data.source)

    # --- run dir and log
    run_dir = make_run_dir(args.results, args.mode, args.dataset, args.path_resume or args.run_dir, cfg, d,
                           fresh=resume is None or bool(changes))  # config.json gets the new --epoch
    log = RunLog(run_dir, d.is_main, args.tensorboard)
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
    if fast.compile and not finished:
        load_compile_cache(compile_cache, log.line)
        probe = torch.arange(args.batchsize, device=images.device) % len(labels)
        ddp_loss, outcome = compile_loss(loss, ddp_loss, d, (images[probe].to(d.device), labels[probe.to(d.device)]),
                                         log.line)
        log.record(event="compile", **outcome)
    train_step = TrainStep(ddp_loss, models, optimizer, state.scaler, state.ema, fast, micro)

    def save(epoch: int, step_in_epoch: int, scheduled_step: bool = False) -> str:
        """The checkpoint (every rank hands in its RNG state) and, with compile, rank 0's compile cache."""
        path = save_checkpoint(run_dir, state, epoch, step_in_epoch, len(batches), cfg, d.world, args.keep_last,
                               compat.weights, scheduled_step)
        if fast.compile and d.is_main:
            save_compile_cache(compile_cache)
        return path

    # --- resume: optimizer, schedule, EMA, RNG and the position in the data
    start_epoch, skip = 0, 0
    if resume is not None:
        start_epoch, skip = restore(state, resume, args.seed, d, log.line)
        if "epoch" in changes:
            state.scheduler = continued_schedule(optimizer, args.epoch, args.multiplier, compat.original_lr, start_epoch,
                                                 changes["epoch"][0], log.line)
        if finished:
            log.line(f"{run_dir} has trained all {args.epoch} epochs; nothing to do")
            teardown_distributed()
            return {"net": models["net"], "cemblayer": models["cemblayer"], "ema": state.ema.module}
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
             f"{d.world} process(es) on {d.device.type}; global batch {args.batchsize * d.world * micro} "
             f"({d.world} x {micro} micro-batch(es) of {args.batchsize})")

    # --- training loop: nothing reads the device between log steps, so the CPU runs ahead of the GPU
    guards = Guards(StopSignal(d.world, d.control), args.max_steps, len(batches), d)
    step = start_epoch * len(batches) + skip
    save_steps = set(args.save_steps or ())
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
                mean_loss, rate = window.read(d.world, args.batchsize * micro)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                log.record(event="train", epoch=epoch + 1, step=step, loss=mean_loss,
                           lr=optimizer.param_groups[0]["lr"], img_per_s=rate)
                window = LossMeter(d.device)
            if step in save_steps and i + 1 < len(batches):  # an epoch's last step saves with the epoch
                log.line(f"step {step}: checkpoint -> {save(epoch, i + 1, True)}")
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
            mean_loss, rate = whole_epoch.read(d.world, args.batchsize * micro)
            log.record(event="epoch", epoch=done, step=step, loss=mean_loss, lr=optimizer.param_groups[0]["lr"],
                       img_per_s=rate, steps=whole_epoch.n)
        log.line(f"epoch {done}/{args.epoch} done, step {step}, lr {optimizer.param_groups[0]['lr']:.3g}")
        state.scheduler.step()
        sampled.eval()  # the raw models go back to train() at the next epoch's start
        if d.is_main and (done % args.sample_every == 0 or last):
            grid = os.path.join(run_dir, "samples", f"grid_{done}.png")
            log.line(f"sample grid ({compat.weights} weights) -> "
                     f"{sample_grid(diffusion, sampling_net, sampled['cemblayer'], cfg, sampler, grid)}")
            log.grid(grid, step)
        if evaluator is not None and (done % args.fid_every == 0 or last):
            evaluate_or_skip(evaluator, sampling_net, sampled["cemblayer"], done, step, log)
        if done % args.interval == 0 or last or done in (args.save_epochs or ()) or step in save_steps:
            log.line(f"checkpoint -> {save(done, 0, step in save_steps)}")

    # --- teardown
    log.close()
    guards.stop.restore()
    teardown_distributed()
    return {"net": models["net"], "cemblayer": models["cemblayer"], "ema": state.ema.module}


if __name__ == "__main__":
    run_cli(main, build_parser())
