import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, run_env, run_program

import lr_schedule
import train
from checkpoints import build_models


def run(args):
    return run_program("train.py", args)


def only_run_dir(results):
    dirs = glob.glob(os.path.join(results, "*", "*", "*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_one_process_run_writes_config_metrics_grids_and_checkpoints(tmp_path, tiny_args):
    r = run(tiny_args + ["--epoch", "2", "--interval", "1", "--sample_every", "1", "--results", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    run_dir = only_run_dir(tmp_path)
    assert run_dir.startswith(str(tmp_path / "regular" / "digits"))
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["chmul"] == [1, 2] and cfg["inch"] == 1 and cfg["image_size"] == 8 and cfg["num_classes"] == 10
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train_rows = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(5, 57, 5))  # 28 steps per epoch, logged every 5
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train_rows)
    for e in (1, 2):
        grid = Image.open(os.path.join(run_dir, "samples", f"grid_{e}.png"))
        assert grid.size == (12, 102)  # 10 classes, one per row, 8x8 images with 2-pixel padding
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert torch.load(os.path.join(ckpt_dir, "last_epoch.pt"), weights_only=True) == {"last_epoch": 2, "file": "ckpt_2_checkpoint.pt"}
    ckpt = torch.load(os.path.join(ckpt_dir, "ckpt_2_checkpoint.pt"), weights_only=True)
    assert {"net", "cemblayer", "ema", "optimizer", "scheduler", "epoch", "rng", "config"} <= set(ckpt)
    net, cemb = build_models(ckpt["config"])
    net.load_state_dict(ckpt["ema"]["net"], strict=True)
    cemb.load_state_dict(ckpt["cemblayer"], strict=True)
    assert os.path.exists(os.path.join(ckpt_dir, "ckpt_1_checkpoint.pt"))
    assert "checkpoint ->" in open(os.path.join(run_dir, "log.txt")).read()


def test_two_processes_hold_identical_weights(tmp_path, tiny_args):
    out = tmp_path / "weights"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "ddp_worker.py"), str(out)] + tiny_args + ["--epoch", "2", "--results",
                                                                                 str(tmp_path / "res")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    for part in ("net", "cemblayer", "ema"):
        for k in w0[part]:
            assert torch.equal(w0[part][k], w1[part][k]), (part, k)
    run_dir = only_run_dir(tmp_path / "res")
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "ckpt_2_checkpoint.pt"), weights_only=True)
    assert ckpt["config"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert all(torch.equal(ckpt["net"][k], w0["net"][k]) for k in w0["net"])
    assert os.path.exists(os.path.join(run_dir, "samples", "grid_2.png"))
    # 1797 images, 64 per rank x 2 ranks: 14 steps per epoch, 28 in all, logged every 5
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["event"] == "train"] == [5, 10, 15, 20, 25]
    epochs = [(r["epoch"], r["step"], r["steps"]) for r in records if r["event"] == "epoch"]
    assert epochs == [(1, 14, 14), (2, 28, 14)]  # one record per finished epoch, whatever --log_every


def test_the_epoch_record_is_the_mean_of_the_epochs_step_losses(tmp_path, tiny_args):
    train.main(train.build_parser().parse_args(tiny_args + ["--epoch", "1", "--log_every", "1",
                                                            "--run_dir", str(tmp_path / "run")]))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in records if r["event"] == "train"]
    (epoch,) = [r for r in records if r["event"] == "epoch"]
    assert len(steps) == 28 and epoch["steps"] == 28 and epoch["step"] == 28
    assert epoch["loss"] == pytest.approx(sum(r["loss"] for r in steps) / 28, rel=1e-5)
    assert epoch["lr"] == steps[-1]["lr"] and epoch["img_per_s"] > 0


def test_lr_schedule_warms_up_then_cosine_to_zero():
    lr, m, epochs = 2e-4, 2.5, 40
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr * m)
    sched = lr_schedule.make_lr_schedule(opt, epochs, m)
    warm = 2
    for e in range(epochs):
        expected = lr * (1 + (m - 1) * e / warm) if e < warm else \
            lr * m * (1 + math.cos(math.pi * (e - warm) / (epochs - warm))) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), e
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_original_readme_flags_parse_and_fail_clearly_offline(tmp_path):
    flags = ["--batchsize", "64", "--interval", "1", "--image_size", "32", "--dataset", "cifar10", "--epoch", "1500",
             "--cdim", "128", "--ddim", "1", "--lr", "2e-4", "--mode", "proto_frozen", "--path_proto", "P"]
    args = train.build_parser().parse_args(flags)
    assert args.ddim is True and args.chmul == [1, 2, 4, 4] and args.batchsize == 64
    r = run(flags + ["--data_root", str(tmp_path), "--download", "False", "--results", str(tmp_path / "res")])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and str(tmp_path / "cifar10") in lines[0], r.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--modch", "48"], "multiple of 32"),
    (["--chmul", "1,2,2,2,2"], "halved"),
    (["--mode", "protos"], "--mode must be one of"),
    (["--mode", "proto_frozen"], "needs --path_proto"),
    (["--dataset", "mnist"], "--dataset must be one of"),
    (["--chmul", "a,b"], "expected integers"),
    (["--ddim", "maybe"], "expected True/False"),
])
def test_bad_flags_get_one_error_line(tmp_path, tiny_args, flags, msg):
    r = run_program("train.py", tiny_args + flags + ["--epoch", "1", "--results", str(tmp_path)])
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_own_image_folder_trains_a_classifier_evaluates_and_reruns_with_nothing_written_inside(tmp_path):
    folder = tmp_path / "flowers"
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("daisy", "rose", "tulip")):
        (folder / name).mkdir(parents=True)
        for i in range(40):
            pixels = (torch.rand(12, 12, 3, generator=g) * 60 + 90 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    clf = tmp_path / "clf.pt"
    r = run_program("train_classifier.py", ["--dataset", "imagefolder", "--data_root", str(folder), "--image_size",
                                            "8", "--pretrained", "False", "--epoch", "1", "--batchsize", "32",
                                            "--cdim", "16", "--out", str(clf)])
    assert r.returncode == 0, r.stderr[-2000:]
    command = ["--dataset", "imagefolder", "--data_root", str(folder), "--image_size", "8", "--modch", "32", "--chmul",
               "1,2", "--numres", "1", "--cdim", "16", "--batchsize", "24", "--epoch", "2", "--ddim", "True",
               "--num_steps", "3", "--genbatch", "6", "--fid_every", "1", "--fid_num", "12", "--fid_features",
               "classifier", "--eval_classifier", str(clf), "--run_dir", str(tmp_path / "run"), "--if_exists",
               "continue"]
    for attempt in (command + ["--max_steps", "6"], command, command):  # stopped, continued, finished
        r = run(attempt)
        assert r.returncode == 0, r.stderr[-2000:]
    fids = [x for x in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if x["event"] == "fid"]
    assert [x["epoch"] for x in fids] == [1, 2] and all(x["metric"] == "proto-FID" for x in fids)
    assert "nothing to do" in r.stdout
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
