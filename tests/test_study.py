"""study.py: the task list and its array mapping, the SLURM submission and task script, start-or-continue across
a stop, and the one-line errors."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

from conftest import ROOT, run_env, run_program
from test_sample import write_classifier

import sample
import study
import train
import train_classifier

STUDY = """
dataset = "digits"
out = "{out}"
data_root = "{data}"
epochs = {epochs}
interval = 1
early = []
global_batch = 64
batchsize = 64
train_seeds = [0, 1]
classifier_seeds = [0, 1]
train = "--modch 32 --chmul 1,2 --numres 1 --ddim True --num_steps 3 --genbatch 10 --log_every 5"
[classifiers]
prototypes = "--pretrained False --epoch 1"
[eval_classifier]
seed = 7
flags = "--pretrained False --epoch 1"
[arms]
regular = "--mode regular"
regular_padding_idx = "--mode regular --compat padding_idx"
proto_frozen = "--mode proto_frozen --path_proto {{prototypes}}"
[evaluation]
images = 20
features = "classifier"
sampler = "--ddim True --num_steps 3 --genbatch 10"
seed = 3
[endpoints]
baselines = ["regular", "regular_padding_idx"]
fid_threshold = 5.0
early_until = 2
"""


def write_study(tmp_path, epochs=2, **replace):
    text = STUDY.format(out=tmp_path / "out", data=tmp_path / "data", epochs=epochs)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return str(path)


def parse(cmd, parsers={"train.py": train, "sample.py": sample, "train_classifier.py": train_classifier}):
    name = next(w for w in cmd if w in parsers)
    return name, parsers[name].build_parser().parse_args(cmd[cmd.index(name) + 1:])


def test_arms_times_seeds_with_classifier_seeds_only_where_an_arm_uses_a_classifier(tmp_path):
    s = study.load_study(write_study(tmp_path), [], None)
    runs = study.run_tasks(s, gpus=1)
    # regular and its padding_idx twin use no classifier: once per training seed; proto_frozen per (seed, classifier)
    assert [t.name for t in runs] == ["regular-s0", "regular-s1", "regular_padding_idx-s0", "regular_padding_idx-s1",
                                      "proto_frozen-s0-c0", "proto_frozen-s0-c1", "proto_frozen-s1-c0",
                                      "proto_frozen-s1-c1"]
    out = str(tmp_path / "out")
    for task in runs:
        (_, tr), (_, sc) = parse(task.commands[0]), parse(task.commands[1])
        assert (tr.seed, tr.run_dir, tr.if_exists, tr.epoch, tr.interval) == (task.seed, task.run_dir, "continue", 2, 1)
        assert tr.compat == ("padding_idx" if task.arm == "regular_padding_idx" else "none")
        if task.arm == "proto_frozen":
            assert tr.path_proto == f"{out}/classifiers/prototypes-c{task.classifier_seed}.pt"
        # one evaluation for every run: same images, sampling seeds, classifier; every saved epoch, once
        assert (sc.path, sc.epoch, sc.genum, sc.seed, sc.fid, sc.skip_scored) == (task.run_dir, "all", 20, 3, True, True)
        assert sc.eval_classifier == f"{out}/classifiers/eval_classifier-c7.pt"
    classifiers = [parse(t.commands[0])[1] for t in study.classifier_tasks(s)]
    assert [(a.seed, a.out) for a in classifiers] == [(0, f"{out}/classifiers/prototypes-c0.pt"),
                                                      (1, f"{out}/classifiers/prototypes-c1.pt"),
                                                      (7, f"{out}/classifiers/eval_classifier-c7.pt")]


@pytest.mark.parametrize("gpus,batch", [(1, 64), (2, 32), (4, 16)])
def test_each_run_keeps_the_studys_global_batch_on_its_gpus(tmp_path, gpus, batch):
    s = study.load_study(write_study(tmp_path), [], None)
    cmd = study.run_tasks(s, gpus)[0].commands[0]
    _, args = parse(cmd)
    assert (args.global_batch, args.batchsize) == (64, batch)
    assert (f"--nproc_per_node={gpus}" in cmd) == (gpus > 1) and ("--standalone" in cmd) == (gpus > 1)


def test_the_array_task_number_picks_one_run_and_runs_only_it(tmp_path):
    path = write_study(tmp_path)
    ran = []
    with mock.patch.object(study.Runner, "run", lambda self, task, env=None: ran.append(task.name) or "done"):
        r = run_program("study.py", [path, "--task", "array"], env={"SLURM_ARRAY_TASK_ID": "5"})
        assert r.returncode == 0, r.stderr
        assert run_program("study.py", [path, "--task", "2"]).returncode == 0
        bad = run_program("study.py", [path, "--task", "8"])
    assert ran == ["proto_frozen-s0-c1", "regular_padding_idx-s0"]
    assert bad.returncode == 2 and "--task 8: the study has tasks 0-7" in bad.stderr


def test_submit_makes_an_array_between_the_classifiers_and_the_report(tmp_path):
    path = write_study(tmp_path)
    r = run_program("study.py", [path, "--submit", "True", "--dry_run", "True", "--set", "epochs=3",
                                 "--sbatch=--partition=gpu"])
    assert r.returncode == 0, r.stderr
    calls = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert len(calls) == 3 and all(c[0] == "sbatch" and "--partition=gpu" in c for c in calls)
    assert all(c[c.index("scripts/study.sbatch") + 1:][:3] == [path, "--set", "epochs=3"] for c in calls)
    assert [c[-1] for c in calls] == ["classifiers", "array", "finish"]
    assert "--array=0-7" in calls[1] and "--dependency=afterok:JOB_CLASSIFIERS" in calls[1]
    assert "--dependency=afterany:JOB_RUNS" in calls[2]
    assert not os.path.exists(tmp_path / "out")  # a dry run writes nothing


def test_overrides_compat_and_one_line_errors(tmp_path):
    path = write_study(tmp_path)
    (tmp_path / "bad.toml").write_text("[arms\n")
    s = study.load_study(path, ["evaluation.images=40", "compat=original", "train_seeds=[3]"], ["regular"])
    assert s["evaluation"]["images"] == 40 and s["out"].endswith("out-compat_original")
    (task,) = study.run_tasks(s, 1)
    assert parse(task.commands[0])[1].compat == "original" and task.seed == 3
    for args, message in [([path, "--arms", "regular,bogus"], "--arms bogus: not an arm"),
                          ([str(tmp_path / "none.toml")], "cannot read the study file"),
                          ([str(tmp_path / "bad.toml")], "is not valid TOML"),
                          ([path, "--set", "epochs"], "--set takes key=value"),
                          ([path, "--task", "array"], "SLURM_ARRAY_TASK_ID, which is not set"),
                          ([path, "--set", "endpoints.pilot_seed=1"],
                           "endpoints.pilot_seed 1 is a training seed: the threshold needs another run"),
                          ([path, "--set", 'endpoints.comparisons=["regular"]'],
                           "endpoints.comparisons: 'regular' is not 'ARM - BASELINE' of two arms")]:
        r = run_program("study.py", args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert study.load_study(path, ["endpoints.pilot_seed=1", "pilot=true"], None)["pilot"]  # the pilot itself
    r = run_program("study.py", [path, "--set", "eval_classifier.seed=1"])
    assert r.returncode == 2 and "eval_classifier.seed 1 is a prototype classifier's seed" in r.stderr
    path = write_study(tmp_path, **{'"regular_padding_idx"]': '"nothing"]'})
    r = run_program("study.py", [path, "--dry_run", "True"])
    assert r.returncode == 2 and "endpoints.baselines names 'nothing'" in r.stderr


def test_a_stopped_study_continues_with_the_same_command_and_reports(tmp_path):
    path = write_study(tmp_path, **{"train_seeds = [0, 1]": "train_seeds = [0]"})
    (tmp_path / "out" / "classifiers").mkdir(parents=True)
    write_classifier(tmp_path / "out" / "classifiers" / "eval_classifier-c7.pt")  # finished before: kept
    # train.py and sample.py stand-ins (tests/study_stand_in.py): the study's own stop and continue, in seconds
    env = dict(run_env(), LAUNCH=f"{sys.executable} {os.path.join(ROOT, 'tests', 'study_stand_in.py')}")
    cmd = [sys.executable, os.path.join(ROOT, "study.py"), path, "--arms", "regular,regular_padding_idx"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out" / "logs" / "regular-s0.log"
    deadline = time.time() + 300
    while not (log.exists() and "step 3\n" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what SLURM sends on preemption, and study.sbatch at the time limit
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM; the same command continues" in err, err
    assert "stopped by SIGTERM at step" in log.read_text() and "sample.py" not in log.read_text()  # not scored
    assert not (tmp_path / "out" / "logs" / "regular_padding_idx-s0.log").exists()  # no task starts after a stop
    # the reference statistics were made once, after the classifiers and before any run: no scoring starts them
    reference = (tmp_path / "out" / "classifiers" / "reference-classifier.txt").read_text().strip()
    assert reference.startswith(str(tmp_path / "data")) and os.path.isfile(reference)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stopped_at = int(log.read_text().split("stopped by SIGTERM at step ")[1].split()[0])
    assert f"resumed at step {stopped_at}" in log.read_text()  # the same command continued the run
    assert "report of 2/2 runs with scores" in r.stdout
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result["paired"]["fid"]["regular"]["regular_padding_idx"]["2"] | {"t": 0} == {
        "n": 1, "mean": 0.0, "ahead": 0, "t": 0, "bootstrap": None, "p": 1.0}


def test_the_array_task_script_requeues_its_own_task_at_the_time_limit(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho scontrol \"$@\" >> {calls}\n")
    fake_py = tmp_path / "python"  # stands for study.py: writes its pid, checkpoints (exits) on SIGTERM
    fake_py.write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/args\ntrap 'kill $!; echo TERM >> {calls}; exit 143' TERM\n"
                       f"echo $$ > {tmp_path}/pid\nsleep 60 & wait\n")
    for f in (bin_dir / "scontrol", fake_py):
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PY=str(fake_py), SLURM_JOB_ID="57",
               SLURM_ARRAY_JOB_ID="42", SLURM_ARRAY_TASK_ID="3", SLURM_SUBMIT_DIR=ROOT)
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "study.sbatch"), "s.toml", "--task", "array"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "pid").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "job 42_3 stops with a checkpoint and is requeued" in err, err
    assert calls.read_text().splitlines() == ["TERM", "scontrol requeue 42_3"]  # the task, not the array (42)
    assert (tmp_path / "args").read_text().split() == ["study.py", "s.toml", "--task", "array"]


def test_each_slot_gets_gpus_of_its_own_among_the_visible_ones(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # what CUDA_VISIBLE_DEVICES=2,3,5,7 leaves visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert study.slots(0, 2) == [{"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "5,7"}]
    assert study.slots(3, 1) == [{"CUDA_VISIBLE_DEVICES": v} for v in ("2", "3", "5")]
    with pytest.raises(study.UserError, match="needs 6 GPUs; 4 are visible"):
        study.slots(3, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert study.slots(2, 1) == [{"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2))}] * 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # a SLURM job's share, whatever the node has
    assert study.slots(2, 1) == [{"OMP_NUM_THREADS": "4"}] * 2
