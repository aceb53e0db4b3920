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
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from datasets import DATASETS, DatasetError, ShardedBatches, class_grid_labels, load_dataset, save_grid, to_float, to_uint8
from diffusion import GaussianDiffusion, drop_condition, make_betas
from ema import EMA
from embedding import ConditionalEmbedding, rows_with_norms_of, set_class_table, shuffled_rows
from runtime import (RunLog, StopSignal, UserError, adamw, broadcast_object, compile_or_eager, int_list, load_file,
                     new_run_dir, resolve_fast_path, rng_state, run_cli, save_atomic, seed_everything, set_rng_state,
                     setup_distributed, str2bool, teardown_distributed)
from unet import Unet, check_unet_config

MODES = ("regular", "proto_frozen", "proto_unfrozen", "random_scaled", "proto_shuffled")
# controls: random_scaled = random directions with the prototypes' row norms, proto_shuffled = prototypes of
# other classes; both frozen like proto_frozen, so each differs from it in one property only
FROZEN = ("proto_frozen", "random_scaled", "proto_shuffled")
# flags that describe this invocation rather than the run; everything else comes from config.json on resume
RUNTIME_FLAGS = ("path_resume", "run_dir", "device", "debug", "numworkers", "local_rank", "max_steps", "keep_last")


def build_models(cfg: dict) -> tuple[Unet, ConditionalEmbedding]:
    """The UNet and the class embedding described by a run config."""
    net = Unet(in_ch=cfg["inch"], mod_ch=cfg["modch"], out_ch=cfg["outch"], ch_mul=cfg["chmul"],
               num_res_blocks=cfg["numres"], cdim=cfg["cdim"], use_conv=cfg["useconv"], droprate=cfg["droprate"])
    return net, ConditionalEmbedding(cfg["num_classes"], cfg["cdim"], cfg["cdim"])


def make_lr_schedule(optimizer: torch.optim.Optimizer, epochs: int, multiplier: float):
    """Per epoch: linear warm-up from lr to lr*multiplier over max(1, epochs//20) epochs, then cosine to 0.

    The optimizer's lr must already be the peak (lr * multiplier). The original's GradualWarmupScheduler
    fell back to the base lr after warm-up; we keep the peak, as its own docstring intended.
    """
    warm = max(1, epochs // 20)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / multiplier, end_factor=1.0,
                                               total_iters=warm)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warm), eta_min=0.0)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warm])


