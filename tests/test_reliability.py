"""Exact resume, preemption, atomic checkpoints, NaN stops and the error matrix of docs/reliability.md (bad input)."""
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run_env, run_program

import checkpoints
import train
from cli import UserError


def main(argv):
    return train.main(train.build_parser().parse_args(argv))


def final_weights(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "ckpt_2_checkpoint.pt"), weights_only=True)
    return {"net": ckpt["net"], "cemblayer": ckpt["cemblayer"], "ema": ckpt["ema"]["net"],
            "adam": {f"{k}.{n}": v for k, s in ckpt["optimizer"]["state"].items() for n, v in s.items()}}


def assert_identical(a, b):
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def snapshot(folder):
    return {p: hashlib.sha1(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("straight") / "run")
    main(TINY + ["--epoch", "2", "--run_dir", run])
    return final_weights(run)


@pytest.mark.parametrize("k", [20, 28, 33])  # inside epoch 1, exactly at its end, inside epoch 2 (28 steps each)
def test_stop_and_resume_gives_bit_identical_weights(tmp_path, straight, k):
    run = str(tmp_path / "run")
    main(TINY + ["--epoch", "2", "--run_dir", run, "--max_steps", str(k)])
    marker = torch.load(os.path.join(run, "checkpoints", "last_epoch.pt"), weights_only=True)
    assert marker["file"] == f"step_{k}_checkpoint.pt"
    main(["--path_resume", run])
    assert_identical(straight, final_weights(run))


def test_two_process_resume_is_bit_identical(tmp_path):
    def torchrun(out, args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "ddp_worker.py"), str(out)] + args
        r = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    torchrun(tmp_path / "a", TINY + ["--epoch", "2", "--run_dir", str(tmp_path / "run_a")])
    torchrun(tmp_path / "b", TINY + ["--epoch", "2", "--run_dir", str(tmp_path / "run_b"), "--max_steps", "10"])
    torchrun(tmp_path / "b", ["--path_resume", str(tmp_path / "run_b")])  # 14 steps per epoch with 2 ranks
    assert_identical(final_weights(str(tmp_path / "run_a")), final_weights(str(tmp_path / "run_b")))
    ckpt = torch.load(tmp_path / "run_b" / "checkpoints" / "step_10_checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + ["--epoch", "100", "--log_every", "1",
                                                                      "--run_dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and f"--path_resume {run}" in out
    marker = torch.load(run / "checkpoints" / "last_epoch.pt", weights_only=True)
    ckpt = torch.load(run / "checkpoints" / marker["file"], weights_only=True)
    assert marker["file"] == f"step_{ckpt['global_step']}_checkpoint.pt" and ckpt["global_step"] >= 1
    main(["--path_resume", str(run), "--max_steps", str(ckpt["global_step"] + 2)])
    assert os.path.exists(run / "checkpoints" / f"step_{ckpt['global_step'] + 2}_checkpoint.pt")


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = checkpoints.save_atomic

    def failing(obj, path):
        if "ckpt_2" in path:
            with open(path + ".tmp0", "wb") as f:  # what a crash half-way through the write leaves behind
                f.write(b"partial")
            os.remove(path + ".tmp0")
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoints, "save_atomic", failing)
    with pytest.raises(UserError, match="could not write checkpoint .*ckpt_2.*No space left"):
        main(TINY + ["--epoch", "2", "--interval", "1", "--run_dir", str(run)])
    files = sorted(os.listdir(run / "checkpoints"))
    assert files == ["ckpt_1_checkpoint.pt", "last_epoch.pt"]
    assert torch.load(run / "checkpoints" / "last_epoch.pt", weights_only=True)["file"] == "ckpt_1_checkpoint.pt"
    assert torch.load(run / "checkpoints" / "ckpt_1_checkpoint.pt", weights_only=True)["epoch"] == 1


def test_keep_last_prunes_only_after_a_new_checkpoint(tmp_path):
    run = tmp_path / "run"
    main(TINY + ["--epoch", "3", "--interval", "1", "--keep_last", "2", "--run_dir", str(run)])
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt_2_checkpoint.pt", "ckpt_3_checkpoint.pt",
                                                       "last_epoch.pt"]


