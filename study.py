"""A study of the paper's question, "do class prototypes reach a given FID in fewer epochs than a random class
table?" (Baykal et al., ProtoDiffusion, ACML 2023): arms (each a set of train.py flags) x training seeds x
prototype-classifier seeds on one dataset, every run scored at the same epochs with the same sampling seeds by one
evaluation, and a report of paired differences with 95% intervals and the endpoints the study file declares.

    python study.py studies/digits_study3.toml --dry-run True    # every task, its commands and the estimated cost
    python study.py studies/digits_study3.toml                   # here: classifiers, runs side by side, report
    python study.py studies/cifar10.toml --submit True           # SLURM: classifiers, an array, the report after it
    python study.py studies/cifar10.toml --task 3                # one task (what an array task runs)
    python study.py studies/cifar10.toml --task report           # the report of what is scored so far (any time)

Every task is start-or-continue (a finished classifier is kept, a run continues from its newest checkpoint, an
epoch already scored with the same settings is skipped), so the same command, or a requeue, goes on where it
stopped. The study file format and every key: studies/README.md.
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import tomllib

from cli import ANY, Rule, UserError, at_least, check_flags, run_cli, str2bool, write_atomic
from study_cost import estimate
from study_report import write_report
from study_run import Runner, Task, run_parallel, slots

REQUIRED = ("dataset", "out", "epochs", "interval", "train_seeds", "arms", "eval_classifier", "evaluation", "endpoints")


def load_study(path: str, overrides: list[str], arms: list[str] | None) -> dict:
    """The study file with `key=value` overrides (TOML values; dotted keys reach into tables), checked."""
    try:
        with open(path, "rb") as f:
            study = tomllib.load(f)
    except OSError as e:
        raise UserError(f"cannot read the study file {path} ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes key=value (a TOML value, e.g. epochs=200 or early=[1,2,4]); got '{item}'")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word is a string
        *tables, last = key.split(".")
        target = study
        for t in tables:
            target = target.setdefault(t, {})
        target[last] = parsed
    missing = [k for k in REQUIRED if k not in study]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (see studies/README.md)")
    for base in study["endpoints"].get("baselines", []):
        if base not in study["arms"]:
            raise UserError(f"endpoints.baselines names '{base}', which is not an arm ({', '.join(study['arms'])})")
    ends = study["endpoints"]
    if ends.get("pilot_seed") in study["train_seeds"] and not study.get("pilot"):  # pilot = true: the pilot itself
        raise UserError(f"endpoints.pilot_seed {ends['pilot_seed']} is a training seed: the threshold needs another run")
    for c in ends.get("comparisons", []):
        arm, sep, base = c.partition(" - ")
        if not sep or arm not in study["arms"] or base not in study["arms"]:
            raise UserError(f"endpoints.comparisons: '{c}' is not 'ARM - BASELINE' of two arms "
                            f"({', '.join(study['arms'])})")
    if arms:  # a baseline left out has no paired tables
        unknown = [a for a in arms if a not in study["arms"]]
        if unknown:
            raise UserError(f"--arms {', '.join(unknown)}: not an arm of {path} ({', '.join(study['arms'])})")
        study["arms"] = {a: study["arms"][a] for a in arms}
    if not study["train_seeds"] or study["epochs"] < 1 or study["interval"] < 1:
        raise UserError("a study needs train_seeds, epochs >= 1 and interval >= 1")
    if study["eval_classifier"]["seed"] in study.get("classifier_seeds", [0]):
        raise UserError(f"eval_classifier.seed {study['eval_classifier']['seed']} is a prototype classifier's seed: the "
                        "classifier that scores the arms must not be one that made an arm's table")
    compat = study.get("compat", "none")
    if compat != "none":  # every arm as the original code ran it, in a folder of its own
        study["out"] += f"-compat_{compat}"
        study["arms"] = {a: f if "--compat" in f else f"{f} --compat {compat}" for a, f in study["arms"].items()}
    study["path"] = path
    return study


def evaluated_epochs(study: dict) -> list[int]:
    """The saved (and scored) epochs: every `interval`, the early ones below `epochs`, and the last (the saved steps,
    `early_steps`, come on top)."""
    e = study["epochs"]
    return sorted({*range(study["interval"], e + 1, study["interval"]), *(x for x in study.get("early", []) if x < e),
                   e})


def classifier_file(study: dict, name: str, seed: int) -> str:
    return os.path.join(study["out"], "classifiers", f"{name}-c{seed}.pt")


def eval_classifier_file(study: dict) -> str:
    return os.path.join(study["out"], "classifiers", f"eval_classifier-c{study['eval_classifier']['seed']}.pt")


def python(gpus: int) -> list[str]:
    """How a task's program starts: plain python on one device, a single-node torchrun (a free port) on several;
    LAUNCH (scripts/slurm.sbatch: srun + a multi-node torchrun) replaces both."""
    if os.environ.get("LAUNCH"):
        return shlex.split(os.environ["LAUNCH"])
    py = [sys.executable]
    return py if gpus <= 1 else py + ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]


def classifier_tasks(study: dict) -> list[Task]:
    """Each prototype classifier an arm uses, once per classifier seed, and the evaluation classifier (its own
    seed)."""
    common = ["--dataset", study["dataset"], "--data_root", study.get("data_root", "datasets"),
              "--image_size", str(study.get("image_size", -1)), *shlex.split(study.get("data_flags", ""))]
    tasks = []
    for name, flags in study.get("classifiers", {}).items():
        if not any("{" + name + "}" in arm for arm in study["arms"].values()):
            continue
        for c in study.get("classifier_seeds", [0]):
            out = classifier_file(study, name, c)
            tasks.append(Task(f"{name}-c{c}", [python(1) + ["train_classifier.py", *common, *shlex.split(flags),
                                                            "--seed", str(c), "--out", out]], "classifier", out))
    ev = study["eval_classifier"]
    out = eval_classifier_file(study)
    tasks.append(Task(f"eval_classifier-c{ev['seed']}", [python(1) + ["train_classifier.py", *common,
                      *shlex.split(ev.get("flags", "")), "--seed", str(ev["seed"]), "--out", out]], "classifier", out))
    return tasks


def run_tasks(study: dict, gpus: int) -> list[Task]:
    """One task per (arm, training seed[, classifier seed]): train (start-or-continue), then score every saved epoch
    (and with early_steps every saved step), then the real-vs-real floor of the evaluation. An arm whose flags name
    no classifier ({name}) runs once per training seed."""
    ev, out = study["evaluation"], study["out"]
    early = [e for e in study.get("early", []) if e < study["epochs"]]
    steps = study.get("early_steps", [])
    global_batch = study.get("global_batch", 256)
    batch = min(study.get("batchsize", 64), global_batch // gpus)
    tasks = []
    for arm, flags in study["arms"].items():
        uses = [n for n in study.get("classifiers", {}) if "{" + n + "}" in flags]
        for seed in study["train_seeds"]:
            for c in study.get("classifier_seeds", [0]) if uses else [None]:
                name = f"{arm}-s{seed}" + (f"-c{c}" if c is not None else "")
                files = {n: classifier_file(study, n, c) for n in uses}
                run_dir = os.path.join(out, "runs", name)
                train = python(gpus) + [
                    "train.py", "--dataset", study["dataset"], "--data_root", study.get("data_root", "datasets"),
                    "--image_size", str(study.get("image_size", -1)), *shlex.split(study.get("data_flags", "")),
                    *shlex.split(study.get("train", "")), *shlex.split(flags.format(**files)),
                    "--seed", str(seed), "--epoch", str(study["epochs"]), "--interval", str(study["interval"]),
                    "--sample_every", str(study["epochs"]), "--keep_last", str(study.get("keep_last", 2)),
                    "--global_batch", str(global_batch), "--batchsize", str(batch),
                    *(["--save_epochs", ",".join(map(str, early))] if early else []),
                    *(["--save_steps", ",".join(map(str, steps))] if steps else []),
                    "--run_dir", run_dir, "--if_exists", "continue"]
                score = python(gpus) + [
                    "sample.py", "--path", run_dir, "--epoch", "all", *shlex.split(ev.get("sampler", "")),
                    "--w", str(ev.get("w", 1.8)), "--genum", str(ev["images"]), "--seed", str(ev.get("seed", 0)),
                    "--fid", "True", "--fid_features", ev.get("features", "inception"),
                    "--eval_classifier", eval_classifier_file(study), "--per_class", str(ev.get("per_class", False)),
                    "--data_root", study.get("data_root", "datasets"), "--png", "False", "--skip_scored", "True"]
                tasks.append(Task(name, [train, score] + ([score + ["--step", "all"]] if steps else []) +
                                  [score + ["--real", ev.get("floor_split", "test")]], "run", None, arm, seed, c,
                                  run_dir))
    return tasks


def reference_marker(study: dict) -> str:
    """The file that names the evaluation's reference statistics once they are made (one per feature space)."""
    ev = study["evaluation"]
    per_class = "-per_class" if ev.get("per_class", False) else ""
    return os.path.join(study["out"], "classifiers", f"reference-{ev.get('features', 'inception')}{per_class}.txt")


