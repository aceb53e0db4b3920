"""Several processes agree (tests with 2 gloo ranks under torchrun): a signal stops every rank within seconds,
whatever --log_every is; a fault on one rank stops every rank with one error line; an evaluation that fails on one
rank is skipped by all; a second signal ends a rank blocked in a collective; an elastic restart still reports.
The compile probe's agreement is in tests/test_gpu_check.py, beside the cold compile it reuses."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoints import build_models
from conftest import ROOT, TINY, run_env
from distributed import seed_everything

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")


def torchrun(out, args, timeout=600, procs=2, **env):
    out.mkdir(exist_ok=True)
    return subprocess.run(TORCHRUN[:-1] + [f"--nproc_per_node={procs}", WORKER, str(out)] + args, capture_output=True, text=True,
                          env=dict(run_env(), **env), timeout=timeout)


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


def records(run, event):
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["event"] == event]


def test_sigterm_stops_a_two_process_job_within_seconds_whatever_log_every_is(tmp_path):
    run = tmp_path / "run"
    command = TINY + ["--epoch", "100", "--log_every", "1000", "--run_dir", str(run), "--if_exists", "continue"]
    cmd = TORCHRUN + [os.path.join(ROOT, "train.py")] + command
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
    r = torchrun(tmp_path / "out", command + ["--max_steps", str(ckpt["global_step"] + 2)])  # the requeued command
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / f"step_{ckpt['global_step'] + 2}_checkpoint.pt").exists()


def test_ctrl_c_to_a_two_process_job_stops_it_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = TORCHRUN + [os.path.join(ROOT, "train.py")] + TINY + ["--epoch", "100", "--log_every", "1000",
                                                                "--run_dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env(),
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.txt").exists() and "run dir" in (run / "log.txt").read_text()):
        time.sleep(0.2)
    time.sleep(2)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: torchrun and both workers, then torchrun
    out, err = proc.communicate(timeout=60)  # forwards its own copy to the workers
    assert time.time() - t0 < 20 and (run / "checkpoints" / "last_epoch.pt").exists()
    assert "stopped by SIGINT" in out and "KeyboardInterrupt" not in err and 'train.py", line' not in err, err[-3000:]
    assert "ChildFailedError" not in err  # torchrun's own SignalException is torchrun's, as for SIGTERM


def test_the_update_of_a_global_batch_does_not_depend_on_processes_or_micro_batches(tmp_path):
    # 64 images per step as 1 process x 2 micro-batches of 32, 2 x 1 of 32 and 2 x 2 of 16 (eager, and compiled
    # around DDP as one graph or as dynamo's one graph per DDP bucket): the same images (the data order is a
    # function of the seed), the same noise per image (KEYED_NOISE), so the same two AdamW updates
    setup = TINY + ["--threshold", "0", "--droprate", "0", "--max_steps", "2", "--global_batch", "64"]
    finals = {}
    for procs, batch, compiled in ((1, 32, False), (2, 32, False), (2, 16, False), (2, 16, True), (2, 16, "buckets")):
        out = tmp_path / f"{procs}x{batch}{'' if not compiled else 'c' if compiled is True else 'b'}"
        r = torchrun(out, setup + ["--batchsize", str(batch), "--run_dir", str(out / "run"), "--compile",
                                   str(bool(compiled))], procs=procs, KEYED_NOISE="1", COMPILE_BACKEND="eager",
                     **({"DDP_BUCKET_GRAPHS": "1"} if compiled == "buckets" else {}))
        assert r.returncode == 0, r.stderr[-3000:]
        micro = 64 // (procs * batch)
        log = (out / "run" / "log.txt").read_text()
        assert f"global batch 64 ({procs} x {micro} micro-batch(es) of {batch})" in log
        assert ("compiled in" in log) == bool(compiled)
        finals[procs, batch, compiled] = torch.load(out / "rank0.pt", weights_only=True)
    # the loss's graphs: one, where DDPOptimizer cuts this 3.2 MiB UNet at its 1 MiB first bucket (the paper's 112 MB
    # UNet: about six graphs at DDP's 25 MB buckets)
    assert finals[2, 16, True]["graphs"] == 1 and finals[2, 16, "buckets"]["graphs"] == 2
    cfg = json.load(open(tmp_path / "1x32" / "run" / "config.json"))
    seed_everything(cfg["seed"])  # train.py's initialisation, rebuilt here to measure how far the weights moved
    net, cemblayer = build_models(cfg)
    start = vector({"net": net.state_dict(), "cemblayer": cemblayer.state_dict()})
    reference = finals[1, 32, False]
    moved = (vector(reference) - start).norm()
    assert moved > 0 and vector(reference["grad"]).norm() > 0
    for key, final in finals.items():
        # as whole vectors: AdamW turns the float noise of gradients near zero (a bias before a GroupNorm) into
        # full-size steps, so single entries may differ by up to 2 lr; the gradient bounds the sum's error too
        assert (vector(final) - vector(reference)).norm() < 0.01 * moved, key
        assert (vector(final["ema"]) - vector(reference["ema"])).norm() < 0.01 * moved, key
        assert (vector(final["grad"]) - vector(reference["grad"])).norm() < 1e-4 * vector(reference["grad"]).norm()


def vector(state):
    """The floating-point tensors of a (nested) state dict as one vector, in key order; grads or net + cemblayer."""
    if "net" in state:
        state = {f"{part}.{k}": v for part in ("net", "cemblayer") for k, v in state[part].items()}
    return torch.cat([v.flatten().double() for _, v in sorted(state.items()) if v.is_floating_point()])


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


def test_an_evaluation_that_fails_on_one_rank_is_skipped_by_both_and_training_goes_on(tmp_path):
    from test_sample import write_classifier
    run = tmp_path / "run"
    clf = write_classifier(tmp_path / "clf.pt")
    r = torchrun(tmp_path / "out", TINY + ["--epoch", "2", "--fid_every", "1", "--fid_num", "20", "--fid_features",
                                           "classifier", "--eval_classifier", str(clf), "--data_root",
                                           str(tmp_path / "data"), "--run_dir", str(run)], timeout=300,
                 EVAL_FAULT_RANK="1")
    assert r.returncode == 0, r.stderr[-3000:]
    errors = records(run, "fid_error")
    assert [e["epoch"] for e in errors] == [1, 2] and not records(run, "fid")
    assert all(e["error"].startswith("rank 1: UserError: reference statistics") and "injected on rank 1" in e["error"]
               for e in errors)
    assert (run / "log.txt").read_text().count("evaluation failed (rank 1: ") == 2
    a, b = (torch.load(tmp_path / "out" / f"rank{k}.pt", weights_only=True)["net"] for k in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # both trained on, in step, to the end


def test_a_second_sigterm_ends_a_rank_blocked_in_a_collective(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(TORCHRUN + [WORKER, str(out)] + TINY + ["--epoch", "3", "--run_dir", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(run_env(), HANG_RANK="1", FAULT_STEP="3"))
    try:
        deadline = time.time() + 120
        while not (out / "hang1").exists() and time.time() < deadline:
            time.sleep(0.2)
        pid = int((out / "pid0").read_text())
        time.sleep(2)  # rank 1 sleeps from its step 3 on: rank 0 waits in that step's gradient all-reduce
        os.kill(pid, signal.SIGTERM)
        time.sleep(3)
        os.kill(pid, 0)  # still alive: the stop flag waits for a step boundary that never comes
        t0 = time.time()
        os.kill(pid, signal.SIGTERM)
        while time.time() - t0 < 10:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        assert time.time() - t0 < 10, "rank 0 did not end after the second SIGTERM"
    finally:  # torchrun starts each worker in a session of its own: end rank 1 (still asleep) and torchrun
        for rank_pid in out.glob("pid*"):
            try:
                os.kill(int(rank_pid.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert "second SIGTERM: exiting now, without a checkpoint" in err


def test_after_an_elastic_restart_the_error_still_reaches_the_user(tmp_path):
    r = subprocess.run(TORCHRUN[:3] + ["--max-restarts=1"] + TORCHRUN[3:] + [WORKER, str(tmp_path)] + TINY +
                       ["--epoch", "3", "--results", str(tmp_path / "res")], capture_output=True, text=True,
                       env=dict(run_env(), ERROR_RANK="1", FAULT_STEP="3"), timeout=600)
    assert r.returncode != 0
    # one line per attempt: the failure count is kept per restart, so the restarted job's first failure speaks too
    assert len([line for line in error_lines(r.stdout + r.stderr) if "injected failure on rank 1" in line]) == 2


def test_more_nccl_processes_than_gpus_is_one_error_naming_both(monkeypatch):
    from cli import UserError
    from distributed import setup_distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node with one GPU, as CUDA would report it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("bound a GPU before refusing"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"^2 processes on this node but 1 visible GPU\(s\): NCCL needs one GPU"):
        setup_distributed("cuda", "nccl")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    d = setup_distributed("cuda", "gloo")  # gloo may share the card: rank 1 on GPU 0
    assert d.device == torch.device("cuda", 0)


MAIN_RANK_FIRST = """
import os, sys, time
from distributed import AgreedFailure, main_rank_first, setup_distributed
d = setup_distributed("cpu")
for attempt in ("ok", "fail"):
    marker = os.path.join(sys.argv[1], attempt)
    def work():
        if d.is_main:
            time.sleep(1)  # a download
            if attempt == "fail":
                raise OSError("the download failed")
            open(marker, "w").close()
        return os.path.exists(marker)  # what a rank that loaded too early would miss
    try:
        line = f"{attempt}: rank {d.rank} saw the dataset: {main_rank_first(work, d)}"
    except AgreedFailure as e:
        line = f"{attempt}: rank {d.rank} failed: {e}"
    sys.stdout.write(line + "\\n")  # one write: the two ranks share torchrun's stdout
    sys.stdout.flush()
"""


def test_one_rank_downloads_while_the_others_wait_and_a_failed_download_reaches_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(MAIN_RANK_FIRST)
    r = subprocess.run(TORCHRUN + [str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=run_env())
    lines = sorted(r.stdout.splitlines())
    assert lines[2:] == ["ok: rank 0 saw the dataset: True", "ok: rank 1 saw the dataset: True"], r.stdout + r.stderr
    assert all(line.startswith("fail: rank") and "failed: rank 0: OSError: the download failed" in line
               for line in lines[:2])