def test_a_nan_loss_stops_with_step_and_epoch_and_saves_nothing(tmp_path):
    run = tmp_path / "run"
    r = run_program("train.py", TINY + ["--epoch", "2", "--interval", "1", "--lr", "1e30", "--run_dir", str(run)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "error:" in line and "NaN or infinite at step" in line and "(epoch 1)" in line
    assert not glob.glob(str(run / "checkpoints" / "*_checkpoint.pt"))


# ---- the error matrix: exit code != 0, one `error:` line, no traceback, nothing on disk changed
@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    run = root / "run"
    main(TINY + ["--epoch", "1", "--run_dir", str(run)])
    good = run / "checkpoints" / "ckpt_1_checkpoint.pt"
    for name, content in [("corrupt", os.urandom(4096)), ("truncated", good.read_bytes()[: good.stat().st_size // 2])]:
        bad_run = root / name
        shutil.copytree(run, bad_run)
        (bad_run / "checkpoints" / "ckpt_1_checkpoint.pt").write_bytes(content)
    missing = root / "missing"
    shutil.copytree(run, missing)
    os.remove(missing / "checkpoints" / "ckpt_1_checkpoint.pt")
    torch.save(torch.randn(10, 64), root / "narrow.pt")
    (root / "taken").mkdir()
    return root


T, C, S = "train.py", "train_classifier.py", "sample.py"
SAMPLE_OK = ["--epoch", "1", "--ddim", "True", "--num_steps", "3", "--genum", "10"]
MATRIX = [
    (T, ["--path_resume", "{d}/corrupt"], "corrupt"),
    (T, ["--path_resume", "{d}/truncated"], "truncated"),
    (T, ["--path_resume", "{d}/missing"], "does not exist"),
    (T, ["--path_resume", "{d}/nowhere"], "not a run dir"),
    (T, TINY + ["--run_dir", "{d}/taken"], "already exists"),
    (T, TINY + ["--mode", "proto_frozen", "--path_proto", "{d}/narrow.pt", "--run_dir", "{d}/new"], "do not fit"),
    (T, TINY + ["--mode", "proto_frozen", "--path_proto", "{d}/absent.pt", "--run_dir", "{d}/new"], "does not exist"),
    (T, TINY + ["--num_steps", "1"], "--num_steps"),
    (T, TINY + ["--global_batch", "100"], "is not a multiple of --batchsize x processes (64 x 1 = 64)"),
    (T, TINY + ["--image_size", "12", "--chmul", "1,2,2,2"], "cannot be halved"),
    (C, ["--dataset", "imagenet", "--out", "{d}/c.pt"], "--dataset must be one of"),
    (C, ["--dataset", "cifar10", "--download", "False", "--data_root", "{d}/nodata", "--out", "{d}/c.pt"], "cifar10"),
    (C, ["--dataset", "digits", "--out", "{d}/narrow.pt"], "already exists"),
    (S, ["--path", "{d}/corrupt"] + SAMPLE_OK, "corrupt"),
    (S, ["--path", "{d}/truncated"] + SAMPLE_OK, "truncated"),
    (S, ["--path", "{d}/run", "--epoch", "9"], "saved epochs: 1"),
    (S, ["--path", "{d}/nowhere"] + SAMPLE_OK, "not a directory"),
    (S, ["--path", "{d}/run", "--epoch", "1", "--ddim", "True", "--num_steps", "5000"], "--num_steps"),
    (S, ["--path", "{d}/run", "--fid_features", "vgg"] + SAMPLE_OK, "--fid_features must be one of"),
    (S, ["--path", "{d}/run", "--fid_features", "classifier"] + SAMPLE_OK, "needs --path_proto"),
    (S, ["--path", "{d}/run", "--path_proto", "{d}/narrow.pt", "--out", "{d}/s"] + SAMPLE_OK, "no classifier"),
]


@pytest.mark.parametrize("script,args,msg", MATRIX, ids=[f"{s}:{m}" for s, _, m in MATRIX])
def test_error_matrix(disk, script, args, msg):
    before = snapshot(str(disk))
    r = run_program(script, [a.format(d=disk) for a in args])
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if "Warning" not in line]
    assert "Traceback" not in r.stderr and len(lines) == 1 and "error:" in lines[0] and msg in lines[0], r.stderr
    assert snapshot(str(disk)) == before


def test_the_error_path_of_a_real_process(disk):
    """One case of the matrix as its own process: the exit status and stderr the user sees."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--path", f"{disk}/corrupt"] + SAMPLE_OK,
                       capture_output=True, text=True, env=run_env(), timeout=300)
    lines = [line for line in r.stderr.strip().splitlines() if "Warning" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "corrupt" in lines[0] and "Traceback" not in r.stderr


RANGES = [  # (script, flags, the start of the error line)
    (T, ["--lr", "-1"], "--lr must be > 0"), (T, ["--lr", "nan"], "--lr must be > 0; got nan"),
    (T, ["--multiplier", "0"], "--multiplier must be >= 1"), (T, ["--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (T, ["--droprate", "1.5"], "--droprate must be in [0, 1)"), (T, ["--ema_decay", "1.5"], "--ema_decay must be in [0, 1]"),
    (T, ["--cdim", "0"], "--cdim must be >= 1"), (T, ["--numres", "0"], "--numres must be >= 1"),
    (T, ["--image_size", "0"], "--image_size must be -1 (native size) or >= 1"),
    (T, ["--weight_decay", "-1"], "--weight_decay must be >= 0"), (T, ["--low_t_frac", "2"], "--low_t_frac must be in"),
    (T, ["--schedule", "quadratic"], "--schedule must be one of linear, cosine"),
    (T, ["--select", "cubic"], "--select must be one of linear, quadratic"), (T, ["--modch", "-32"], "--modch must be >= 1"),
    (T, ["--w", "inf"], "--w must be a finite number"), (T, ["--fid_num", "1"], "--fid_num must be >= 2"),
    (C, ["--epoch", "0"], "--epoch must be >= 1"), (C, ["--batchsize", "0"], "--batchsize must be >= 1"),
    (C, ["--lr", "-1"], "--lr must be > 0"), (C, ["--pl_weight", "-1"], "--pl_weight must be >= 0"),
]


@pytest.mark.parametrize("script,flags,msg", RANGES, ids=[f"{s}:{' '.join(f)}" for s, f, _ in RANGES])
def test_out_of_range_flags_stop_before_anything_is_written(tmp_path, monkeypatch, script, flags, msg):
    import train_classifier
    module, base = {T: (train, ["--dataset", "digits"]), C: (train_classifier, ["--dataset", "digits"])}[script]
    monkeypatch.chdir(tmp_path)  # the default --results / --out are relative: nothing may appear here
    with pytest.raises(UserError) as e:
        module.main(module.build_parser().parse_args(base + flags))
    assert str(e.value).startswith(msg), str(e.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script,args", [(T, ["--lr", "nan", "--results", "{d}/res"]),
                                         (C, ["--dataset", "digits", "--epoch", "0", "--out", "{d}/c.pt"]),
                                         ("bench.py", ["--batchsize", "0"])])
def test_out_of_range_flags_give_one_error_line(tmp_path, monkeypatch, script, args):
    monkeypatch.chdir(tmp_path)
    r = run_program(script, [a.format(d=tmp_path) for a in args])
    lines = [line for line in r.stderr.strip().splitlines() if "Warning" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "must be" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_bench_json_is_a_plain_flag_and_prints_one_json_line():
    import json
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--inch", "1", "--modch", "32", "--chmul", "1,2",
                        "--numres", "1", "--image_size", "8", "--batchsize", "4", "--steps", "1", "--warmup", "0",
                        "--sample_timed_steps", "1", "--json"], capture_output=True, text=True, env=run_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    report = json.loads(line)
    assert len(report["rows"]) == 6 and all(row["peak_mem_gb"] is None for row in report["rows"].values())  # CPU
    assert all(row["compiled"] is False for row in report["rows"].values())  # compile is off on CPU by default
