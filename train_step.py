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
        """Call it under self.fast.autocast (TrainStep does): autocast stays outside the compiled graph, as on CPU."""
        x0 = self.pixels.encode(images_u8)
        if self.fast.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cond = drop_condition(self.models["cemblayer"](labels), self.threshold)
        return self.diffusion.train_loss(self.models["net"], x0, cond)


# A compiled DDP loss as one graph: dynamo's DDPOptimizer would cut it at every DDP bucket (about six graphs for the
# paper's UNet at the 25 MB default, fused apart) so that all-reduce overlaps backward; for 28 M parameters one
# all-reduce after backward costs little next to the fusion it blocks (PyTorch's torch._dynamo.config.optimize_ddp)
ONE_DDP_GRAPH = True


def wrap_ddp(loss: DiffusionLoss, d: Dist | None) -> nn.Module:
    """One DistributedDataParallel around the whole loss in a torchrun job, of one process too (both models'
    gradients are all-reduced during backward); the loss itself in a plain process.

    Gradients are views into DDP's buckets (no copy per step: 4-5% faster on 2 gloo ranks, docs/performance.md);
    the 25 MB buckets and a dynamic graph stay DDP's defaults, which measured no different there."""
    if d is None or d.control is None:
        return loss
    return DDP(loss, device_ids=[d.device.index] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)


def compile_loss(loss: DiffusionLoss, ddp_loss: nn.Module, d: Dist | None, example: tuple[torch.Tensor, torch.Tensor],
                 say: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """torch.compile around the DDP-wrapped loss, proven on `example` (a batch of the training shape); returns the
    module to call and the compile's outcome record.

    DDP goes inside torch.compile, the order PyTorch documents for the two together, as one graph (ONE_DDP_GRAPH;
    gradients stay views into DDP's buckets). The probe runs forward and
    backward under DDP's no_sync, so that it runs no collective that a rank whose compile failed would not join;
    the ranks then agree, and if any failed, every rank goes on eager with a fresh DDP around the plain loss.
    """
    fast, several, device = loss.fast, ddp_loss is not loss, example[0].device
    if several:
        torch._dynamo.config.optimize_ddp = not ONE_DDP_GRAPH

    def probe(m: nn.Module) -> None:
        with ddp_loss.no_sync() if several else nullcontext():
            with fast.autocast(device):
                out = m(*example)
            out.backward()
    net = loss.models["net"]
    regions = [*net.downblocks, net.middleblocks, *net.upblocks] if fast.compile_scope == "regional" else None
    compiled, outcome = compile_or_eager(ddp_loss, probe, device, say, fast.compile_mode, "loss",
                                         d.control if several else None, regions)
    return (compiled if outcome["compiled"] else wrap_ddp(loss, d)), outcome


def make_loss(models: nn.ModuleDict, diffusion: GaussianDiffusion, threshold: float, fast: FastPath,
              example: tuple[torch.Tensor, torch.Tensor], say: Callable[[str], None], d: Dist | None = None,
              pixels: Pixels = Pixels()) -> tuple[nn.Module, dict | None]:
    """The loss train.py calls: DiffusionLoss, wrapped in DDP in a job, then compiled when fast.compile asks;
    returns it with the compile's outcome record (None when no compile was asked for)."""
    loss = DiffusionLoss(models, diffusion, threshold, fast, pixels)
    ddp_loss = wrap_ddp(loss, d)
    return compile_loss(loss, ddp_loss, d, example, say) if fast.compile else (ddp_loss, None)


class TrainStep:
    """One optimisation step: loss and backward over the rank's micro-batches, optimizer (through the scaler), EMA;
    returns the detached mean loss.

    With `micro` > 1 the rank's share of the global batch is cut into that many equal micro-batches whose
    gradients add up (each loss divided by `micro`), and DDP all-reduces only during the last one's backward, so the
    update equals that of one micro-batch per process on micro x as many processes.
    """

    def __init__(self, loss: nn.Module, models: nn.ModuleDict, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: EMA, fast: FastPath, micro: int = 1):
        self.loss, self.models, self.optimizer, self.scaler, self.ema = loss, models, optimizer, scaler, ema
        self.fast, self.micro = fast, micro
        ddp = getattr(loss, "_orig_mod", loss)  # torch.compile's wrapper keeps the DDP module it compiled
        self.ddp = isinstance(ddp, DDP)
        self.no_sync = ddp.no_sync if self.ddp else nullcontext

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # DDP's gradients are views into its buckets: zeroed in place, backward adds into them with no copy. One
        # process sets them to None: backward then hands over its own output, nothing reads the old gradients
        self.optimizer.zero_grad(set_to_none=not self.ddp)
        total = None
        for k, (x, y) in enumerate(zip(images_u8.chunk(self.micro), labels.chunk(self.micro))):
            if self.fast.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous graph outputs may be overwritten now
            with self.no_sync() if k < self.micro - 1 else nullcontext():
                with self.fast.autocast(x.device):  # mixed precision for the forward pass only
                    loss = self.loss(x, y)
                self.scaler.scale(loss / self.micro if self.micro > 1 else loss).backward()
            if self.fast.cudagraphs and not self.ddp and k < self.micro - 1:
                for p in self.models.parameters():  # out of the graph's memory, which the next micro-batch reuses
                    if p.grad is not None:
                        p.grad = p.grad.clone()
            loss = loss.detach().clone() if self.fast.cudagraphs else loss.detach()
            total = loss if total is None else total + loss
        self.scaler.step(self.optimizer)  # fp16 only: the scaler's inf check reads the device here
        self.scaler.update()
        self.ema.update(self.models)
        return total / self.micro if self.micro > 1 else total
