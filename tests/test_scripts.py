import os
import shlex
import signal
import subprocess
import time

import pytest

from conftest import ROOT

import sample
import train
import train_classifier

PARSERS = {"train.py": train.build_parser, "sample.py": sample.build_parser,
           "train_classifier.py": train_classifier.build_parser}


@pytest.mark.parametrize("script,dataset,compat", [("cifar10.sh", "cifar10", "none"), ("stl10.sh", "stl10", "original"),
                                                   ("tiny_imagenet.sh", "tiny-imagenet", "padding_idx")])
def test_dataset_scripts_dry_run_print_commands_that_parse(script, dataset, compat):
    env = dict(os.environ, EPOCHS="4", INTERVAL="2", NGPU="2", COMPAT=compat)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), "--dry-run"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    scripts = [next(w for w in cmd if w.endswith(".py")) for cmd in commands]
    # 2 classifiers, then per mode: 1 training + one sample.py for the FID of every saved epoch; then the plot
    assert scripts == ["train_classifier.py"] * 2 + ["train.py", "sample.py"] * 5 + ["plot_fid.py"]
    modes = []
    for cmd, name in zip(commands, scripts):
        if name in PARSERS:
            args = PARSERS[name]().parse_args(cmd[cmd.index(name) + 1:])
            assert args.dataset == dataset if name != "sample.py" else args.fid and args.epoch == "all"
            if name == "train.py":
                modes.append(args.mode)
                assert "--nproc_per_node=2" in cmd and args.epoch == 4 and args.cdim == 128 and args.compat == compat
                assert (args.global_batch, args.batchsize) == (256, 64)  # the paper's global batch
    assert modes == ["regular", "proto_frozen", "proto_unfrozen", "random_scaled", "proto_shuffled"]
    assert ("raw) vs epoch" in commands[-1][-1]) == (compat == "original")  # the plot names the weights FID used


@pytest.mark.parametrize("ngpu,batch", [(1, 64), (2, 64), (4, 64), (8, 32)])
def test_the_pipeline_trains_at_the_papers_global_batch_on_any_gpu_count(ngpu, batch):
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "cifar10.sh"), "--dry-run"], capture_output=True,
                       text=True, env=dict(os.environ, NGPU=str(ngpu)), cwd=ROOT)
    cmd = shlex.split(next(line[2:] for line in r.stdout.splitlines() if " train.py " in line))
    args = train.build_parser().parse_args(cmd[cmd.index("train.py") + 1:])
    assert f"--nproc_per_node={ngpu}" in cmd and (args.batchsize, args.global_batch) == (batch, 256)
    assert train.micro_batches(args.global_batch, args.batchsize, ngpu) * batch * ngpu == 256


def test_the_pipeline_saves_log_spaced_early_epochs_light_and_estimates_each_arm():
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "cifar10.sh"), "--dry-run"], capture_output=True,
                       text=True, env=dict(os.environ, NGPU="4"), cwd=ROOT)
    cmd = shlex.split(next(line[2:] for line in r.stdout.splitlines() if " train.py " in line))
    args = train.build_parser().parse_args(cmd[cmd.index("train.py") + 1:])
    assert (args.save_epochs, args.interval, args.epoch, args.keep_last) == ([1, 2, 4, 8, 16, 32], 50, 1500, 2)
    # 1500 epochs x 60,000 images at 1,596 img/s; 30 + 6 saved epochs x 10,000 images at 96 img/s;
    # 36 weights files of 113.0 MB and 2 full states of 452.2 MB
    hours, score, disk = 1500 * 60000 / 1596 / 3600, 36 * 10000 / 96 / 3600, (36 * 113.0 + 2 * 452.2) / 1000
    assert (f"# estimate per arm: training {hours:.1f} GPU-h, scoring 36 epochs {score:.1f} GPU-h, disk {disk:.1f} GB"
            in r.stdout)


