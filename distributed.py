"""The torchrun job: joining it, each process's device, agreements between ranks, per-rank seeds, stop signals."""
import os
import random
import signal
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError, count_failures_in


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


def setup_distributed(device: str = "auto", backend: str = "auto") -> Dist:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU, or `backend`); LOCAL_RANK picks the GPU
    (modulo the GPUs visible, so that a gloo job can put two ranks on one card)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise UserError(f"unknown --device '{device}' (choose auto, cuda or cpu)")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("--dist_backend nccl needs CUDA devices; use gloo on CPU")
    control = None
    if world > 1 and not dist.is_initialized():
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        count_failures_in(dist.PrefixStore("protodiffusion/", store))
        # stop flags and agreements travel on their own CPU group: no GPU sync, and never queued behind DDP
        control = dist.new_group(backend="gloo")
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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (cluster preemption) so that training can stop at a step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, world: int = 1, group: Any = None):
        self.received: str | None = None
        self.world, self.group = world, group
        self.flag, self.pending = torch.zeros(1), None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

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
        """Finish the all-reduce in flight (every rank started it) and put the previous handlers back."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)

