"""Where a study's tasks run: each a child process (or several, one after another) with its log, in slots of
their own (GPUs through CUDA_VISIBLE_DEVICES, or a share of the CPU threads), a stop signal passed on to every
running child (train.py then checkpoints) and no task started after it."""
import os
import shlex
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cli import UserError


@dataclass
class Task:
    """One unit of work: a name, the commands it runs one after another, and what marks it finished."""
    name: str
    commands: list[list[str]]
    kind: str  # classifier, run
    done_file: str | None = None  # a classifier's output: kept when it exists
    arm: str = ""
    seed: int = 0
    classifier_seed: int | None = None
    run_dir: str = ""


class Runner:
    """Runs tasks as child processes; SIGTERM or SIGINT stops them (train.py checkpoints) and starts no more."""

    def __init__(self, logs: str):
        self.logs, self.stopped, self.children, self.lock = logs, None, set(), threading.Lock()

    def forward(self, signum: int, _frame) -> None:
        self.stopped = signal.Signals(signum).name
        with self.lock:
            for child in self.children:
                child.send_signal(signum)

    def run(self, task: Task, env: dict | None = None) -> str:
        """'done', 'kept', 'stopped' or 'failed (log)' for one task, its commands one after another."""
        if task.done_file and os.path.isfile(task.done_file):
            return "kept"
        os.makedirs(self.logs, exist_ok=True)
        log_path = os.path.join(self.logs, f"{task.name}.log")
        for cmd in task.commands:
            with self.lock:
                if self.stopped:
                    return "stopped"
                with open(log_path, "a") as log:
                    log.write(f"+ {shlex.join(cmd)}\n")
                    log.flush()
                    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, **(env or {})})
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
            if self.stopped:
                return "stopped"
            if code:
                return f"failed (exit {code}; {log_path})"
        return "done"


def slots(jobs: int, gpus: int) -> list[dict]:
    """The environment of each parallel slot: its GPUs (CUDA_VISIBLE_DEVICES), or its share of the CPU threads."""
    if os.environ.get("LAUNCH"):  # every run on all the job's GPUs, one after another
        return [{}]
    import torch  # only here: a dry run and a report need no torch
    visible = torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES
    if visible:
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible)))).split(",")[:visible]
        count = jobs or visible // gpus
        if count * gpus > visible:
            raise UserError(f"--jobs {count} x {gpus} GPUs per task needs {count * gpus} GPUs; {visible} are visible")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[j * gpus:(j + 1) * gpus])} for j in range(count)]
    count = jobs or 1
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or (  # the job's share of the node, not all its cores
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    threads = max(1, cpus // count)
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(count)]


def run_parallel(runner: Runner, tasks: list[Task], envs: list[dict]) -> dict:
    """Each task in the first free slot; {task name: outcome}."""
    free = list(envs)
    lock = threading.Lock()

    def one(task: Task) -> tuple[str, str]:
        with lock:
            env = free.pop()
        start = time.time()
        try:
            outcome = runner.run(task, env)
        finally:
            with lock:
                free.append(env)
        print(f"{task.name}: {outcome} ({time.time() - start:.0f} s)", flush=True)
        return task.name, outcome

    with ThreadPoolExecutor(len(envs)) as pool:
        return dict(pool.map(one, tasks))