def test_digits_experiment_dry_run_gives_each_arm_its_table(tmp_path):
    out = str(tmp_path / "study")
    env = dict(os.environ, OUT=out, SEEDS="3")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "digits_experiment.sh"), "--dry-run"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    classifiers = [train_classifier.build_parser().parse_args(c[c.index("train_classifier.py") + 1:])
                   for c in commands if "train_classifier.py" in c]
    assert [(a.out, a.seed, a.center_lr_mult) for a in classifiers] == [
        (f"{out}/prototypes.pt", 0, 1), (f"{out}/eval_classifier.pt", 1, 1), (f"{out}/prototypes_lr100.pt", 0, 100)]
    runs = [train.build_parser().parse_args(c[c.index("train.py") + 1:]) for c in commands if "train.py" in c]
    table = {os.path.basename(a.run_dir): (a.mode, a.proto_norm, a.proto_source,
                                           a.path_proto and os.path.basename(a.path_proto)) for a in runs}
    assert table == {"regular-s3": ("regular", "keep", "centres", None),
                     "centres-s3": ("proto_frozen", "default", "centres", "prototypes.pt"),
                     "centres_lr100-s3": ("proto_frozen", "default", "centres", "prototypes_lr100.pt"),
                     "means-s3": ("proto_frozen", "default", "means", "prototypes.pt"),
                     "random-s3": ("random_scaled", "default", "centres", "prototypes.pt")}
    assert {a.seed for a in runs} == {3} and {a.eval_classifier for a in runs} == {f"{out}/eval_classifier.pt"}
    assert not os.path.exists(out)  # a dry run writes nothing
    bad = subprocess.run(["bash", os.path.join(ROOT, "scripts", "digits_experiment.sh"), "--dry-run"],
                         capture_output=True, text=True, env=dict(env, ARMS="regular bogus"), cwd=ROOT)
    assert bad.returncode == 2 and "unknown arm 'bogus'" in bad.stderr


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
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    launched = [c for c in commands if "plot_fid.py" not in c]
    assert len(launched) == 12  # 2 classifiers, 5 x (train, sample)
    for cmd in launched:
        assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
        assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv_id=42", "--rdzv_backend=c10d",
                "--rdzv_endpoint=gpu-a:29500"} <= set(cmd)
    runs = [train.build_parser().parse_args(c[c.index("train.py") + 1:]) for c in commands if "train.py" in c]
    assert {(a.global_batch, a.batchsize, a.if_exists) for a in runs} == {(256, 32, "continue")}  # 8 GPUs x 32
    scores = [sample.build_parser().parse_args(c[c.index("sample.py") + 1:]) for c in commands if "sample.py" in c]
    assert all(s.skip_scored for s in scores)


def test_the_slurm_script_stops_the_running_step_and_requeues_before_the_time_limit(tmp_path):
    env, log = fake_slurm(tmp_path)
    step = tmp_path / "step.sh"  # stands for the pipeline: ends when its step is cancelled with SIGTERM
    step.write_text(f"echo $$ > {tmp_path}/step.pid\nsleep 60 & trap 'kill $!; exit 0' TERM\nwait\n")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "slurm.sbatch"), str(step)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "step.pid").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "requeueing" in err, err
    calls = log.read_text().splitlines()
    assert calls[-2:] == ["scancel --signal=TERM 42", "scontrol requeue 42"], calls


def test_a_rerun_of_the_pipeline_keeps_its_finished_classifiers(tmp_path):
    (tmp_path / "prototypes.pt").write_bytes(b"done")  # the first classifier finished before a preemption
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "cifar10.sh"), "--dry-run"], capture_output=True,
                       text=True, env=dict(os.environ, NGPU="1", OUT=str(tmp_path)), cwd=ROOT)
    assert f"# kept {tmp_path}/prototypes.pt" in r.stdout
    classifiers = [line for line in r.stdout.splitlines() if line.startswith("+ ") and "train_classifier.py" in line]
    assert len(classifiers) == 1 and f"--out {tmp_path}/eval_classifier.pt" in classifiers[0]
