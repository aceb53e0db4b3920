"""bench.py times the step train.py runs; the step loop never reads the device between log steps."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run_env, run_program

import bench
import train
from batches import ShardedBatches
from datasets import load_dataset
from speed import resolve_fast_path


def test_bench_times_the_step_train_py_runs(tmp_path):
    steps = 6
    modules = train.main(train.build_parser().parse_args(
        TINY + ["--epoch", "1", "--max_steps", str(steps), "--run_dir", str(tmp_path / "run")]))

    # the same models, data, batches and seeds through bench.py's own construction of the step
    args = bench.build_parser().parse_args(["--inch", "1", "--modch", "32", "--chmul", "1,2", "--numres", "1",
                                            "--image_size", "8", "--batchsize", "64"])
    device = torch.device("cpu")
    fast = resolve_fast_path("auto", "auto", "auto", device)
    models = bench.build(args, device, fast).train()
    data = load_dataset("digits")
    order = ShardedBatches(len(data.labels), 64, seed=0).epoch(0)
    step, _ = bench.make_train_step(models, fast, device, (data.images[order[0]], data.labels[order[0]]))
    step.optimizer.param_groups[0]["lr"] = 2e-4  # train.py's first warm-up epoch runs at --lr, 2e-4
    torch.manual_seed(0)  # train.py's per-rank seed, 0 x 1 + 0
    for i in range(steps):
        step(data.images[order[i]], data.labels[order[i]])

    for name, trained in (("net", models["net"]), ("cemblayer", models["cemblayer"])):
        ref = modules[name].state_dict()
        assert all(torch.equal(ref[k], v) for k, v in trained.state_dict().items()), name
    ema = modules["ema"].state_dict()
    assert all(torch.equal(ema[k], v) for k, v in step.ema.module.state_dict().items())
    # and the steps did move the weights, so equal weights are not equal initialisations
    fresh = bench.build(args, device, fast)["net"].state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in models["net"].state_dict().items())


def test_the_whole_loss_is_one_graph_without_breaks(monkeypatch):
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    torch._dynamo.reset()
    args = bench.build_parser().parse_args(["--inch", "3", "--modch", "32", "--chmul", "1,2", "--numres", "1",
                                            "--image_size", "16", "--batchsize", "4"])
    device = torch.device("cpu")
    fast = resolve_fast_path("bf16", "True", "True", device)
    models = bench.build(args, device, fast).train()
    batch = bench.random_batch(args, device, 4)
    step, _ = bench.make_train_step(models, fast, device, batch)
    for _ in range(3):
        step(*batch)
    (graph,) = graphs  # one graph: nothing ran eager around the UNet, and later steps reused it
    ops = {getattr(n.target, "__name__", str(n.target)) for n in graph.graph.nodes if n.op == "call_function"}
    # the label drop (rand), timesteps (randint), noise (randn), class MLP, UNet and MSE are all in the graph
    assert {"rand", "randint", "randn", "embedding", "linear", "conv2d", "scaled_dot_product_attention",
            "mse_loss"} <= ops


def test_compile_mode_reaches_torch_compile_and_bad_modes_are_refused(tmp_path, monkeypatch):
    modes = []

    def recording(module, **options):
        modes.append(options.get("mode"))
        return module

    monkeypatch.setattr(torch, "compile", recording)
    train.main(train.build_parser().parse_args(TINY + ["--epoch", "1", "--compile", "True",
                                                       "--compile_mode", "reduce-overhead",
                                                       "--run_dir", str(tmp_path / "run")]))
    # the training step, then at the grid the noise (always the default mode: its output is kept across calls)
    # and the sampling step
    assert modes == ["reduce-overhead", None, "reduce-overhead"]
    r = run_program("train.py", TINY + ["--compile_mode", "fastest", "--results", str(tmp_path / "res")])
    assert r.returncode == 2 and "--compile_mode" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "res").exists()


def test_bench_profile_and_loop_rows_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--modch", "32", "--chmul", "1,2",
                        "--numres", "1", "--image_size", "16", "--batchsize", "4", "--steps", "2", "--warmup", "0",
                        "--loop_steps", "8", "--rows", "train_eager,train,loop", "--profile", str(tmp_path / "prof"),
                        "--json"], capture_output=True, text=True, env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    rows = report["rows"]
    assert len(rows) == 3 and report["train_speedup"] > 0
    (loop,) = [v for k, v in rows.items() if k.startswith("train.py loop")]
    assert loop["windows"] == 3 and loop["img_per_s"] > 0  # 8 steps logged every 2, the first window dropped
    (opt,) = [v for k, v in rows.items() if k.startswith("train step, optimised")]
    prof = opt["profile"]
    assert 0 < prof["busy_share"] and len(prof["top_ops"]) == 20
    assert (tmp_path / "prof" / "trace.json").stat().st_size > 0
    table = (tmp_path / "prof" / "top_ops.txt").read_text()
    assert "convolution" in table and "% of the wall time" in table


@pytest.mark.parametrize("sweep", ["train", "sample"])
def test_gpu_tune_runs_its_grid_on_cpu(tmp_path, sweep):
    env = dict(run_env(), GPU_TUNE_OUT=str(tmp_path / "out"), GPU_TUNE_WORK=str(tmp_path / "work"),
               PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", SWEEP=sweep)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_tune.sh")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["summary.txt", "tune.json"]  # what the device tool brings back
    report = json.load(open(tmp_path / "out" / "tune.json"))
    measured = [row for row in report["rows"] if row.get("img_per_s")]
    assert len(measured) >= 3 and report["best"]["img_per_s"] == max(row["img_per_s"] for row in measured)
    assert "img/s" in r.stdout and "compile s" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_device_sync_between_log_steps(tmp_path, monkeypatch):
    import train_step

    def sync_allowed(fn):  # the loop's sync points: the log step's read and the finite check
        @functools.wraps(fn)
        def wrapper(*a, **k):
            torch.cuda.set_sync_debug_mode(0)
            return fn(*a, **k)
        return wrapper

    step_call = train_step.TrainStep.__call__

    def step_strict(self, *a):
        torch.cuda.set_sync_debug_mode("error")  # from here to the next log step, any sync raises
        return step_call(self, *a)

    monkeypatch.setattr(train_step.TrainStep, "__call__", step_strict)
    import runlog
    monkeypatch.setattr(runlog.LossMeter, "read", sync_allowed(runlog.LossMeter.read))
    monkeypatch.setattr(runlog, "check_finite", sync_allowed(runlog.check_finite))
    try:
        train.main(train.build_parser().parse_args(TINY + ["--epoch", "2", "--log_every", "10", "--device", "cuda",
                                                           "--compile", "False", "--run_dir", str(tmp_path / "r")]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
