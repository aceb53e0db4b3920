"""Throughput of train.py's own training step and of guided DDIM sampling: eager fp32 beside the optimised path.

    python bench.py --modch 64 --chmul 1,2,4,4 --image_size 32 --batchsize 8          # the paper's CIFAR10 UNet
    python bench.py --inch 1 --modch 64 --chmul 1,2 --numres 1 --image_size 8 --batchsize 64 --json
    python bench.py --rows train --profile results/profile                            # a torch.profiler trace
The training rows time `train_step.TrainStep`, the step train.py runs (loss, backward, AdamW, EMA), on random
uint8 batches; the `loop` row runs train.py itself on the synthetic dataset for --loop_steps steps and reads its
img/s from metrics.jsonl (data indexing and logging included). Sampling is timed over a few guided DDIM steps
(CFG as two B-forwards and as one 2B-forward) and scaled to --num_steps. Compilation time is reported apart. On
CUDA, FLOPs come from torch's FlopCounterMode and are set against a measured bf16 matmul and the datasheet peak.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion import GaussianDiffusion, guidance_inputs, linear_betas
from ema import EMA
from embedding import ConditionalEmbedding
from noise import ImageNoise, PhiloxNormals, normals
from cli import (AMP, ANY, AUTO_OR_BOOL, COMPILE_MODE, COMPILE_MODES, COMPILE_SCOPE, DEVICE, POSITIVE_LIST, Rule,
                 UserError, above, at_least, check_flags, int_list, run_cli, str2bool, unset_or)
from sampling import Sampler
from speed import FastPath, adamw, load_compile_cache, resolve_fast_path
from train_step import TrainStep, make_loss
from unet import Unet, check_unet_config

# dense bf16 tensor-core peaks from NVIDIA's datasheets, most specific name first (the SXM H100 reports
# "H100 80GB HBM3", the PCIe card "H100 PCIe")
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0))
ROWS = ("train_eager", "train", "loop", "sample_eager", "sample", "noise", "scores")
DEFAULT_ROWS = "train_eager,train,loop,sample_eager,sample"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """CUDA: peak allocated since the row's reset. CPU: None, since the only peak there is the whole process's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def say(msg: str) -> None:
    """Progress lines go to stderr: stdout may be the --json line."""
    print(msg, file=sys.stderr)


