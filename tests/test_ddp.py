"""Several processes agree (tests with 2 gloo ranks under torchrun): a signal stops every rank within seconds,
whatever --log_every is; a fault on one rank stops every rank with one error line; the compile probe's outcome is
the same on every rank."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, TINY, run_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")


def torchrun(out, args, timeout=600, **env):
    out.mkdir(exist_ok=True)
    return subprocess.run(TORCHRUN + [WORKER, str(out)] + args, capture_output=True, text=True,
                          env=dict(run_env(), **env), timeout=timeout)


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


def records(run, event):
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["event"] == event]


def test_sigterm_stops_a_two_process_job_within_seconds_whatever_log_every_is(tmp_path):
    run = tmp_path / "run"
    cmd = TORCHRUN + [os.path.join(ROOT, "train.py")] + TINY + ["--epoch", "100", "--log_every", "1000",
                                                                "--run_dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
    deadline = time.time() + 120
    while time.time() < deadline and "run dir" not in (run / "log.txt").read_text() if (run / "log.txt").exists() \
            else time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # well inside epoch 1 (14 steps of 2 ranks), far from any log step
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers, as on preemption
    marker = run / "checkpoints" / "last_epoch.pt"
    while not marker.exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    saved = time.time() - t0
    out, err = proc.communicate(timeout=60)
    exited = time.time() - t0
    print(f"\nSIGTERM to torchrun -> checkpoint on disk in {saved:.2f} s, torchrun exited in {exited:.2f} s")
    # torchrun's own 30 s grace would end in a SIGKILL and no checkpoint
    assert saved < 10 and exited < 20
    # torchrun itself re-raises the signal (SignalException, exit 1) after its workers exited; a worker that
    # failed would add a ChildFailedError with its exit code
    assert "stopped by SIGTERM" in out and "ChildFailedError" not in err and "exitcode" not in err, err[-3000:]
    marker = torch.load(run / "checkpoints" / "last_epoch.pt", weights_only=True)
    ckpt = torch.load(run / "checkpoints" / marker["file"], weights_only=True)
    assert 1 <= ckpt["global_step"] < 100 * 14 and len(ckpt["rng"]) == 2
    r = torchrun(tmp_path / "out", ["--path_resume", str(run), "--max_steps", str(ckpt["global_step"] + 2)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / f"step_{ckpt['global_step'] + 2}_checkpoint.pt").exists()


def test_an_infinite_loss_on_one_rank_stops_both_with_one_error_line(tmp_path):
    t0 = time.time()
    r = torchrun(tmp_path / "out", TINY + ["--epoch", "3", "--run_dir", str(tmp_path / "run")], timeout=120,
                 INF_LOSS_RANK="1", FAULT_STEP="7")  # log steps every 5: 5 is finite, 10 sees step 7
    assert r.returncode != 0 and time.time() - t0 < 60  # rank 0 did not wait in a collective for the timeout
    (line,) = error_lines(r.stdout + r.stderr)
    assert "NaN or infinite at step 7 (epoch 1)" in line
    # torchrun prints a traceback of its own; no rank printed one
    assert "exitcode  : 2" in r.stderr and 'train.py", line' not in r.stderr


def test_an_error_on_one_rank_only_reaches_the_user_as_one_line(tmp_path):
    r = torchrun(tmp_path / "out", TINY + ["--epoch", "3", "--run_dir", str(tmp_path / "run")],
                 ERROR_RANK="1", FAULT_STEP="3")
    assert r.returncode != 0
    (line,) = error_lines(r.stdout + r.stderr)
    assert "injected failure on rank 1 at step 3" in line
    # rank 0 then fails in its next collective, quietly: no traceback from a rank
    assert 'train.py", line' not in r.stderr and "Connection closed" not in r.stderr


COMPILE_TINY = ["--dataset", "digits", "--modch", "32", "--chmul", "1", "--numres", "1", "--batchsize", "64",
                "--ddim", "True", "--num_steps", "3", "--genbatch", "10", "--log_every", "2", "--epoch", "1",
                "--compile", "True"]


def test_gpu_check_runs_its_steps_on_cpu_and_reports(tmp_path, inductor_cache):
    # without a GPU the same steps run on tiny configs (the CUDA tests skip): this checks the script's plumbing,
    # and its 2-rank step is this suite's test that compile around DDP on gloo trains, stops and resumes (the
    # loss compiled on both ranks at the start and at the resume, the grid's noise and network at their first
    # use); it pays the suite's cold compile, which the test below reuses
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"),
               PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", TORCHINDUCTOR_CACHE_DIR=inductor_cache)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert report["passed"] and set(report["steps"]) == {"preflight", "warmup", "tests", "bench", "train", "resume",
                                                         "sample"}
    assert all(report["train"]["checks"].values()) and report["sample"]["fid_line"].startswith("proto-FID")
    compiles = {(c["network"], c["compiled"]) for c in report["train"]["compiles"]}
    assert compiles == {("loss", True), ("per-image noise", True), ("sampling network", True)}
    assert len(report["train"]["compiles"]) == 4  # the loss at the start and at the resume, the grid's two at the end
    assert report["warmup"]["rows"]["train step, optimised (amp none, compile False, channels_last True, fused "
                                    "AdamW)"]["img_per_s"] > 0  # on CPU the warm-up is plumbing only
    assert sum(s["seconds"] for s in report["steps"].values()) <= 540
    assert len(report["bench"]["rows"]) == 3 and "skipped" in report["tests"]["summary"]
    assert report["sample"]["counted"] == 100 and report["bench"]["rows"]["train step, eager fp32"]["img_per_s"] > 0
    assert os.path.isfile(tmp_path / "out" / "profile" / "top_ops.txt")


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
