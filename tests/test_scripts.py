import os
import shlex
import signal
import subprocess
import time

import pytest

from conftest import ROOT

import sample
import study
import train
import train_classifier

PARSERS = {"train.py": train.build_parser, "sample.py": sample.build_parser,
           "train_classifier.py": train_classifier.build_parser, "study.py": study.build_parser}


def dry_run(script: str, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """A dataset script's --dry-run and the commands it prints."""
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args, "--dry-run"], capture_output=True,
                       text=True, env=dict(os.environ, **(env or {})), cwd=ROOT)
    return r, [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script,dataset,compat", [("cifar10.sh", "cifar10", "none"), ("stl10.sh", "stl10", "original"),
                                                   ("tiny_imagenet.sh", "tiny-imagenet", "padding_idx")])
def test_dataset_scripts_dry_run_print_a_study_whose_commands_parse(script, dataset, compat):
    r, commands = dry_run(script, env={"COMPAT": compat})
    assert r.returncode == 0, r.stderr
    scripts = [next(w for w in cmd if w.endswith(".py")) for cmd in commands]
    # 2 prototype classifiers, the evaluation classifier and the reference statistics, then per (arm, seeds): train,
    # score every saved epoch, the real-vs-real floor
    assert scripts == ["train_classifier.py"] * 3 + ["study.py"] + ["train.py", "sample.py", "sample.py"] * 30
    floors = [cmd for cmd in commands if "--real" in cmd]
    assert len(floors) == 30 and all(sample.build_parser().parse_args(c[c.index("sample.py") + 1:]).real == "test"
                                     for c in floors)
    out = f"results/{script[:-3]}" + (f"-compat_{compat}" if compat != "none" else "")  # one folder per --compat
    arms = []
    for cmd, name in zip(commands, scripts):
        args = PARSERS[name]().parse_args(cmd[cmd.index(name) + 1:])
        if name == "study.py":
            assert args.task == "reference" and (args.set == [f'compat="{compat}"'] if compat != "none" else not args.set)
        if name == "train_classifier.py":
            assert args.dataset == dataset and args.global_batch == 128 and args.out.startswith(out + "/")
        if name == "sample.py":
            assert args.fid and args.epoch == "all" and args.eval_classifier == f"{out}/classifiers/eval_classifier-c100.pt"
        if name == "train.py":
            arms.append((args.mode, args.compat))
            assert args.dataset == dataset and args.epoch == 200 and args.cdim == 128 and args.run_dir.startswith(out)
            assert (args.global_batch, args.batchsize) == (256, 64)  # the paper's global batch
    expected = {"none": "none", "original": "original", "padding_idx": "padding_idx"}[compat]
    assert sorted(set(arms)) == sorted({("regular", expected), ("regular", "padding_idx"), ("proto_frozen", expected),
                                        ("proto_unfrozen", expected), ("random_scaled", expected),
                                        ("proto_shuffled", expected)})


@pytest.mark.parametrize("gpus,batch", [(1, 64), (2, 64), (4, 64), (8, 32)])
def test_each_run_trains_at_the_papers_global_batch_on_any_gpu_count(gpus, batch):
    _, commands = dry_run("cifar10.sh", "--gpus_per_task", str(gpus))
    cmd = next(c for c in commands if "train.py" in c)
    args = train.build_parser().parse_args(cmd[cmd.index("train.py") + 1:])
    assert (f"--nproc_per_node={gpus}" in cmd) == (gpus > 1) and (args.batchsize, args.global_batch) == (batch, 256)
    assert train.micro_batches(args.global_batch, args.batchsize, gpus) * batch * gpus == 256


def test_the_study_saves_log_spaced_early_epochs_light_and_estimates_each_run():
    r, commands = dry_run("cifar10.sh")
    cmd = next(c for c in commands if "train.py" in c)
    args = train.build_parser().parse_args(cmd[cmd.index("train.py") + 1:])
    assert (args.save_epochs, args.interval, args.epoch, args.keep_last) == ([1, 2, 4, 8, 16], 25, 200, 2)
    # 200 epochs x 50,000 training images at 1,596 img/s; 13 scored epochs x 10,000 images at 96 img/s;
    # 13 weights files of 113.0 MB and 2 full states of 452.2 MB
    hours, score, disk = 200 * 50000 / 1596 / 3600, 13 * 10000 / 96 / 3600, (13 * 113.0 + 2 * 452.2) / 1000
    assert (f"training {hours:.1f} GPU-h (200 epochs x 50,000 images), scoring 13 points {score:.1f} GPU-h, "
            f"disk {disk:.1f} GB; 30 runs: {30 * (hours + score):.0f} GPU-h" in r.stdout)


