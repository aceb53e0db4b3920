"""Exponential moving average of a module's parameters, with the usual warm-up of the decay."""
import copy

import torch
from torch import nn


class EMA:
    """Shadow copy updated as p_ema <- p_ema + (1 - d)(p - p_ema), d = min(decay, (1 + n) / (10 + n)).

    The warm-up keeps early averages from being dominated by the random initialisation; one fused
    foreach lerp per step avoids a kernel launch per tensor.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def decay_now(self) -> float:
        """The decay the next update will use."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards `model`'s current weights."""
        weight = 1 - self.decay_now()
        shadow = [p for p in self.module.parameters() if p.is_floating_point()]
        live = [p.detach() for p in model.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(shadow, live, weight)
        self.updates += 1