def datasheet_peak(name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s by its name, or None for a card not in the table."""
    return next((v for k, v in BF16_PEAK_TFLOPS if k in name), None)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """TFLOP/s of a bf16 n x n x n matrix product on this card: the ceiling MFU is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def build(args: argparse.Namespace, device: torch.device, fast: FastPath | None) -> torch.nn.ModuleDict:
    """The UNet and class embedding of the flags, initialised from seed 0 as train.py does."""
    if device.type == "cuda":  # eager fp32 keeps PyTorch's defaults (TF32 in cuDNN only); optimised allows all
        torch.backends.cuda.matmul.allow_tf32 = fast is not None
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    net = Unet(args.inch, args.modch, args.inch, args.chmul, args.numres, args.cdim).to(device)
    cemblayer = ConditionalEmbedding(args.classes, args.cdim, args.cdim).to(device)
    if fast is not None and fast.channels_last:
        net.to(memory_format=torch.channels_last)
    return torch.nn.ModuleDict({"net": net, "cemblayer": cemblayer})


def make_train_step(models: torch.nn.ModuleDict, fast: FastPath | None, device: torch.device,
                    example: tuple[torch.Tensor, torch.Tensor]) -> tuple[TrainStep, dict | None]:
    """train.py's step with its defaults (lr 2e-4 x 2.5, weight decay 1e-4, EMA 0.9999, label drop 0.1), and its
    compile outcome (None: not asked for); fast=None is the straightforward path (fp32, eager, NCHW, for-loop
    AdamW)."""
    params = [p for p in models.parameters() if p.requires_grad]
    if fast is None:
        fast = FastPath(None, False, False)
        opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    else:
        opt = adamw(params, 5e-4, 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=fast.amp == torch.float16)
    diffusion = GaussianDiffusion(linear_betas(1000), device)
    loss, outcome = make_loss(models, diffusion, 0.1, fast, example, say)
    return TrainStep(loss, models, opt, scaler, EMA(models, 0.9999), fast), outcome


def random_batch(args: argparse.Namespace, device: torch.device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of the training shape, on the device, as train.py indexes them."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(256, (batch, args.inch, args.image_size, args.image_size), generator=g, dtype=torch.uint8)
    return images.to(device), torch.randint(args.classes, (batch,), generator=g).to(device)


def bench_train(args: argparse.Namespace, device: torch.device, fast: FastPath | None) -> dict:
    """Training images/s of TrainStep; with --profile (optimised row only) also a profiler trace and op table."""
    models = build(args, device, fast).train()
    batch = random_batch(args, device, args.batchsize)
    t0 = time.perf_counter()
    step, outcome = make_train_step(models, fast, device, batch)
    compile_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step(*batch)
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step(*batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(*batch)
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    row = {"img_per_s": args.batchsize / seconds, "s_per_step": seconds, "compile_s": compile_s,
           "first_step_s": first, "peak_mem_gb": peak_memory_gb(device), **compiled_fields(outcome)}
    if args.profile and fast is not None:
        row["profile"] = profile_steps(lambda: step(*batch), device, args.profile, args.steps)
    return row


def profile_steps(run_step, device: torch.device, out_dir: str, steps: int) -> dict:
    """torch.profiler over `steps` steps: DIR/trace.json (chrome trace), DIR/top_ops.txt (top 20 ops by device
    time, CPU time on a CPU), and the share of the wall time the device was busy."""
    from torch.profiler import ProfilerActivity, profile
    os.makedirs(out_dir, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step()
        sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    prof.export_chrome_trace(os.path.join(out_dir, "trace.json"))
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy_us = sum(getattr(e, key) for e in events)
    # kernels run one at a time on the one stream, so their summed time is the time the GPU was busy; on a CPU
    # the summed op time can exceed the wall time when ops use several threads
    share = busy_us / wall_us
    what = "GPU busy" if cuda else "CPU op time"
    table = events.table(sort_by=key, row_limit=20)
    with open(os.path.join(out_dir, "top_ops.txt"), "w") as f:
        f.write(f"{steps} steps, {wall_us / 1e3 / steps:.2f} ms per step; {what}: {100 * share:.1f}% of the wall "
                f"time\n{table}\n")
    return {"dir": out_dir, "ms_per_step": wall_us / 1e3 / steps, "busy_share": share, "busy_what": what,
            "top_ops": [(e.key, getattr(e, key) / steps / 1e3) for e in sorted(events, key=lambda e: -getattr(e, key))
                        [:20]]}


def bench_loop(args: argparse.Namespace, device: torch.device, fast: FastPath) -> dict | None:
    """train.py as a user runs it, on the synthetic dataset: img/s of its logged windows after the first."""
    if args.inch != 3 or args.classes != 10:
        print("loop row skipped: the synthetic dataset has 3 channels and 10 classes", file=sys.stderr)
        return None
    log_every = max(1, args.loop_steps // 4)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
               "--dataset", "synthetic", "--image_size", str(args.image_size), "--modch", str(args.modch),
               "--chmul", ",".join(map(str, args.chmul)), "--numres", str(args.numres), "--cdim", str(args.cdim),
               "--batchsize", str(args.batchsize), "--epoch", "1000", "--max_steps", str(args.loop_steps),
               "--log_every", str(log_every), "--sample_every", "1000", "--interval", "1000",
               "--amp", args.amp, "--compile", str(fast.compile), "--compile_mode", fast.compile_mode,
               "--compile_scope", fast.compile_scope,
               "--channels_last", str(fast.channels_last), "--device", device.type, "--run_dir", run_dir]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise UserError(f"the loop row's train.py failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rates = [rec["img_per_s"] for rec in records if rec["event"] == "train"][1:]  # the first window warms up
    rate = sum(rates) / len(rates)
    outcome = next((rec for rec in records if rec["event"] == "compile" and rec["network"] == "loss"), None)
    return {"img_per_s": rate, "s_per_step": args.batchsize / rate,
            "windows": len(rates), "steps": args.loop_steps, "log_every": log_every, "wall_s": wall,
            "peak_mem_gb": None, **compiled_fields(outcome)}


def bench_sample(args: argparse.Namespace, device: torch.device, fast: FastPath | None, one_pass: bool) -> dict:
    """Images/s of a --num_steps DDIM run with CFG, timed over --sample_timed_steps steps of the product's path
    (one pass: the step Sampler.prepare makes and compiles, network, fp32 guidance and update in one graph; two
    passes: eager), from per-image device noise."""
    models = build(args, device, fast).eval()
    b = args.sample_batch or args.batchsize
    shape = (args.inch, args.image_size, args.image_size)
    sampler = Sampler(True, args.num_steps, 0.0, "linear", 1.8, b, 0, fast)
    outcomes = []
    diff = GaussianDiffusion(linear_betas(1000), device)
    x = ImageNoise(list(range(b)), device).randn((b,) + shape, 0)
    with torch.inference_mode():
        cond = models["cemblayer"](torch.randint(args.classes, (b,), device=device))
    t = torch.full((b,), 500, device=device, dtype=torch.long)
    if one_pass:  # the sampler's own step: guidance and update in one module, compiled once for every step
        guided_step = sampler.prepare(models["net"], shape, args.cdim, device, say, outcomes.append)
        both, guidance = guidance_inputs(cond, 1.8)
        coef = torch.tensor(diff.ddim_coefficients(500, 480, 0.0), dtype=torch.float32, device=device)

    @torch.inference_mode()
    def step(x):
        with sampler.precision(device):
            if one_pass:
                return guided_step(x, t, both, guidance, coef, None)
            eps = diff.guided_eps(models["net"], x, t, cond, 1.8, one_pass=False)
        return diff.ddim_step(x, 500, 480, eps, 0.0, None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the first call compiles the network, when it is compiled
        x = step(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.sample_timed_steps):
        x = step(x)
    sync(device)
    per_step = (time.perf_counter() - t0) / args.sample_timed_steps
    outcome = outcomes[0] if outcomes else None
    return {"img_per_s": b / (per_step * args.num_steps), "s_per_step": per_step,
            "compile_s": outcome["seconds"] if outcome else 0.0, "peak_mem_gb": peak_memory_gb(device),
            **compiled_fields(outcome)}


def bench_noise(args: argparse.Namespace, device: torch.device, compiled: bool) -> dict:
    """One draw of per-image noise for a sampling batch (what DDPM and DDIM with eta > 0 pay every step): the ops
    the profiler counts per draw, and the time per draw."""
    from torch.profiler import ProfilerActivity, profile
    b = args.sample_batch or args.batchsize
    noise = ImageNoise(list(range(b)), device, torch.compile(PhiloxNormals(), dynamic=False) if compiled else normals)
    shape = (b, args.inch, args.image_size, args.image_size)
    t0 = time.perf_counter()
    noise.randn(shape, 0)  # compiles, when compiled
    sync(device)
    compile_s = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        noise.randn(shape, 1)
        sync(device)
    top_level = [e for e in prof.events() if e.name.startswith("aten::")
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    t0 = time.perf_counter()
    for draw in range(2, 22):
        noise.randn(shape, draw)
    sync(device)
    per_draw = (time.perf_counter() - t0) / 20
    return {"img_per_s": b / per_draw, "s_per_step": per_draw, "ops_per_draw": len(top_level),
            "kernels_per_draw": len(kernels) if device.type == "cuda" else None, "compile_s": compile_s,
            "peak_mem_gb": None, "compiled": compiled}


def compiled_fields(outcome: dict | None) -> dict:
    """A row's `compiled` (whether its network ran compiled) and, when it fell back, `compile_error`."""
    if outcome is None:
        return {"compiled": False}
    return {"compiled": outcome["compiled"]} if outcome["compiled"] else {"compiled": False,
                                                                         "compile_error": outcome["reason"]}


def train_flops(args: argparse.Namespace, device: torch.device) -> float:
    """FLOPs of one training step's forward and backward, counted by torch."""
    models = build(args, device, None)
    diff = GaussianDiffusion(linear_betas(1000), device)
    x = torch.rand(args.batchsize, args.inch, args.image_size, args.image_size, device=device)
    labels = torch.zeros(args.batchsize, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        diff.train_loss(models["net"], x, models["cemblayer"](labels)).backward()
    return counter.get_total_flops()


FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    **{flag: at_least(1) for flag in ("inch", "modch", "numres", "cdim", "classes", "image_size", "batchsize",
                                      "num_steps", "sample_timed_steps", "steps", "score_images", "score_width")},
    **{flag: at_least(0) for flag in ("warmup", "sample_batch")},
    "loop_steps": at_least(8),  # four logged windows of at least two steps
    "chmul": POSITIVE_LIST, "peak_tflops": unset_or(above(0), "the datasheet figure"),
    "rows": Rule(lambda v: all(r in ROWS for r in v.split(",")), f"a comma list of {', '.join(ROWS)}", "train,fast"),
    "amp": AMP, "compile": AUTO_OR_BOOL, "channels_last": AUTO_OR_BOOL, "compile_mode": COMPILE_MODE,
    "compile_scope": COMPILE_SCOPE,
    "device": DEVICE, **{flag: ANY for flag in ("profile", "json", "compile_cache")},
}


def score_variant(variant: str, classes: int, images: int, width: int, queue) -> None:
    """In a fresh process: seconds and extra peak host memory (ru_maxrss over what the features themselves take)
    of scoring `images` synthetic features of `classes` classes against a reference of the same shape."""
    import resource
    import numpy as np
    from fid import GEN_PER_CLASS, REF_PER_CLASS, ClassFeatures, FeatureStats, frechet_distance, kernel_distance
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(images, width, generator=g)
    labels = torch.arange(images) % classes
    reference = ClassFeatures(range(classes), REF_PER_CLASS)
    ref_feats = torch.rand(classes * REF_PER_CLASS, width, generator=g)
    ref_labels = torch.arange(classes * REF_PER_CLASS) % classes
    reference.add(ref_feats, ref_labels, list(range(len(ref_labels))))
    mu, sigma = np.zeros(width), np.eye(width)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    batches = [(feats[i:i + 250], labels[i:i + 250], list(range(i, min(i + 250, images)))) for i in
               range(0, images, 250)]
    if variant == "all-class FID":
        stats = FeatureStats(width)
        for f, _, _ in batches:
            stats.add(f)
        frechet_distance(*stats.mu_sigma(), mu, sigma)
    elif variant == "per-class KID":
        kept = ClassFeatures(range(classes), GEN_PER_CLASS)
        for f, y, i in batches:
            kept.add(f, y, i)
        [kernel_distance(kept.of(c), reference.of(c)) for c in range(classes)]
    else:  # the earlier per-class FID: classes x width^2 sums, one square root per class
        stats = FeatureStats(width, classes=classes)
        for f, y, _ in batches:
            stats.add(f, y)
        [frechet_distance(*stats.mu_sigma(c), mu, sigma) for c in range(classes)]
    seconds = time.perf_counter() - t0
    queue.put((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 20))  # KiB -> GiB


def bench_scores(args: argparse.Namespace) -> dict:
    """The scoring of one evaluation on the host, feature extraction apart: all-class FID, per-class KID, and the
    earlier per-class FID (at --classes, or at 20 classes when more, with a linear extrapolation)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for variant, classes in (("all-class FID", args.classes), ("per-class KID", args.classes),
                             ("per-class FID (before)", min(args.classes, 20))):
        queue = ctx.Queue()
        proc = ctx.Process(target=score_variant, args=(variant, classes, args.score_images, args.score_width, queue))
        proc.start()
        seconds, gib = queue.get()
        proc.join()
        out[f"{variant}, {classes} classes"] = {"s": seconds, "extra_peak_gib": gib}
    return out


def main(args: argparse.Namespace) -> None:
    """Time every row asked for and print the table (or one JSON line)."""
    check_flags(args, FLAG_RULES)
    if args.compile_cache:
        if not os.path.isfile(args.compile_cache):
            raise UserError(f"--compile_cache {args.compile_cache} does not exist")
        load_compile_cache(args.compile_cache, say)
    rows_asked = args.rows.split(",")
    try:
        check_unet_config(args.modch, args.chmul, args.image_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    fast = resolve_fast_path(args.amp, args.compile, args.channels_last, device, args.compile_mode,
                             args.compile_scope)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    opt_desc = (f"amp {str(fast.amp).replace('torch.', '') if fast.amp else 'none'}, compile {fast.compile}"
                + (f" ({fast.compile_mode}, {fast.compile_scope})" if fast.compile else "")
                + f", channels_last {fast.channels_last}, "
                "fused AdamW")
    labels = {"train_eager": "train step, eager fp32", "train": f"train step, optimised ({opt_desc})",
              "loop": f"train.py loop, optimised, {args.loop_steps} steps",
              "sample_eager": "sample eager fp32, CFG as {}", "sample": "sample optimised, CFG as {}"}
    rows, scores = {}, None
    for key in (r for r in ROWS if r in rows_asked):
        if key == "scores":
            scores = bench_scores(args)
        elif key.startswith("sample"):
            for one_pass in (False, True):
                label = labels[key].format("one 2B forward" if one_pass else "two B forwards")
                rows[label] = bench_sample(args, device, fast if key == "sample" else None, one_pass)
        elif key == "noise":
            for compiled in (False, True):
                rows[f"noise, one draw for a batch, {'compiled' if compiled else 'eager'}"] = bench_noise(
                    args, device, compiled)
        elif key == "loop":
            result = bench_loop(args, device, fast)
            if result is not None:
                rows[labels[key]] = result
        else:
            rows[labels[key]] = bench_train(args, device, fast if key == "train" else None)
    cuda = device.type == "cuda"
    flops = train_flops(args, device) if cuda else None
    measured = matmul_tflops(device) if cuda else None
    peak = args.peak_tflops or (datasheet_peak(name) if cuda else None)
    train_rows = [labels[k] for k in ("train_eager", "train") if labels[k] in rows]
    ratio = rows[train_rows[1]]["img_per_s"] / rows[train_rows[0]]["img_per_s"] if len(train_rows) == 2 else None
    report = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "config": vars(args),
              "rows": rows, "scores": scores, "train_speedup": ratio, "train_flops_per_step": flops, "bf16_peak_tflops": peak,
              "bf16_matmul_tflops": measured}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{name}, torch {torch.__version__}; UNet in {args.inch} mod {args.modch} chmul {args.chmul} res "
          f"{args.numres} at {args.image_size}x{args.image_size}; train batch {args.batchsize}, sample batch "
          f"{args.sample_batch or args.batchsize}, DDIM-{args.num_steps} with CFG w 1.8")
    if cuda:
        print(f"bf16 matmul 8192^3 measured {measured:.0f} TFLOP/s; datasheet dense bf16 peak "
              f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown (pass --peak_tflops)'}")
    for label, r in rows.items():
        extra = ""
        if flops and label.startswith("train"):
            tflops = flops / r["s_per_step"] / 1e12
            extra = f", {tflops:.1f} TFLOP/s = {100 * tflops / measured:.1f}% of the measured matmul" + \
                (f", {100 * tflops / peak:.1f}% of the datasheet peak" if peak else "")
        mem = f"  peak mem {r['peak_mem_gb']:.2f} GiB" if r["peak_mem_gb"] is not None else ""
        if "ops_per_draw" in r:
            extra = f", {r['s_per_step'] * 1e3:.2f} ms and {r['ops_per_draw']} ops per draw" + (
                f", {r['kernels_per_draw']} kernels" if r["kernels_per_draw"] is not None else "")
        print(f"{label:<90} {r['img_per_s']:9.2f} img/s{mem}{extra}")
        if "compile_s" in r and label.startswith("train step, optimised"):
            print(f"{'':<4}not counted above: setup and compilation {r['compile_s']:.1f} s, first step "
                  f"{r['first_step_s']:.1f} s")
        if "profile" in r:
            p = r["profile"]
            print(f"{'':<4}profile: {p['busy_what']} {100 * p['busy_share']:.1f}% of the wall time; trace and top "
                  f"20 ops in {p['dir']}/")
    if ratio:
        print(f"training speed-up, optimised / eager fp32: {ratio:.2f}x")
    for label, r in (scores or {}).items():
        print(f"scoring {args.score_images} features of width {args.score_width}, {label:<38} {r['s']:8.2f} s, "
              f"extra peak host memory {r['extra_peak_gib']:.2f} GiB")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark train.py's training step and guided sampling: eager fp32 "
                                "vs optimised.")
    p.add_argument("--inch", type=int, default=3, help="image channels")
    p.add_argument("--modch", type=int, default=64, help="UNet base channels")
    p.add_argument("--chmul", type=int_list, default=[1, 2, 4, 4], help="channel multipliers, e.g. 1,2,4,4")
    p.add_argument("--numres", type=int, default=2, help="residual blocks per level")
    p.add_argument("--cdim", type=int, default=128, help="class embedding width")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--image_size", type=int, default=32, help="image size")
    p.add_argument("--batchsize", type=int, default=8, help="training batch size")
    p.add_argument("--sample_batch", type=int, default=0, help="sampling batch size (0: --batchsize)")
    p.add_argument("--num_steps", type=int, default=50, help="DDIM steps the sampling rate is quoted for")
    p.add_argument("--sample_timed_steps", type=int, default=5, help="guided DDIM steps actually timed")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps after the first")
    p.add_argument("--loop_steps", type=int, default=40, help="steps of the train.py loop row (logged in 4 windows)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows to time, a comma list of {', '.join(ROWS)} (noise: "
                   "per-image noise eager and compiled, with the profiler's op count per draw; scores: the host side "
                   "of one evaluation's FID and per-class figures at --classes, minutes on a CPU)")
    p.add_argument("--score_images", type=int, default=10000, help="scores row: generated images (the pipeline's "
                   "GENUM), scored against --classes classes")
    p.add_argument("--score_width", type=int, default=2048, help="scores row: feature width (Inception's 2048)")
    p.add_argument("--amp", default="auto", help="optimised path: bf16, fp16 or none (auto: bf16 on CUDA)")
    p.add_argument("--compile", default="auto", help="optimised path: torch.compile (auto: on CUDA only)")
    p.add_argument("--compile_mode", default="default", help=f"torch.compile mode: {', '.join(COMPILE_MODES)}")
    p.add_argument("--compile_scope", default="whole", help="optimised training step: whole (the loss as one "
                   "graph) or regional (the UNet's blocks)")
    p.add_argument("--channels_last", default="auto", help="optimised path: channels_last (auto: on)")
    p.add_argument("--profile", default=None, help="write a torch.profiler trace and the top-20 op table of the "
                   "optimised training step to this folder")
    p.add_argument("--compile_cache", default=None, help="a compile cache to load first (train.py's "
                   "RUN/compile_cache.bin): the graphs it holds compile warm")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak (default: the "
                   "datasheet figure for the card's name)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--json", type=str2bool, nargs="?", const=True, default=False,
                   help="print one JSON line instead of the table (--json alone means True)")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