def validate(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot work, before any data is touched."""
    if args.mode not in MODES:
        raise UserError(f"unknown --mode '{args.mode}' (choose from {', '.join(MODES)})")
    if args.mode != "regular" and not args.path_proto:
        raise UserError(f"--mode {args.mode} needs --path_proto (a prototype checkpoint from train_classifier.py, "
                        "the authors' best_model.pt, or a [classes, cdim] tensor)")
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset '{args.dataset}' (choose from {', '.join(DATASETS)})")
    try:
        check_unet_config(args.modch, args.chmul)
    except ValueError as e:
        raise UserError(str(e)) from None
    for flag in ("batchsize", "epoch", "interval", "sample_every", "log_every", "genbatch", "T"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.run_dir and not args.path_resume and os.path.exists(args.run_dir):
        raise UserError(f"--run_dir {args.run_dir} already exists; pick a new one or continue it with --path_resume")
    if args.ddim and not 2 <= args.num_steps <= args.T:
        raise UserError(f"--num_steps must be between 2 and --T ({args.T}); got {args.num_steps}")
    if args.fid_every and args.fid_features == "classifier" and not (args.eval_classifier or args.path_proto):
        raise UserError("--fid_every with --fid_features classifier needs --eval_classifier (or --path_proto)")
    if args.fid_every and args.fid_features not in ("inception", "classifier"):
        raise UserError(f"unknown --fid_features '{args.fid_features}' (choose inception or classifier)")


def latest_checkpoint(run_dir: str) -> str:
    """The newest checkpoint of a run dir, as named by checkpoints/last_epoch.pt."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    marker = load_file(os.path.join(ckpt_dir, "last_epoch.pt"), "resume marker")
    if not isinstance(marker, dict) or "last_epoch" not in marker:
        raise UserError(f"{ckpt_dir}/last_epoch.pt is not a resume marker")
    return os.path.join(ckpt_dir, marker.get("file", f"ckpt_{marker['last_epoch']}_checkpoint.pt"))


def main(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Train; returns this rank's final modules (net, cemblayer, ema) for callers such as tests."""
    # --- distributed setup and the run config
    d = setup_distributed(args.device)
    resume = None
    if args.path_resume:
        if not os.path.isfile(os.path.join(args.path_resume, "config.json")):
            raise UserError(f"--path_resume {args.path_resume} is not a run dir of this code (no config.json)")
        saved = json.load(open(os.path.join(args.path_resume, "config.json")))
        for key, value in saved.items():
            if key not in RUNTIME_FLAGS and key in vars(args):
                setattr(args, key, value)
        resume = load_file(latest_checkpoint(args.path_resume))
    validate(args)
    fast = resolve_fast_path(args.amp, args.compile, args.channels_last, d.device)

    # --- data: decoded once, kept as uint8 on the training device
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
    clsnum = args.clsnum or min(len(data.classes), 10)
    if not 1 <= clsnum <= len(data.classes) or args.genbatch < clsnum:
        raise UserError(f"the sample grid needs 1 <= --clsnum <= {len(data.classes)} and --genbatch >= --clsnum; "
                        f"got clsnum {clsnum}, genbatch {args.genbatch}")
    cfg = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}
    cfg.update(inch=data.channels, outch=data.channels, image_size=data.size, num_classes=len(data.classes),
               classes=data.classes, clsnum=clsnum, world_size=d.world, torch=str(torch.__version__))
    protos = None
    if args.mode != "regular" and resume is None:  # checked before anything is written
        from prototypes import load_prototypes  # only the proto modes need the classifier code
        protos, source = load_prototypes(args.path_proto)
        if tuple(protos.shape) != (cfg["num_classes"], args.cdim):
            raise UserError(f"prototypes in {args.path_proto} are {protos.shape[0]} x {protos.shape[1]} and do not fit "
                            f"this run, which needs {cfg['num_classes']} classes (--dataset {args.dataset}) x "
                            f"{args.cdim} (--cdim)")
    # the uint8 images live on the GPU when they take under a quarter of its free memory
    on_device = d.device.type == "cpu" or data.images.numel() < torch.cuda.mem_get_info(d.device)[0] // 4
    images = data.images.to(d.device) if on_device else data.images.pin_memory()
    labels = data.labels.to(d.device)
    batches = ShardedBatches(len(labels), args.batchsize, d.rank, d.world, args.seed)

    # --- run dir: rank 0 creates it and tells the others
    run_dir = args.path_resume or args.run_dir or broadcast_object(
        new_run_dir(args.results, args.mode, args.dataset) if d.is_main else None)
    log = RunLog(run_dir, d.is_main)
    if d.is_main:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        if resume is None:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)

    # --- model, class table and EMA: the same init on every rank (DDP also broadcasts rank 0's weights)
    seed_everything(args.seed)
    net, cemblayer = build_models(cfg)
    if protos is not None:
        table = {"random_scaled": lambda: rows_with_norms_of(protos, args.seed),
                 "proto_shuffled": lambda: shuffled_rows(protos, args.seed)}.get(args.mode, lambda: protos)()
        set_class_table(cemblayer, table, trainable=args.mode == "proto_unfrozen")
        log.line(f"loaded prototypes from {args.path_proto}: {protos.shape[0]} x {protos.shape[1]} ({source}); "
                 f"table = {args.mode}, {'trained' if args.mode == 'proto_unfrozen' else 'frozen'}")
    elif args.mode in FROZEN:
        cemblayer.table.requires_grad_(False)
    net.to(d.device, memory_format=torch.channels_last if fast.channels_last else torch.preserve_format)
    cemblayer.to(d.device)
    models = nn.ModuleDict({"net": net, "cemblayer": cemblayer})
    ema = EMA(models, args.ema_decay)

    # --- optimizer and schedule: AdamW at the warm-up's peak, scaled per epoch by the schedule
    optimizer = adamw([p for p in models.parameters() if p.requires_grad], args.lr * args.multiplier, args.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type, enabled=fast.amp == torch.float16)  # fp16 only; bf16 needs none
    scheduler = make_lr_schedule(optimizer, args.epoch, args.multiplier)
    diffusion = GaussianDiffusion(make_betas(args.schedule, args.T), d.device, v=args.v, low_t_frac=args.low_t_frac)

    def batch_loss(unet: nn.Module, cemb_module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x0 = to_float(images[idx.to(images.device)].to(d.device, non_blocking=True))
        if fast.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with fast.autocast(d.device):
            cemb = drop_condition(cemb_module(labels[idx]), args.threshold)
            return diffusion.train_loss(unet, x0, cemb)

    if fast.compile:  # before the DDP wrap; the probe batch has the training shape, so nothing recompiles later
        probe = torch.arange(args.batchsize, device=d.device) % len(labels)
        net_fwd = compile_or_eager(net, lambda m: batch_loss(m, cemblayer, probe), d.device, log.line)
    else:
        net_fwd = net
    ddp = (lambda m: DDP(m, device_ids=[d.local_rank] if d.device.type == "cuda" else None)) if d.world > 1 else (lambda m: m)
    net_ddp, cemb_ddp = ddp(net_fwd), ddp(cemblayer)
    start_epoch, skip = 0, 0
    if resume is not None:
        net.load_state_dict(resume["net"])
        cemblayer.load_state_dict(resume["cemblayer"])
        ema.module["net"].load_state_dict(resume["ema"]["net"])
        ema.module["cemblayer"].load_state_dict(resume["ema"]["cemblayer"])
        ema.updates = resume["ema"]["updates"]
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch, skip = resume["epoch"], resume["step"]
        if len(resume["rng"]) == d.world:
            set_rng_state(resume["rng"][d.rank])
        else:  # the data shards differ too, so the continuation is sound but not bit-identical
            seed_everything((args.seed + 1 + start_epoch) * d.world + d.rank)
            log.line(f"the checkpoint was written by {len(resume['rng'])} process(es), this run has {d.world}: "
                     "continuing with fresh per-rank seeds (not bit-identical to an uninterrupted run)")
        log.line(f"resumed {run_dir} at epoch {start_epoch + 1}, step {skip} of the epoch")
    else:
        seed_everything(args.seed * d.world + d.rank)  # distinct noise, timesteps and label drops per rank
    evaluator = make_evaluator(args, cfg, diffusion, d, fast) if args.fid_every else None
    n_params = sum(p.numel() for p in models.parameters())
    log.line(f"run dir {run_dir}; {args.dataset} {tuple(images.shape)}; {n_params / 1e6:.2f} M parameters; "
             f"{d.world} process(es) on {d.device.type}; global batch {args.batchsize * d.world}")

    # --- training loop
    stop = StopSignal()
    first_bad = torch.full((), -1, dtype=torch.long, device=d.device)  # first step with a non-finite loss
    step = start_epoch * len(batches) + skip
    checkpoint = lambda epoch, done: save_checkpoint(run_dir, epoch, done, len(batches), models, ema, optimizer,
                                                     scheduler, scaler, cfg, d.world, args.keep_last)  # noqa: E731
    for epoch in range(start_epoch, args.epoch):
        models.train()  # enables dropout; label dropout for CFG is drop_condition below
        t0, loss_sum, n_sum = time.time(), torch.zeros((), device=d.device), 0
        bar = tqdm(batches.epoch(epoch)[skip:], desc=f"epoch {epoch + 1}/{args.epoch}", disable=not d.is_main,
                   initial=skip, total=len(batches), dynamic_ncols=True, leave=False)
        for i, idx in enumerate(bar, start=skip):
            loss = batch_loss(net_ddp, cemb_ddp, idx.to(d.device))  # one copy of the indices per step
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            ema.update(models)
            step += 1
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            loss_sum += loss
            n_sum += 1
            if step % args.log_every == 0:
                check_finite(first_bad, len(batches))  # reading the device is the sync point of the loop
                mean_loss = loss_sum / n_sum
                if d.world > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss /= d.world
                mean_loss = mean_loss.item()
                rate = n_sum * args.batchsize * d.world / (time.time() - t0)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                log.record(event="train", epoch=epoch + 1, step=step, loss=mean_loss,
                           lr=optimizer.param_groups[0]["lr"], img_per_s=rate)
                t0, loss_sum, n_sum = time.time(), torch.zeros((), device=d.device), 0
            if stop.agreed(d.world, d.control) or step == args.max_steps:
                bar.close()
                check_finite(first_bad, len(batches))
                path = checkpoint(epoch, i + 1)
                why = f"{stop.received or 'a signal to another rank'}" if stop.received or step != args.max_steps \
                    else f"--max_steps {args.max_steps}"
                log.line(f"stopped by {why} at step {step} (epoch {epoch + 1}); checkpoint -> {path}; resume with: "
                         f"python train.py --path_resume {run_dir}")
                stop.restore()
                teardown_distributed()
                return {"net": net, "cemblayer": cemblayer, "ema": ema.module}
        bar.close()
        skip = 0
        check_finite(first_bad, len(batches))
        log.line(f"epoch {epoch + 1}/{args.epoch} done, step {step}, lr {optimizer.param_groups[0]['lr']:.3g}")
        scheduler.step()
        last = epoch + 1 == args.epoch
        if d.is_main and ((epoch + 1) % args.sample_every == 0 or last):
            with fast.autocast(d.device):
                path = sample_grid(diffusion, ema.module, cfg, args, epoch + 1, run_dir, d.device)
            log.line(f"sample grid (EMA weights) -> {path}")
        if evaluator is not None and ((epoch + 1) % args.fid_every == 0 or last):
            result = evaluator(ema.module)
            log.record(event="fid", epoch=epoch + 1, step=step, **result)
            log.line(f"epoch {epoch + 1}: {result['metric']} {result['value']:.4f}" +
                     (f", class accuracy {result['class_accuracy']:.4f}" if "class_accuracy" in result else ""))
        if (epoch + 1) % args.interval == 0 or last:
            log.line(f"checkpoint -> {checkpoint(epoch + 1, 0)}")

    stop.restore()
    teardown_distributed()
    return {"net": net, "cemblayer": cemblayer, "ema": ema.module}


def check_finite(first_bad: torch.Tensor, steps_per_epoch: int) -> None:
    """Stop with one clear line if any step so far had a NaN or infinite loss (nothing more is saved)."""
    bad = int(first_bad.item())
    if bad >= 0:
        raise UserError(f"the loss became NaN or infinite at step {bad} (epoch {(bad - 1) // steps_per_epoch + 1}); "
                        "training stopped and the checkpoints on disk are the last good ones (lower --lr?)")


def make_evaluator(args: argparse.Namespace, cfg: dict, diffusion: GaussianDiffusion, d, fast):
    """A function EMA models -> FID record, sampling --fid_num images split across ranks (sample.py's evaluate)."""
    from sample import evaluate, image_labels, reference_path  # only runs with --fid_every need the metrics code

    path = args.eval_classifier or args.path_proto
    classifier = None
    if path:
        from prototypes import load_classifier
        classifier = load_classifier(path).to(d.device)
    ref = reference_path(cfg, args.fid_features, args.data_root, path)
    labels = image_labels(args.fid_num, cfg["num_classes"], "range", args.seed)
    steps = args.num_steps if args.ddim else args.T

    def run(models: nn.Module) -> dict:
        r = evaluate(diffusion, models["net"], models["cemblayer"], cfg, labels, args.fid_features, classifier, ref,
                     args.data_root, args.seed, args.genbatch, args.ddim, args.num_steps, args.eta, args.select,
                     args.w, d.rank, d.world, fast=fast)
        out = {"metric": "FID" if args.fid_features == "inception" else "proto-FID", "value": r["fid"], "n": r["n"],
               "sampler": "ddim" if args.ddim else "ddpm", "steps": steps, "w": args.w, "weights": "ema",
               "reference": os.path.abspath(ref), "features": args.fid_features if args.fid_features == "inception"
               else f"classifier {os.path.abspath(path)}"}
        if "class_accuracy" in r:
            out["class_accuracy"] = r["class_accuracy"]
        return out
    return run


@torch.no_grad()
def sample_grid(diffusion: GaussianDiffusion, models: nn.Module, cfg: dict, args: argparse.Namespace, epoch: int,
                run_dir: str, device: torch.device) -> str:
    """A class-per-row grid from fixed seeds, so grids of successive epochs are comparable."""
    per_class = args.genbatch // cfg["clsnum"]
    labels = class_grid_labels(cfg["clsnum"], per_class).to(device)
    cemb = models["cemblayer"](labels)
    shape = (len(labels), cfg["inch"], cfg["image_size"], cfg["image_size"])
    gen = torch.Generator().manual_seed(args.seed)
    if args.ddim:
        x = diffusion.ddim_sample(models["net"], cemb, shape, args.num_steps, args.eta, args.select, args.w, gen)
    else:
        x = diffusion.sample(models["net"], cemb, shape, args.w, gen)
    path = os.path.join(run_dir, "samples", f"grid_{epoch}.png")
    save_grid(to_uint8(x), per_class, path)
    return path


def save_checkpoint(run_dir: str, epoch: int, step: int, steps_per_epoch: int, models: nn.ModuleDict, ema: EMA,
                    optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler, cfg: dict, world: int,
                    keep_last: int) -> str:
    """Rank 0 writes the state after `step` steps of epoch index `epoch` (step 0: `epoch` epochs are done).

    Epoch checkpoints are ckpt_{epoch}_checkpoint.pt (the original's name), others step_{global}_checkpoint.pt;
    last_epoch.pt names the newest and is replaced only after it is safely on disk. Every rank hands in its
    RNG state, so a resumed run continues bit for bit.
    """
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    global_step = epoch * steps_per_epoch + step
    name = f"ckpt_{epoch}_checkpoint.pt" if step == 0 else f"step_{global_step}_checkpoint.pt"
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if int(os.environ.get("RANK", 0)) != 0:
        return os.path.join(ckpt_dir, name)
    ckpt = {"net": models["net"].state_dict(), "cemblayer": models["cemblayer"].state_dict(),
            "ema": {"net": ema.module["net"].state_dict(), "cemblayer": ema.module["cemblayer"].state_dict(),
                    "updates": ema.updates},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step,
            "global_step": global_step, "rng": states, "config": cfg}
    try:
        save_atomic(ckpt, os.path.join(ckpt_dir, name))
        save_atomic({"last_epoch": epoch, "file": name}, os.path.join(ckpt_dir, "last_epoch.pt"))
    except OSError as e:
        raise UserError(f"could not write checkpoint {os.path.join(ckpt_dir, name)} ({e.strerror or e}); the "
                        "checkpoints already on disk are unchanged") from None
    if keep_last > 0:
        def global_step_of(f: str) -> int:
            kind, number = f.split("_")[:2]
            return int(number) * steps_per_epoch if kind == "ckpt" else int(number)
        saved = sorted((f for f in os.listdir(ckpt_dir) if f.endswith("_checkpoint.pt")), key=global_step_of)
        for old in saved[:-keep_last]:
            os.remove(os.path.join(ckpt_dir, old))
    return os.path.join(ckpt_dir, name)


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
    p.add_argument("--genbatch", type=int, default=80, help="images in each sample grid")
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
    p.add_argument("--tiny_imagenet_path", default=None, help="tiny-imagenet-200 folder (default DATA_ROOT/tiny-imagenet-200)")
    p.add_argument("--path_resume", default=None, help="run dir to continue, bit for bit, from its newest checkpoint")
    p.add_argument("--run_dir", default=None, help="run dir to create (default RESULTS/{mode}/{dataset}/{timestamp}); "
                   "must not exist yet")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in all, with a checkpoint "
                   "to resume from (0: run all epochs)")
    p.add_argument("--keep_last", type=int, default=0, help="keep only the newest K checkpoints (0: keep all)")
    p.add_argument("--mode", default="regular", help=f"class table: {' / '.join(MODES)}")
    p.add_argument("--path_proto", default=None, help="prototype file for the proto modes")
    p.add_argument("--seed", type=int, default=0, help="global seed (rank r uses seed x world + r for noise)")
    p.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (warm-up min(decay, (1+n)/(10+n)))")
    p.add_argument("--log_every", type=int, default=100, help="read and log the loss every this many steps")
    p.add_argument("--sample_every", type=int, default=20, help="save a sample grid every this many epochs (and at the end)")
    p.add_argument("--fid_every", type=int, default=0, help="measure FID (or proto-FID) of the EMA weights every this "
                   "many epochs and at the end, into metrics.jsonl (0: never)")
    p.add_argument("--fid_num", type=int, default=500, help="images per periodic FID (balanced classes, fixed seeds)")
    p.add_argument("--fid_features", default="inception", help="inception (FID) or classifier (proto-FID, offline)")
    p.add_argument("--eval_classifier", default=None, help="classifier for proto-FID and class accuracy "
                   "(default: --path_proto)")
    p.add_argument("--results", default="results", help="runs go to RESULTS/{mode}/{dataset}/{timestamp}")
    p.add_argument("--amp", default="auto", help="autocast dtype: bf16, fp16 (with a GradScaler) or none; auto is "
                   "bf16 on CUDA and none on CPU")
    p.add_argument("--compile", default="auto", help="torch.compile the UNet (True/False; auto: on CUDA only)")
    p.add_argument("--channels_last", default="auto", help="channels_last memory format (True/False; auto: on)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
