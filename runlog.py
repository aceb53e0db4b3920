"""Rank 0's run log (stdout, log.txt, metrics.jsonl, and with --tensorboard the same numbers as TensorBoard events) and
what the training loop watches without a per-step sync: the mean loss, every loss being finite, and the guards that end
training early (a signal, --max_steps, a NaN)."""
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from cli import UserError, append_line
from datasets import read_png
from distributed import Dist, StopSignal


def summary_writer_class() -> type:
    """torch.utils.tensorboard's SummaryWriter; one clear line when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard True needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def scalars(record: dict) -> tuple[dict[str, float], int]:
    """The numbers of a metrics.jsonl record as TensorBoard tags, and the step they belong to (the global step, or
    the epoch where a record has none, as in runs of the original code)."""
    event, step = record.get("event"), record.get("step")
    if event in ("train", "epoch"):
        tags = {f"{event}/{k}": record[k] for k in ("loss", "lr", "img_per_s") if record.get(k) is not None}
    elif event == "fid":
        tags = {f"{record['metric']}/w{record['w']}": record["value"]}
        if isinstance(record.get("class_accuracy"), float):
            tags[f"class_accuracy/w{record['w']}"] = record["class_accuracy"]
    else:
        tags = {}
    return tags, step if step is not None else record.get("epoch", 0)


class Board:
    """RUN/tensorboard: metrics.jsonl's numbers and the sample grids as TensorBoard events (metrics.jsonl stays the
    record); each process that writes has an event file of its own there, flushed at every record."""

    def __init__(self, run_dir: str):
        self.writer = summary_writer_class()(os.path.join(run_dir, "tensorboard"))

    def record(self, fields: dict) -> None:
        tags, step = scalars(fields)
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, step)
        if tags:
            self.writer.flush()

    def grid(self, path: str, step: int) -> None:
        """A sample grid PNG, under `samples`."""
        self.writer.add_image("samples", read_png(path), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """Rank 0's log: lines to stdout and log.txt, records to metrics.jsonl (and TensorBoard); other ranks stay
    silent."""

    def __init__(self, run_dir: str | None, active: bool, tensorboard: bool = False):
        self.run_dir = run_dir
        self.active = active
        self.board = Board(run_dir) if tensorboard and active and run_dir else None

    def line(self, msg: str) -> None:
        if not self.active:
            return
        print(msg, flush=True)
        if self.run_dir:
            append_line(os.path.join(self.run_dir, "log.txt"), f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")

    def record(self, **fields: Any) -> None:
        if self.active and self.run_dir:
            append_line(os.path.join(self.run_dir, "metrics.jsonl"), json.dumps(fields) + "\n")
        if self.board is not None:
            self.board.record(fields)

    def grid(self, path: str, step: int) -> None:
        """A sample grid written at `path`, to TensorBoard."""
        if self.board is not None:
            self.board.grid(path, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class LossMeter:
    """Losses summed on the device, so a step costs no sync; read() syncs once and averages over all ranks."""

    def __init__(self, device: torch.device):
        self.t0, self.sum, self.n = time.time(), torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.n += 1

    def read(self, world: int, batchsize: int) -> tuple[float, float]:
        """(mean loss over the steps and ranks, images per second since the meter started)."""
        mean = self.sum / self.n
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        return mean.item(), self.n * batchsize * world / (time.time() - self.t0)


NO_BAD_STEP = 2 ** 62  # first_bad's value while every loss has been finite


def check_finite(first_bad: torch.Tensor, steps_per_epoch: int, world: int = 1) -> None:
    """Stop every rank with one clear line if any step of any rank so far had a NaN or infinite loss (nothing more
    is saved)."""
    if world > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad = int(first_bad.item())
    if bad != NO_BAD_STEP:
        raise UserError(f"the loss became NaN or infinite at step {bad} (epoch {(bad - 1) // steps_per_epoch + 1}); "
                        "training stopped and the checkpoints on disk are the last good ones (lower --lr?)")


class Guards:
    """What ends training early, checked without a per-step device read: a stop signal on any rank (the same step
    on every rank), --max_steps, and a NaN or infinite loss on any rank (read at log steps and epoch ends)."""

    def __init__(self, stop: StopSignal, max_steps: int, steps_per_epoch: int, d: Dist):
        self.stop, self.max_steps, self.steps_per_epoch, self.world = stop, max_steps, steps_per_epoch, d.world
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.long, device=d.device)  # first non-finite step

    def watch(self, step_loss: torch.Tensor, step: int) -> None:
        """Remember (on the device) the first step whose loss is not finite."""
        self.first_bad = torch.where(torch.isfinite(step_loss), self.first_bad, self.first_bad.clamp(max=step))

    def check_finite(self) -> None:
        check_finite(self.first_bad, self.steps_per_epoch, self.world)

    def stop_reason(self, step: int) -> str | None:
        """Why training stops after this step, the same answer on every rank; None: it goes on. Called every step."""
        if self.stop.poll():
            return self.stop.received or "a signal to another rank"
        return f"--max_steps {self.max_steps}" if step == self.max_steps else None
