"""The training step of the diffusion model, shared by train.py and bench.py so that the benchmark times the product.

`DiffusionLoss` is everything that runs on a batch before backward (uint8 -> [-1, 1], class-embedding MLP, CFG
label drop, timesteps, noise, q_sample, UNet, eps-MSE) as one module, so that one torch.compile graph and one DDP
wrapper cover all of it. `TrainStep` adds backward, the optimizer (through the GradScaler), and EMA, and never
reads a device value, so the CPU can queue step n+1 while the GPU runs step n.
"""
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from datasets import Pixels
from diffusion import GaussianDiffusion, drop_condition
from ema import EMA
from distributed import Dist
from speed import FastPath, compile_or_eager


class DiffusionLoss(nn.Module):
    """(uint8 images [B, C, H, W], labels [B]) -> the eps-MSE loss of one batch, with CFG label dropout."""

    def __init__(self, models: nn.ModuleDict, diffusion: GaussianDiffusion, threshold: float, fast: FastPath,
                 pixels: Pixels = Pixels()):
        super().__init__()
        self.pixels = pixels  # uint8 -> the model's floats ([-1, 1], or the original's STL10 normalisation)
        self.models = models  # "net" (the UNet) and "cemblayer" (the class table + MLP)
        self.diffusion = diffusion
        self.threshold = threshold
        self.fast = fast

    def forward(self, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x0 = self.pixels.encode(images_u8)
        if self.fast.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with self.fast.autocast(x0.device):
            cond = drop_condition(self.models["cemblayer"](labels), self.threshold)
            return self.diffusion.train_loss(self.models["net"], x0, cond)


def make_loss(models: nn.ModuleDict, diffusion: GaussianDiffusion, threshold: float, fast: FastPath,
              device: torch.device, example: tuple[torch.Tensor, torch.Tensor], say: Callable[[str], None],
              d: Dist | None = None, pixels: Pixels = Pixels()) -> tuple[nn.Module, dict | None]:
    """DiffusionLoss, wrapped in DDP when the job has several processes, then compiled when fast.compile asks;
    returns it with the compile's outcome record (None when no compile was asked for).

    DDP goes inside torch.compile, the order PyTorch documents for the two together: dynamo then splits the graph
    at DDP's bucket boundaries, so gradient all-reduce overlaps the rest of backward. The compile is proven on
    `example` (a batch of the training shape) before training starts, forward and backward under DDP's no_sync, so
    that the probe runs no collective that a rank whose compile failed would not join; the ranks then agree, and if
    any failed, every rank goes on eager with a fresh DDP around the plain module.
    """
    plain = DiffusionLoss(models, diffusion, threshold, fast, pixels)
    several = d is not None and d.world > 1

    def wrap() -> nn.Module:
        return DDP(plain, device_ids=[device.index] if device.type == "cuda" else None) if several else plain

    loss = wrap()
    if not fast.compile:
        return loss, None

    def probe(m: nn.Module) -> None:
        with loss.no_sync() if several else nullcontext():
            m(*example).backward()
    net = models["net"]
    regions = [*net.downblocks, net.middleblocks, *net.upblocks] if fast.compile_scope == "regional" else None
    compiled, outcome = compile_or_eager(loss, probe, device, say, fast.compile_mode, "loss",
                                         d.control if several else None, regions)
    return (compiled if outcome["compiled"] else wrap()), outcome


class TrainStep:
    """One optimisation step: loss, backward, optimizer (through the scaler), EMA; returns the detached loss."""

    def __init__(self, loss: nn.Module, models: nn.ModuleDict, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: EMA, cudagraphs: bool = False):
        self.loss, self.models, self.optimizer, self.scaler, self.ema = loss, models, optimizer, scaler, ema
        self.cudagraphs = cudagraphs

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten now
        loss = self.loss(images_u8, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # fp16 only: the scaler's inf check reads the device here
        self.scaler.update()
        self.ema.update(self.models)
        return loss.detach().clone() if self.cudagraphs else loss.detach()