def test_the_digits_studies_dry_run_give_each_arm_its_table(tmp_path):
    out = str(tmp_path / "study")
    r, commands = dry_run("digits_experiment.sh", "--set", f"out=\"{out}\"", "train_seeds=[3]")
    assert r.returncode == 0, r.stderr
    classifiers = [train_classifier.build_parser().parse_args(c[c.index("train_classifier.py") + 1:])
                   for c in commands if "train_classifier.py" in c]
    assert [(a.out, a.seed, a.center_lr_mult) for a in classifiers] == [
        (f"{out}/classifiers/prototypes-c0.pt", 0, 1), (f"{out}/classifiers/prototypes_lr100-c0.pt", 0, 100),
        (f"{out}/classifiers/eval_classifier-c1.pt", 1, 1)]
    runs = [train.build_parser().parse_args(c[c.index("train.py") + 1:]) for c in commands if "train.py" in c]
    table = {os.path.basename(a.run_dir): (a.mode, a.proto_norm, a.proto_source,
                                           a.path_proto and os.path.basename(a.path_proto)) for a in runs}
    assert table == {"regular-s3": ("regular", "keep", "centres", None),
                     "centres-s3-c0": ("proto_frozen", "default", "centres", "prototypes-c0.pt"),
                     "centres_lr100-s3-c0": ("proto_frozen", "default", "centres", "prototypes_lr100-c0.pt"),
                     "means-s3-c0": ("proto_frozen", "default", "means", "prototypes-c0.pt"),
                     "random-s3-c0": ("random_scaled", "default", "centres", "prototypes-c0.pt")}
    assert {a.seed for a in runs} == {3} and not os.path.exists(out)  # a dry run writes nothing
    r, commands = dry_run("digits_experiment.sh", "studies/digits_study3.toml")
    runs = [train.build_parser().parse_args(c[c.index("train.py") + 1:]) for c in commands if "train.py" in c]
    assert len(runs) == 20 and {(a.mode, a.compat, a.proto_norm) for a in runs} == {
        ("regular", "none", "keep"), ("regular", "padding_idx", "keep"), ("proto_frozen", "none", "keep"),
        ("proto_frozen", "none", "default")}


def test_class0_check_dry_run_trains_the_two_baselines_with_one_seed_and_audits_them(tmp_path):
    out = str(tmp_path / "check")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "class0_check.sh"), "--dry-run"], capture_output=True,
                       text=True, env=dict(os.environ, OUT=out, SEED="4"), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert [next(w for w in c if w.endswith(".py")) for c in commands] == [
        "train_classifier.py", "train.py", "sample.py", "train.py", "sample.py", "audit.py"]
    clf = train_classifier.build_parser().parse_args(commands[0][2:])
    runs = [train.build_parser().parse_args(c[2:]) for c in commands if c[1] == "train.py"]
    assert clf.seed == 1 and [(a.mode, a.compat, a.seed) for a in runs] == [("regular", "none", 4),
                                                                            ("regular", "padding_idx", 4)]
    assert all(vars(a) == dict(vars(runs[0]), compat=a.compat, run_dir=a.run_dir) for a in runs)  # one seed, one setup
    scores = [sample.build_parser().parse_args(c[2:]) for c in commands if c[1] == "sample.py"]
    assert all(s.per_class and s.eval_classifier == clf.out and s.epoch == str(runs[0].epoch) for s in scores)
    assert commands[-1][2:] == [a.run_dir for a in runs] and not os.path.exists(out)


