"""scripts/gpu_check.sh on CPU (tiny configs: the plumbing of both calls, what comes back from them, the plan, the
report a killed call leaves), and a C++ compiler broken on one rank, which sends every rank eager. One file, so that
a distributed run keeps them on one worker, in this order, with one inductor cache."""
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


def check(call, out, work, inductor_cache, **env):
    """One call of scripts/gpu_check.sh on CPU, as the device tool runs it: its own empty OUT, a work folder beside."""
    env = dict(os.environ, GPU_CHECK_OUT=str(out), GPU_CHECK_WORK=str(work), PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="", TORCHINDUCTOR_CACHE_DIR=inductor_cache, **env)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--call", str(call)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def returned(out):
    """What the device tool would bring back from OUT: at most 8 files, none deeper than OUT/a/b, 16 MiB each and 64
    MiB in all (../.library/device/README.md); the check promises less: at most 6 files, no folder."""
    entries = sorted(os.listdir(out))
    assert all(os.path.isfile(out / e) for e in entries), entries
    sizes = {e: os.path.getsize(out / e) for e in entries}
    assert len(entries) <= 6 and max(sizes.values()) < 16 * 2 ** 20 and sum(sizes.values()) < 64 * 2 ** 20, sizes
    return entries


def test_gpu_check_runs_both_calls_on_cpu_and_leaves_six_small_files(tmp_path, inductor_cache):
    # without a GPU the same steps run on tiny configs (the CUDA tests skip): this checks the script's plumbing and
    # what would come back from the device: call 1 trains with compile around DDP on 2 gloo ranks, stops mid-epoch,
    # resumes, samples, scores and benches; call 2 loads call 1's compile cache, benches sampling and profiles. It
    # pays the suite's cold compile of the 2-rank loss, which the last test of this file reuses
    first = check(1, tmp_path / "out1", tmp_path / "work", inductor_cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert returned(tmp_path / "out1") == ["compile_cache.bin", "logs.txt", "metrics.jsonl", "report.json",
                                           "summary.txt"]
    report = json.load(open(tmp_path / "out1" / "report.json"))
    assert report["passed"] and report["complete"] and report["call"] == 1
    assert list(report["steps"]) == ["preflight", "train", "resume", "sample", "bench"]
    assert all(report["train"]["checks"].values()) and report["sample"]["fid_line"].startswith("proto-FID")
    compiles = [(c["step"], c["network"], c["compiled"]) for c in report["compiles"]]
    assert compiles[:6] == [("train/resume", "loss", True), ("train/resume", "loss", True),
                            ("train/resume", "per-image noise", True), ("train/resume", "sampling step", True),
                            ("sample", "per-image noise", True), ("sample", "sampling step", True)]
    assert sum(s["seconds"] for s in report["steps"].values()) <= 3 * 240
    assert report["sample"]["counted"] == 100 and len(report["bench"]["rows"]) == 2
    assert "== resume: rc 0" in (tmp_path / "out1" / "logs.txt").read_text()

    second = check(2, tmp_path / "out2", tmp_path / "work", inductor_cache,
                   GPU_CHECK_CACHE=str(tmp_path / "out1" / "compile_cache.bin"))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert returned(tmp_path / "out2") == ["logs.txt", "report.json", "summary.txt", "top_ops.txt"]
    report = json.load(open(tmp_path / "out2" / "report.json"))
    assert report["passed"] and list(report["steps"]) == ["preflight", "bench", "tests"]
    rows = report["bench"]["rows"]  # the training step; sampling eager and optimised, CFG as two B or one 2B
    assert len(rows) == 5 and sum("one 2B" in k for k in rows) == 2 and all(r["img_per_s"] > 0 for r in rows.values())
    assert "skipped" in report["tests"]["summary"]
    assert "compile cache:" in (tmp_path / "work" / "logs" / "bench.log").read_text()


def test_gpu_check_plans_two_calls_within_their_budget_and_a_killed_call_keeps_its_finished_steps(tmp_path):
    plan = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--plan", "120"],
                          capture_output=True, text=True, cwd=ROOT)
    totals = [line for line in plan.stdout.splitlines() if " total " in line]
    assert plan.returncode == 0 and totals == ["call 1 total      240 s of a 240 s budget (C = 120 s)",
                                               "call 2 total      225 s of a 240 s budget (C = 120 s)"], plan.stdout
    assert subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--plan", "150"],
                          capture_output=True, text=True, cwd=ROOT).returncode != 0  # call 1: 277 s
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, GPU_CHECK_OUT=str(out), GPU_CHECK_WORK=str(work), PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--call", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while not (work / "logs" / "bench.log").exists() and time.time() < deadline:  # preflight reported, bench on
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # as a lease that ends: no chance to write anything more
    for pid in os.listdir("/proc"):  # the step under `timeout`, which runs in a process group of its own
        try:
            if str(work).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    proc.communicate(timeout=60)
    report = json.load(open(out / "report.json"))
    assert list(report["steps"]) == ["preflight"] and report["steps"]["preflight"]["rc"] == 0
    assert not report["complete"] and report["passed"] is None
    assert "partial" in (out / "summary.txt").read_text()
    assert returned(out) == ["logs.txt", "report.json", "summary.txt"]


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
