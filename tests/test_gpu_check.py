"""scripts/gpu_check.sh on CPU (tiny configs: the plumbing of every step, the plan, the report a killed check leaves),
and the test that reuses its cold 2-rank compile: a C++ compiler broken on one rank sends every rank eager. One file,
so that a distributed run keeps them on one worker, in this order, with one inductor cache."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT
from test_ddp import records, torchrun

COMPILE_TINY = ["--dataset", "digits", "--modch", "32", "--chmul", "1", "--numres", "1", "--batchsize", "64",
                "--ddim", "True", "--num_steps", "3", "--genbatch", "10", "--log_every", "2", "--epoch", "1",
                "--compile", "True"]


def test_gpu_check_runs_its_steps_on_cpu_and_reports(tmp_path, inductor_cache):
    # without a GPU the same steps run on tiny configs (the CUDA tests skip): this checks the script's plumbing,
    # and its 2-rank step is this suite's test that compile around DDP on gloo trains, stops mid-epoch and resumes
    # (the loss compiled on both ranks at the start and at the resume, the grid's noise and network at their first
    # use); it pays the suite's cold compile, which the test below reuses
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"),
               PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", TORCHINDUCTOR_CACHE_DIR=inductor_cache)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert report["passed"] and report["complete"]
    assert list(report["steps"]) == ["preflight", "train", "resume", "sample", "bench", "tests"]
    assert all(report["train"]["checks"].values()) and report["sample"]["fid_line"].startswith("proto-FID")
    compiles = [(c["step"], c["network"], c["compiled"]) for c in report["compiles"]]
    assert compiles[:6] == [("train/resume", "loss", True), ("train/resume", "loss", True),
                            ("train/resume", "per-image noise", True), ("train/resume", "sampling network", True),
                            ("sample", "per-image noise", True), ("sample", "sampling network", True)]
    assert sum(s["seconds"] for s in report["steps"].values()) <= 540
    assert len(report["bench"]["rows"]) == 3 and "skipped" in report["tests"]["summary"]
    assert report["sample"]["counted"] == 100 and report["bench"]["rows"]["train step, eager fp32"]["img_per_s"] > 0
    assert os.path.isfile(tmp_path / "out" / "profile" / "top_ops.txt")


def test_gpu_check_plans_within_its_budget_and_a_killed_check_keeps_its_finished_steps(tmp_path):
    plan = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--plan", "120"],
                          capture_output=True, text=True, cwd=ROOT)
    assert plan.returncode == 0 and plan.stdout.splitlines()[-1].startswith("total      500 s of a 540 s budget")
    assert subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--plan", "200"],
                          capture_output=True, text=True, cwd=ROOT).returncode != 0  # 660 s: does not fit
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_OUT=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               ONLY="preflight,bench")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "bench.log").exists() and time.time() < deadline:  # preflight reported, bench under way
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # as a lease that ends: no chance to write anything more
    for pid in os.listdir("/proc"):  # the step under `timeout`, which runs in a process group of its own
        try:
            if str(out).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    proc.communicate(timeout=60)
    report = json.load(open(out / "report.json"))
    assert list(report["steps"]) == ["preflight"] and report["steps"]["preflight"]["rc"] == 0
    assert not report["complete"] and report["passed"] is None
    assert "partial" in (out / "summary.txt").read_text()


def test_a_compiler_broken_on_one_rank_sends_every_rank_eager_and_the_run_finishes(tmp_path, inductor_cache):
    run = tmp_path / "run"
    r = torchrun(tmp_path / "out", COMPILE_TINY + ["--sample_every", "1000", "--run_dir", str(run)],
                 TORCHINDUCTOR_CACHE_DIR=inductor_cache, BROKEN_COMPILER_RANK="1")
    assert r.returncode == 0, r.stderr[-3000:]
    (loss,) = [c for c in records(run, "compile") if c["network"] == "loss"]
    assert not loss["compiled"] and loss["reason"].startswith("rank 1: ") and "C++ compiler" in loss["reason"]
    assert "failed (rank 1: " in (run / "log.txt").read_text()
    a, b = (torch.load(tmp_path / "out" / f"rank{k}.pt", weights_only=True)["net"] for k in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # both ranks trained the same eager model to the end