def reference_task(study: dict, argv: list[str]) -> Task:
    """The evaluation's reference statistics, computed once after the classifiers (in their SLURM job, with its own
    time limit), so that no run's scoring starts them over at every requeue."""
    return Task("reference", [[sys.executable, "study.py", *argv, "--task", "reference"]], "classifier",
                reference_marker(study))


def make_reference(study: dict) -> str:
    """Compute and cache the reference statistics sample.py will read (evaluate.reference_path names the file)."""
    import torch
    from datasets import load_dataset
    from evaluate import Scoring, classifier_for, reference_path
    ev, root = study["evaluation"], study.get("data_root", "datasets")
    tiny = shlex.split(study.get("data_flags", ""))
    tiny = tiny[tiny.index("--tiny_imagenet_path") + 1] if "--tiny_imagenet_path" in tiny else None
    crop = "--crop False" not in " ".join(shlex.split(study.get("data_flags", "")))
    data = load_dataset(study["dataset"], "all", root, study.get("image_size", -1), False, tiny, crop=crop)
    cfg = {"dataset": study["dataset"], "image_size": data.size, "num_classes": len(data.classes),
           "classes": data.classes, "tiny_imagenet_path": tiny, "crop": crop}
    clf_file = eval_classifier_file(study)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = reference_path(cfg, ev.get("features", "inception"), root, clf_file)
    Scoring(ev.get("features", "inception"), path, root, classifier_for(clf_file).to(device), clf_file,
            per_class=ev.get("per_class", False)).reference_stats(cfg, device, 0, 1)
    write_atomic(reference_marker(study), lambda f: f.write(f"{path}\n".encode()))
    return path


