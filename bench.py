"""Throughput of a training step and of guided DDIM sampling: eager fp32 beside the optimised path, one process.

    python bench.py --modch 64 --chmul 1,2,4,4 --image_size 32 --batchsize 8          # the paper's CIFAR10 UNet
    python bench.py --inch 1 --modch 64 --chmul 1,2 --numres 1 --image_size 8 --batchsize 64 --json
A training step is forward + backward + optimizer + EMA, as in train.py. Sampling is timed over a few guided
DDIM steps (CFG as two B-forwards and as one 2B-forward) and scaled to --num_steps. Compilation time is
printed on its own line and not counted. On CUDA, FLOPs come from torch's FlopCounterMode (counted once).
"""
import argparse
import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion import GaussianDiffusion, drop_condition, linear_betas
from ema import EMA
from embedding import ConditionalEmbedding
from runtime import (FastPath, UserError, adamw, at_least, check_flags, compile_or_eager, int_list, resolve_fast_path,
                     run_cli, str2bool)
from unet import Unet, check_unet_config

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM datasheets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """CUDA: peak allocated since the row's reset. CPU: None, since the only peak there is the whole process's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def use_tf32(device: torch.device, fast: FastPath | None) -> None:
    """The optimised path allows TF32 everywhere (as train.py does); eager fp32 keeps PyTorch's defaults."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = fast is not None
        torch.backends.cudnn.allow_tf32 = True


def build(args: argparse.Namespace, device: torch.device, fast: FastPath | None):
    use_tf32(device, fast)
    torch.manual_seed(0)
    net = Unet(args.inch, args.modch, args.inch, args.chmul, args.numres, args.cdim).to(device)
    cemb = ConditionalEmbedding(args.classes, args.cdim, args.cdim).to(device)
    if fast is not None and fast.channels_last:
        net.to(memory_format=torch.channels_last)
    return net, cemb


def bench_train(args: argparse.Namespace, device: torch.device, fast: FastPath | None) -> dict:
    """Training images/s; fast=None is the straightforward path (fp32, eager, NCHW, default AdamW)."""
    net, cemb = build(args, device, fast)
    models = torch.nn.ModuleDict({"net": net, "cemblayer": cemb})
    ema = EMA(models, 0.9999)
    params = list(models.parameters())
    opt = adamw(params, 2e-4, 1e-4) if fast else torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=bool(fast) and fast.amp == torch.float16)
    diff = GaussianDiffusion(linear_betas(1000), device)
    x = torch.rand(args.batchsize, args.inch, args.image_size, args.image_size, device=device) * 2 - 1
    if fast and fast.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(args.classes, (args.batchsize,), device=device)
    autocast = fast.autocast(device) if fast else torch.autocast(device.type, enabled=False)

    def loss_of(unet: torch.nn.Module) -> torch.Tensor:
        with autocast:
            return diff.train_loss(unet, x, drop_condition(cemb(y), 0.1))

    t0 = time.perf_counter()
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout may be the --json line)
    fwd = compile_or_eager(net, loss_of, device, say) if fast and fast.compile else net
    compile_s = time.perf_counter() - t0

    def step():
        loss = loss_of(fwd)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ema.update(models)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    return {"img_per_s": args.batchsize / seconds, "s_per_step": seconds, "compile_s": compile_s, "first_step_s": first,
            "peak_mem_gb": peak_memory_gb(device)}