def fake_slurm(tmp_path):
    """A PATH with scontrol and scancel that log their calls (scancel also stops the fake step), and SLURM's env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho scontrol \"$@\" >> {log}\n"
                                      "[ \"$1\" = show ] && printf 'gpu-a\\ngpu-b\\n'\nexit 0\n")
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho scancel \"$@\" >> {log}\n"
                                     f"kill -TERM $(cat {tmp_path}/step.pid)\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-[a-b]", GPUS_PER_NODE="4", SLURM_SUBMIT_DIR=ROOT)
    return env, log


def test_the_slurm_script_launches_every_command_on_all_nodes_at_the_papers_global_batch(tmp_path):
    env, _ = fake_slurm(tmp_path)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm.sbatch"), "scripts/cifar10.sh", "--dry-run"],
                       capture_output=True, text=True, env=dict(env, SLURM_CPUS_PER_TASK="16"), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ") and
                "study.py" not in line]  # the reference statistics: one process
    assert len(commands) == 93  # 3 classifiers, 30 x (train, score, floor)
    for cmd in commands:
        assert cmd[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
        assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv_id=42", "--rdzv_backend=c10d",
                "--rdzv_endpoint=gpu-a:20042"} <= set(cmd)  # a rendezvous port of this job's own
    runs = [train.build_parser().parse_args(c[c.index("train.py") + 1:]) for c in commands if "train.py" in c]
    assert {(a.global_batch, a.batchsize, a.if_exists) for a in runs} == {(256, 32, "continue")}  # 8 GPUs x 32
    scores = [sample.build_parser().parse_args(c[c.index("sample.py") + 1:]) for c in commands if "sample.py" in c]
    assert all(s.skip_scored for s in scores)


@pytest.mark.parametrize("array", [False, True])
def test_the_slurm_script_stops_the_running_step_and_requeues_before_the_time_limit(tmp_path, array):
    env, log = fake_slurm(tmp_path)
    if array:  # an array task's job id is its own; the array's id would address every task
        env.update(SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID="2")
    step = tmp_path / "step.sh"  # stands for the study: ends when its step is cancelled with SIGTERM
    step.write_text(f"echo $$ > {tmp_path}/step.pid\nsleep 60 & trap 'kill $!; exit 0' TERM\nwait\n")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "slurm.sbatch"), str(step)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "step.pid").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "requeueing" in err, err
    me = "40_2" if array else "42"
    assert log.read_text().splitlines()[-2:] == [f"scancel --signal=TERM {me}", f"scontrol requeue {me}"]


def test_a_rerun_of_a_study_keeps_its_finished_classifiers(tmp_path):
    (tmp_path / "classifiers").mkdir()
    (tmp_path / "classifiers" / "prototypes-c0.pt").write_bytes(b"done")  # finished before a preemption
    r, commands = dry_run("cifar10.sh", "--set", f"out=\"{tmp_path}\"")
    assert "# classifiers prototypes-c0 (kept)" in r.stdout and "# classifiers prototypes-c1\n" in r.stdout


def test_the_fashion_mnist_study_saves_and_scores_its_early_steps_and_estimates_the_cpu_hours():
    r, commands = dry_run("fashion_mnist.sh")
    assert r.returncode == 0, r.stderr
    trains = [c for c in commands if "train.py" in c]
    assert len(trains) == 30  # 5 arms x 6 seeds
    args = train.build_parser().parse_args(trains[0][trains[0].index("train.py") + 1:])
    assert (args.dataset, args.image_size, args.epoch, args.save_steps) == ("fashion_mnist", 16, 1, [234, 468, 662])
    steps = [c for c in commands if "--step" in c]
    assert len(steps) == 30 and all(sample.build_parser().parse_args(c[c.index("sample.py") + 1:]).step == "all"
                                    for c in steps)
    # 60,000 images at 112 img/s; 4 points x 500 images at 8.7 img/s; 130 s more; 15 pairs of runs side by side
    train_h, score_h, other_h = 60000 / 112 / 3600, 4 * 500 / 8.7 / 3600, 130 / 3600
    assert (f"training {train_h:.2f} h, scoring 4 points {score_h:.2f} h, the rest {other_h:.2f} h; 30 runs, 2 side "
            f"by side: {15 * (train_h + score_h + other_h):.1f} h" in r.stdout)