def again(args: argparse.Namespace) -> list[str]:
    """study.py's arguments that name this study (file, overrides, arms), for the commands it starts."""
    return [args.study, *(["--set", *args.set] if args.set else []), *(["--arms", ",".join(args.arms)]
                                                                       if args.arms else [])]


def submit(args: argparse.Namespace, study: dict, n_runs: int) -> None:
    """Three sbatch calls: the classifiers, the array of runs after them, the report after the array."""
    slurm = study.get("slurm", {})
    logs = os.path.join(study["out"], "slurm")
    common = ["sbatch", "--parsable", f"--cpus-per-task={slurm.get('cpus_per_task', 8)}",
              *shlex.split(slurm.get("sbatch", "")), *shlex.split(args.sbatch)]
    gres = [f"--gres=gpu:{study.get('gpus_per_task', 1)}"] if slurm.get("gpus", True) else []
    name = slurm.get("job_name", os.path.basename(study["out"]))
    jobs = [("classifiers", [f"--job-name={name}-classifiers", f"--output={logs}/%x-%j.out",
                             f"--time={slurm.get('classifier_time', '04:00:00')}", *gres], ["--task", "classifiers"]),
            ("runs", [f"--job-name={name}-runs", f"--output={logs}/%x-%A_%a.out", f"--time={slurm.get('time', '24:00:00')}",
                      f"--array=0-{n_runs - 1}" + (f"%{slurm['max_parallel']}" if "max_parallel" in slurm else ""),
                      *gres], ["--task", "array"]),
            ("report", [f"--job-name={name}-report", f"--output={logs}/%x-%j.out",
                        f"--time={slurm.get('report_time', '04:00:00')}", *gres], ["--task", "finish"])]
    if not args.dry_run:
        os.makedirs(logs, exist_ok=True)  # SLURM does not create the folder of --output
    previous = None
    for what, flags, task in jobs:
        after = [f"--dependency={'afterok' if what == 'runs' else 'afterany'}:{previous}"] if previous else []
        cmd = common + flags + after + ["scripts/study.sbatch", *again(args), *task]
        if args.dry_run:
            print("+ " + shlex.join(cmd))
            previous = f"JOB_{what.upper()}"
            continue
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"sbatch refused the {what} job: {r.stderr.strip() or r.stdout.strip()}")
        previous = r.stdout.strip().split(";")[0]
        print(f"{what}: job {previous}", flush=True)


FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    "task": Rule(lambda v: v is None or v in ("classifiers", "reference", "array", "finish", "report") or
                 str(v).isdigit(), "classifiers, reference, array, finish, report or a task number", "bogus"),
    "jobs": at_least(0), "gpus_per_task": Rule(lambda v: v is None or v >= 1, "at least 1", "0"),
    **{flag: ANY for flag in ("study", "set", "arms", "dry_run", "submit", "sbatch")},
}


