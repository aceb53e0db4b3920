"""Exact resume, preemption, atomic checkpoints, NaN stops and the error matrix of docs/reliability.md (bad input)."""
import glob
import json
import math
import hashlib
import os
import resource
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


def test_the_same_command_again_continues_bit_for_bit_and_then_has_nothing_to_do(tmp_path, straight):
    command = TINY + ["--epoch", "2", "--run_dir", str(tmp_path / "run"), "--if_exists", "continue"]
    main(command + ["--max_steps", "33"])  # a preempted first attempt (the stop saves as SIGTERM's does)
    main(command)
    assert_identical(straight, final_weights(str(tmp_path / "run")))
    before = snapshot(str(tmp_path / "run" / "checkpoints"))
    main(command)
    assert snapshot(str(tmp_path / "run" / "checkpoints")) == before
    assert "has trained all 2 epochs; nothing to do" in (tmp_path / "run" / "log.txt").read_text()


def test_a_new_epoch_total_on_resume_follows_the_schedule_of_that_many_epochs(tmp_path):
    run = tmp_path / "run"
    main(TINY + ["--epoch", "2", "--run_dir", str(run)])
    main(["--path_resume", str(run), "--epoch", "4"])
    lr, m = 2e-4, 2.5  # a 4-epoch schedule: 1 warm-up epoch, then a cosine over 3 epochs
    expected = {3: lr * m * (1 + math.cos(math.pi / 3)) / 2, 4: lr * m * (1 + math.cos(2 * math.pi / 3)) / 2}
    epochs = {r["epoch"]: r["lr"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["event"] == "epoch"}
    assert epochs[3] == pytest.approx(expected[3], rel=1e-6) and epochs[4] == pytest.approx(expected[4], rel=1e-6)
    assert json.load(open(run / "config.json"))["epoch"] == 4
    assert "--epoch 2 -> 4" in (run / "log.txt").read_text()


def test_two_process_resume_is_bit_identical(tmp_path):
    def torchrun(out, args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "ddp_worker.py"), str(out)] + args
        r = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    torchrun(tmp_path / "a", TINY + ["--epoch", "2", "--run_dir", str(tmp_path / "run_a")])
    command = TINY + ["--epoch", "2", "--run_dir", str(tmp_path / "run_b"), "--if_exists", "continue"]
    torchrun(tmp_path / "b", command + ["--max_steps", "10"])  # 14 steps per epoch with 2 ranks
    torchrun(tmp_path / "b", command)
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


def file_size_limit(limit):
    """preexec_fn: writes past `limit` bytes fail as on a full disk (EFBIG; SIGXFSZ ignored, so writes return it)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_checkpoints(tmp_path):
    # the real failure, not a mock: torch.save's zip writer then raises RuntimeError "unexpected pos"
    run = tmp_path / "run"
    main(TINY + ["--epoch", "1", "--run_dir", str(run)])
    before = {f: (run / "checkpoints" / f).read_bytes() for f in os.listdir(run / "checkpoints")}
    assert (run / "checkpoints" / "ckpt_1_checkpoint.pt").stat().st_size > 4 << 20
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--path_resume", str(run), "--epoch", "2"],
                       capture_output=True, text=True, env=run_env(), timeout=300, preexec_fn=file_size_limit(4 << 20))
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Warning" not in line and "%|" not in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "could not write checkpoint" in lines[0] and "the write stopped part-way" in lines[0]
    assert {f: (run / "checkpoints" / f).read_bytes() for f in os.listdir(run / "checkpoints")} == before


def test_a_log_line_is_written_whole_or_not_at_all(tmp_path):
    script = ("import sys; from cli import append_line\n"
              "for k in range(3):\n"
              "    append_line(sys.argv[1], f'line {k} ' + 'x' * 30 + '\\n')\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "log.txt")], capture_output=True, text=True,
                       env=run_env(), timeout=60, preexec_fn=file_size_limit(100))  # room for 2.5 lines
    assert r.returncode != 0 and "OSError" in r.stderr  # a short write, or EFBIG at the limit
    assert (tmp_path / "log.txt").read_text().splitlines() == [f"line {k} " + "x" * 30 for k in range(2)]


def test_keep_last_keeps_every_saved_epochs_sampling_weights_and_the_newest_full_states(tmp_path, straight):
    run = tmp_path / "run"
    main(TINY + ["--epoch", "2", "--interval", "5", "--save_epochs", "1", "--keep_last", "1", "--run_dir", str(run)])
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt_2_checkpoint.pt", "last_epoch.pt", "weights_1.pt",
                                                       "weights_2.pt"]
    assert checkpoints.saved_epochs(str(run)) == [1, 2]  # what sample.py --epoch all scores
    net, cemblayer, _, used = checkpoints.load_run(str(run), 2, None)
    assert used == "ema" and all(torch.equal(v, straight["ema"][k]) for k, v in net.state_dict().items())
    assert checkpoints.load_run(str(run), 1, None)[3] == "ema"  # epoch 1's full state is gone, its weights stay
    with pytest.raises(UserError, match="holds the EMA weights only"):
        checkpoints.load_run(str(run), 1, "raw")
    full = (run / "checkpoints" / "ckpt_2_checkpoint.pt").stat().st_size
    assert (run / "checkpoints" / "weights_2.pt").stat().st_size < 0.3 * full  # EMA only: no raw weights, no moments


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
    (T, ["--path_resume", "{d}/run", "--lr", "1e-3", "--epoch", "1500"], "the command line differs: --lr 0.001 (the "
     "run has 0.0002); drop them"),
    (T, ["--path_resume", "{d}/run", "--batchsize", "32"], "--batchsize 32 (the run has 64): without --global_batch"),
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
