"""The learning-rate schedule of ProtoDiffusion's training code: a linear warm-up to lr x multiplier over the first
twentieth of the epochs, then a cosine to zero, stepped once per epoch; and its continuation when a resumed run is
given a new total of epochs."""
import math
import warnings
from typing import Callable

import torch


def make_lr_schedule(optimizer: torch.optim.Optimizer, epochs: int, multiplier: float, original: bool = False):
    """Per epoch: linear warm-up from lr to lr*multiplier over max(1, epochs//20) epochs, then cosine to 0.

    The optimizer's lr must already be the peak (lr * multiplier). The original's GradualWarmupScheduler
    fell back to the base lr after warm-up; we keep the peak, as its own docstring intended. `original` restores
    its trajectory: epoch e <= W = epochs//20 runs at lr (1 + (multiplier - 1) e / W), every later epoch at
    lr (1 + cos(pi (e - W - 1) / epochs)) / 2, a cosine over all epochs restarted from the base lr.
    """
    warm = max(1, epochs // 20)
    if original:
        def factor(e: int) -> float:  # of the peak lr the optimizer holds
            if e <= warm:
                return (1 + (multiplier - 1) * e / warm) / multiplier
            return (1 + math.cos(math.pi * (e - warm - 1) / epochs)) / 2 / multiplier
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / multiplier, end_factor=1.0,
                                               total_iters=warm)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warm), eta_min=0.0)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warm])


def continued_schedule(optimizer: torch.optim.Optimizer, epochs: int, multiplier: float, original: bool,
                       start_epoch: int, old_total: int, say: Callable[[str], None]):
    """A resumed run given a new --epoch: the schedule of a run of that many epochs, at start_epoch. Its warm-up
    (epochs // 20) and cosine follow the new total, so the lr steps from the old schedule's value to the new one's."""
    before = optimizer.param_groups[0]["lr"]
    schedule = make_lr_schedule(optimizer, epochs, multiplier, original)
    with warnings.catch_warnings():  # stepping without optimizer steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start_epoch):
            schedule.step()
    say(f"--epoch {old_total} -> {epochs}: the LR schedule is now that of {epochs} epochs; at epoch "
        f"{start_epoch + 1} the lr goes from {before:.4g} to {optimizer.param_groups[0]['lr']:.4g}")
    return schedule