def bench_sample(args: argparse.Namespace, device: torch.device, fast: FastPath | None, one_pass: bool) -> dict:
    """Images/s of a --num_steps DDIM run with CFG, timed over --sample_timed_steps steps."""
    net, cemb = build(args, device, fast)
    net.eval()
    diff = GaussianDiffusion(linear_betas(1000), device)
    b = args.sample_batch or args.batchsize
    x = torch.randn(b, args.inch, args.image_size, args.image_size, device=device)
    with torch.inference_mode():
        c = cemb(torch.randint(args.classes, (b,), device=device))
    t = torch.full((b,), 500, device=device, dtype=torch.long)
    autocast = fast.autocast(device) if fast else torch.autocast(device.type, enabled=False)

    @torch.inference_mode()
    def step(x):
        with autocast:
            eps = diff.guided_eps(net, x, t, c, 1.8, one_pass=one_pass)
        return diff.ddim_step(x, 500, 480, eps.float(), 0.0, None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        x = step(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.sample_timed_steps):
        x = step(x)
    sync(device)
    per_step = (time.perf_counter() - t0) / args.sample_timed_steps
    return {"img_per_s": b / (per_step * args.num_steps), "s_per_step": per_step, "peak_mem_gb": peak_memory_gb(device)}


def train_flops(args: argparse.Namespace, device: torch.device) -> float:
    """FLOPs of one training step's forward and backward, counted by torch."""
    net, cemb = build(args, device, None)
    diff = GaussianDiffusion(linear_betas(1000), device)
    x = torch.rand(args.batchsize, args.inch, args.image_size, args.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        diff.train_loss(net, x, cemb(torch.zeros(args.batchsize, dtype=torch.long, device=device))).backward()
    return counter.get_total_flops()


FLAG_RULES = {
    **{flag: at_least(1) for flag in ("inch", "modch", "numres", "cdim", "classes", "image_size", "batchsize",
                                      "num_steps", "sample_timed_steps", "steps")},
    **{flag: at_least(0) for flag in ("warmup", "sample_batch")},
}


def main(args: argparse.Namespace) -> None:
    """Time every row and print the table (or one JSON line)."""
    check_flags(args, FLAG_RULES)
    try:
        check_unet_config(args.modch, args.chmul, args.image_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    fast = resolve_fast_path(args.amp, args.compile, args.channels_last, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    opt_desc = (f"amp {str(fast.amp).replace('torch.', '') if fast.amp else 'none'}, compile {fast.compile}, "
                f"channels_last {fast.channels_last}, fused AdamW")
    rows = {"train eager fp32": bench_train(args, device, None), f"train optimised ({opt_desc})": None}
    rows[f"train optimised ({opt_desc})"] = bench_train(args, device, fast)
    for label, f in (("eager fp32", None), ("optimised", fast)):
        for one_pass in (False, True):
            rows[f"sample {label}, CFG as {'one 2B' if one_pass else 'two B'} forward(s)"] = \
                bench_sample(args, device, f, one_pass)
    flops = train_flops(args, device) if device.type == "cuda" else None
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    train_rows = list(rows)[:2]
    ratio = rows[train_rows[1]]["img_per_s"] / rows[train_rows[0]]["img_per_s"]
    if args.json:
        print(json.dumps({"device": name, "config": vars(args), "rows": rows, "train_speedup": ratio,
                          "train_flops_per_step": flops, "bf16_peak_tflops": peak}))
        return
    print(f"{name}; UNet in {args.inch} mod {args.modch} chmul {args.chmul} res {args.numres} at "
          f"{args.image_size}x{args.image_size}; train batch {args.batchsize}, sample batch "
          f"{args.sample_batch or args.batchsize}, DDIM-{args.num_steps} with CFG w 1.8")
    for label, r in rows.items():
        extra = ""
        if flops and label.startswith("train"):
            tflops = flops / r["s_per_step"] / 1e12
            extra = f", {tflops:.1f} TFLOP/s" + (f" ({100 * tflops / peak:.1f}% of bf16 peak)" if peak else "")
        mem = f"  peak mem {r['peak_mem_gb']:.2f} GiB" if r["peak_mem_gb"] is not None else ""
        print(f"{label:<90} {r['img_per_s']:9.2f} img/s{mem}{extra}")
    opt_row = rows[train_rows[1]]
    print(f"optimised training, not counted above: compilation {opt_row['compile_s']:.1f} s, first step "
          f"{opt_row['first_step_s']:.1f} s")
    print(f"training speed-up, optimised / eager fp32: {ratio:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Benchmark training and guided sampling: eager fp32 vs optimised.")
    p.add_argument("--inch", type=int, default=3, help="image channels")
    p.add_argument("--modch", type=int, default=64, help="UNet base channels")
    p.add_argument("--chmul", type=int_list, default=[1, 2, 4, 4], help="channel multipliers, e.g. 1,2,4,4")
    p.add_argument("--numres", type=int, default=2, help="residual blocks per level")
    p.add_argument("--cdim", type=int, default=128, help="class embedding width")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--image_size", type=int, default=32, help="image size")
    p.add_argument("--batchsize", type=int, default=8, help="training batch size")
    p.add_argument("--sample_batch", type=int, default=0, help="sampling batch size (default: --batchsize)")
    p.add_argument("--num_steps", type=int, default=50, help="DDIM steps the sampling rate is quoted for")
    p.add_argument("--sample_timed_steps", type=int, default=5, help="guided DDIM steps actually timed")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps after the first")
    p.add_argument("--amp", default="auto", help="optimised path: bf16, fp16 or none (auto: bf16 on CUDA)")
    p.add_argument("--compile", default="auto", help="optimised path: torch.compile (auto: on CUDA only)")
    p.add_argument("--channels_last", default="auto", help="optimised path: channels_last (auto: on)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--json", type=str2bool, nargs="?", const=True, default=False,
                   help="print one JSON line instead of the table (--json alone means True)")
    run_cli(main, p)