def main(args: argparse.Namespace) -> None:
    check_flags(args, FLAG_RULES)
    study = load_study(args.study, args.set, args.arms)
    gpus = args.gpus_per_task or study.get("gpus_per_task", 1)
    args.jobs = args.jobs or study.get("jobs", 0)
    if os.environ.get("LAUNCH"):  # one job on all its nodes (scripts/slurm.sbatch): NGPU processes per run
        gpus = int(os.environ.get("NGPU", "1"))
    study["gpus_per_task"] = gpus
    classifiers, runs = classifier_tasks(study), run_tasks(study, gpus)
    if args.submit:
        return submit(args, study, len(runs))
    if args.dry_run:
        print(f"# study {args.study}: {len(study['arms'])} arms x {len(study['train_seeds'])} training seeds "
              f"x {len(study.get('classifier_seeds', [0]))} classifier seeds -> {len(runs)} runs; scored epochs "
              f"{','.join(map(str, evaluated_epochs(study)))}" +
              (f", scored steps {','.join(map(str, study['early_steps']))}" if study.get("early_steps") else ""))
        print(estimate(study, len(runs), len(evaluated_epochs(study)) + len(study.get("early_steps", []))))
        prepare = classifiers + [reference_task(study, again(args))]
        for i, task in enumerate(prepare + runs):
            label = f"task {i - len(prepare)}" if task.kind == "run" else "classifiers"
            kept = task.done_file and os.path.isfile(task.done_file)
            print(f"# {label} {task.name}" + (" (kept)" if kept else ""))
            for cmd in task.commands:
                print("+ " + shlex.join(cmd))
        return
    runner = Runner(os.path.join(study["out"], "logs"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, runner.forward)
    if args.task == "reference":
        return print(f"reference statistics -> {make_reference(study)}", flush=True)
    task = os.environ.get("SLURM_ARRAY_TASK_ID") if args.task == "array" else args.task
    if task is None and args.task == "array":
        raise UserError("--task array reads SLURM_ARRAY_TASK_ID, which is not set (give the task number instead)")
    if task not in (None, "classifiers", "finish", "report"):
        if int(task) >= len(runs):
            raise UserError(f"--task {task}: the study has tasks 0-{len(runs) - 1}")
        outcomes = {runs[int(task)].name: runner.run(runs[int(task)], slots(1, gpus)[0])}
    else:
        outcomes = {}
        if task in (None, "classifiers"):
            outcomes |= run_parallel(runner, classifiers, slots(args.jobs, 1))
            if all(o in ("done", "kept") for o in outcomes.values()):
                outcomes["reference"] = runner.run(reference_task(study, again(args)))
        if task is None and all(o in ("done", "kept") for o in outcomes.values()):
            outcomes |= run_parallel(runner, runs, slots(args.jobs, gpus))
        if task == "finish":  # the dependent task: score what a stopped or failed task left unscored
            outcomes |= run_parallel(runner, [Task(t.name, t.commands[1:], "run") for t in runs
                                              if os.path.isfile(os.path.join(t.run_dir, "config.json"))],
                                     slots(args.jobs, gpus))
    if runner.stopped:
        print(f"study: stopped by {runner.stopped}; the same command continues", file=sys.stderr, flush=True)
        sys.exit(143 if runner.stopped == "SIGTERM" else 130)
    if task in (None, "finish", "report"):
        print(write_report(study, runs, eval_classifier_file(study)), flush=True)
    failed = {n: o for n, o in outcomes.items() if o.startswith("failed")}
    if failed:
        name, why = next(iter(failed.items()))
        raise UserError(f"{len(failed)} task(s) failed, first {name}: {why}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a study (arms x seeds, one evaluation, a report with paired "
                                "intervals) here, as one SLURM task, or as a SLURM job array.")
    p.add_argument("study", help="the study file (TOML; studies/README.md)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a key of the study file, e.g. --set epochs=200 --set evaluation.images=5000")
    p.add_argument("--arms", type=lambda s: s.split(","), default=None, help="run only these arms (a comma list)")
    p.add_argument("--task", default=None, help="run one task: classifiers (and then the reference statistics), "
                   "reference, a run's number (see --dry-run), array (the number in SLURM_ARRAY_TASK_ID), finish (score "
                   "what stopped tasks left, then the report) or report (the report alone, at any time); default: all")
    p.add_argument("--jobs", type=int, default=0, help="tasks side by side here (0: one per --gpus_per_task GPUs, "
                   "one on a CPU)")
    p.add_argument("--gpus_per_task", type=int, default=None, help="GPUs of each run (default: the study's "
                   "gpus_per_task, 1): a torchrun of that many processes at the study's global batch")
    p.add_argument("--dry_run", "--dry-run", type=str2bool, nargs="?", const=True, default=False,
                   help="print every task's commands and the estimate, run nothing")
    p.add_argument("--submit", type=str2bool, default=False, help="submit the study to SLURM (sbatch): the classifiers, "
                   "an array of one task per run after them, and the report after the array")
    p.add_argument("--sbatch", default="", help="more sbatch options for every job, e.g. --sbatch='--partition=gpu --account=X'")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
