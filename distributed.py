"""The torchrun job: joining it, each process's device, agreements between ranks, per-rank seeds, stop signals."""
import datetime
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError, count_failures_in

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the job."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any = None  # the gloo group for CPU-side flags and agreements (None: one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", backend: str = "auto", timeout_min: float = 30.0) -> Dist:
    """Join the torchrun job if there is one, even of one process (NCCL on CUDA, gloo on CPU, or `backend`);
    LOCAL_RANK picks the GPU.

    Under gloo, ranks beyond the visible GPUs share them (LOCAL_RANK modulo the count: a one-GPU machine can run a
    2-rank check); NCCL refuses two ranks on one card, so there it is one error line. `timeout_min` bounds every
    collective: it must outlast the longest work one rank does while the others wait (rank 0's sample grids,
    checkpoint writes and compile-cache saves).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise UserError(f"unknown --device '{device}' (choose auto, cuda or cpu)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise UserError("--dist_backend nccl needs CUDA devices; use gloo on CPU")
    dev = torch.device("cpu")
    if device == "cuda":
        gpus, local_world = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if backend == "nccl" and max(local_world, local_rank + 1) > gpus:
            raise UserError(f"{max(local_world, local_rank + 1)} processes on this node but {gpus} visible GPU(s): "
                            "NCCL needs one GPU per process (--nproc_per_node at most the GPU count, or "
                            "--dist_backend gloo to share cards)")
        dev = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(dev)
    control = None
    # a torchrun job of one process joins a process group too, so that its model is wrapped in DDP as in a larger
    # job (NCCL's and DDP's path on a one-GPU machine, as nanoGPT does); plain `python train.py` makes none
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        store, rank, world = next(dist.rendezvous("env://"))
        # torchrun's store outlives an elastic restart: each attempt's keys (the process groups' addresses, the
        # failure count) go under a prefix of their own, or a restarted rank would read a dead peer's address
        store = dist.PrefixStore(f"protodiffusion/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        timeout = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=dev if backend == "nccl" else None)
        count_failures_in(store)  # so the restarted job's first failure speaks too
        # stop flags and agreements travel on their own CPU group: no GPU sync, and never queued behind DDP
        control = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, world, local_rank, dev, control)


def teardown_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
    count_failures_in(None)


def first_rank_failure(reason: str | None, group: Any = None) -> str | None:
    """Every rank of `group`'s answer to "did any rank fail?": None if none did, else the lowest failing rank's
    reason (group None: this process's own reason, no collective)."""
    if group is None:
        return reason
    reasons = [None] * dist.get_world_size(group)
    dist.all_gather_object(reasons, reason, group=group)
    return next((f"rank {rank}: {r}" for rank, r in enumerate(reasons) if r is not None), None)


def any_rank(flag: bool, group: Any = None) -> bool:
    """Whether `flag` holds on any rank of `group` (group None: on this process)."""
    return first_rank_failure("yes" if flag else None, group) is not None


class AgreedFailure(UserError):
    """A failure that every rank of a job raises together: the first failing rank and why."""


def run_agreed(work: Callable[[], T], group: Any = None) -> T:
    """work() on every rank of `group`, then the ranks agree: if it raised on any of them, every rank raises
    AgreedFailure naming the lowest failing rank and why, so that no rank enters a collective that another will
    miss (group None: work() alone, its own exception unchanged)."""
    if group is None:
        return work()
    result, reason = None, None
    try:
        result = work()
    except Exception as e:
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    failure = first_rank_failure(reason, group)
    if failure is not None:
        raise AgreedFailure(failure)
    return result


def main_rank_first(work: Callable[[], T], d: Dist) -> T:
    """work() on rank 0 first (a download writes the dataset once), then on the other ranks, which read what it
    wrote; a failure on any rank reaches every rank (run_agreed), none waits for a rank that failed."""
    first = run_agreed(lambda: work() if d.is_main else None, d.control)
    return run_agreed(lambda: first if d.is_main else work(), d.control)


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's value of obj on every rank (of `group`, default all)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (cluster preemption) and SIGINT (Ctrl-C) so that training can stop at a step
    boundary with a checkpoint; a second signal, a few seconds after the first, ends the process at once, even when
    it is blocked in a collective."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    # a signal sent to the job twice at once counts once: torchrun forwarding what SLURM also sent, or the SIGINT
    # a terminal sends to the whole foreground group (torchrun and its workers) that torchrun then forwards
    REPEAT_S = 2.0

    def __init__(self, world: int = 1, group: Any = None):
        self.received: str | None = None
        self.world, self.group = world, group
        self.flag, self.pending = torch.zeros(1), None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        # Python runs handlers only between bytecodes of the main thread, never while it waits inside a collective;
        # the wakeup fd is written by the C-level handler, so a thread reading it sees every signal regardless
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd)
        threading.Thread(target=self._watch, daemon=True).start()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def _watch(self) -> None:
        first = None
        while data := os.read(self.read_fd, 64):
            for signum in (s for s in data if s in self.SIGNALS):
                if first is None:
                    first = time.monotonic()
                elif time.monotonic() - first > self.REPEAT_S:
                    print(f"second {signal.Signals(signum).name}: exiting now, without a checkpoint", file=sys.stderr,
                          flush=True)
                    os._exit(128 + signum)
        os.close(self.read_fd)

    def poll(self) -> bool:
        """Called once per step by every rank: True on every rank at the same step, once any rank has a signal.

        Several processes: each call reads the all-reduce that the previous call started and starts the next one,
        on the CPU group, so no step waits for the network or reads the GPU; a signal is acted on one step after
        the step it arrived in, on every rank.
        """
        if self.world == 1:
            return self.received is not None
        stop = False
        if self.pending is not None:
            self.pending.wait()
            stop = bool(self.flag.item())
        if not stop:
            self.flag = torch.tensor([1 if self.received else 0])
            self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        else:
            self.pending = None
        return stop

    def restore(self) -> None:
        """Finish the all-reduce in flight (every rank started it), put the previous handlers back and end the
        watching thread."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self.previous_fd)
        os.close(self.write_fd)  # the watching thread reads the end of the pipe and returns
