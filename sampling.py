"""Draw images from a model: the sampler (DDIM or DDPM, guidance, precision, the compiled network), per-image seeds,
PNGs written while the device samples on, and class grids.

Image i's noise comes from seed `seed + i` alone (noise.ImageNoise, drawn on the sampling device), so the images
do not depend on the batch size or on the number of processes. PNGs are encoded in a thread pool while the device
samples the next batch. Used by sample.py, train.py (EMA grids) and evaluate.py (the images it scores).
"""
import argparse
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from cli import UserError
from datasets import Pixels, class_grid_labels, save_grid, save_png
from diffusion import GaussianDiffusion, GuidedStep, ddim_timesteps, ddim_update, ddpm_update
from noise import ImageNoise, PhiloxNormals, normals, normals_inputs
from speed import FastPath, compile_or_eager


@dataclass
class Sampler:
    """How images are drawn: DDIM (steps, eta, timestep selection) or T-step DDPM, guidance w, images per forward
    pass, the base seed, and the speed settings of the forward passes (precision, compile)."""
    ddim: bool
    num_steps: int
    eta: float
    select: str
    w: float
    batch: int
    seed: int
    fast: FastPath | None = None
    normals: Callable[..., torch.Tensor] = normals  # computes per-image noise; compiled by prepare() with --compile
    pixels: Pixels = Pixels()  # samples -> uint8 (PNGs, grids and the FID features all read these)

    @classmethod
    def from_args(cls, args: argparse.Namespace, w: float | None = None, fast: FastPath | None = None,
                  pixels: Pixels = Pixels()) -> "Sampler":
        """The sampler the flags describe (--ddim --num_steps --eta --select --w --genbatch --seed)."""
        return cls(args.ddim, args.num_steps, args.eta, args.select, args.w if w is None else w, args.genbatch,
                   args.seed, fast, pixels=pixels)

    @property
    def fixed_batch(self) -> bool:
        """A compiled network sees one batch shape: the last chunk is padded and its extra images dropped."""
        return self.fast is not None and self.fast.compile

    def steps(self, T: int) -> int:
        """Network evaluations per image (each a guided pair); repeated DDIM timesteps are skipped."""
        return len(set(ddim_timesteps(T, self.num_steps, self.select))) if self.ddim else T

    def name(self, T: int) -> str:
        return f"DDIM-{self.num_steps} ({self.select}, eta {self.eta})" if self.ddim else f"DDPM-{T}"

    def precision(self, device: torch.device):
        """Autocast for the forward passes, as the run's --amp asks."""
        return self.fast.autocast(device) if self.fast is not None else nullcontext()

    def prepare(self, net: nn.Module, image_shape: tuple[int, int, int], cdim: int, device: torch.device,
                say: Callable[[str], None], record: Callable[[dict], None] = lambda outcome: None) -> nn.Module:
        """The sampler's step (diffusion.GuidedStep: the guided network and the update, one module): eager, or with
        --compile a stand-in that compiles it at its first call, once, for the sampler's fixed batch (behind the
        probe, eager if that fails; `record` gets the outcome). One graph serves every step, batch, grid and FID of
        a run: the step's numbers are tensor inputs.

        The outcome is this rank's own: sampling runs no collective, and grids are drawn by rank 0 alone."""
        step = GuidedStep(net, ddim_update if self.ddim else ddpm_update)
        if not self.fixed_batch:
            return step
        rows = self.batch if self.w == 0 else 2 * self.batch  # CFG runs both halves as one 2B batch
        noisy = not self.ddim or self.eta > 0  # steps with noise and the last one without: two graphs

        def probe(m: nn.Module) -> torch.Tensor:  # inputs made as the samplers make theirs: inference tensors
            with torch.inference_mode(), self.precision(device):
                x = torch.zeros((self.batch,) + tuple(image_shape), device=device)
                t = torch.zeros(self.batch, dtype=torch.long, device=device)
                cond = torch.zeros(rows, cdim, device=device)
                guidance = None if self.w == 0 else torch.ones(2, device=device)
                coef = torch.ones(5 if self.ddim else 3, device=device)
                for noise in ((x, None) if noisy else (None,)):
                    out = m(x, t, cond, guidance, coef, noise)
                return out

        def compile_now() -> nn.Module:
            compiled, outcome = compile_or_eager(step, probe, device, say, self.fast.compile_mode, "sampling step")
            record(outcome)
            return compiled

        def compile_noise() -> nn.Module:
            n = math.prod(image_shape)
            with torch.inference_mode(False):  # the first draw may run under inference mode; generate's keys do not
                key = ImageNoise(list(range(self.batch)), device).key
            def probe_noise(m: nn.Module) -> torch.Tensor:  # as the samplers draw: under inference mode
                with torch.inference_mode():
                    return m(*normals_inputs(n, 0, key, device))
            compiled, outcome = compile_or_eager(PhiloxNormals(), probe_noise, device, say, "default",
                                                 "per-image noise")
            record(outcome)
            return compiled
        self.normals = CompiledAtFirstCall(compile_noise)
        return CompiledAtFirstCall(compile_now, self.fast.cudagraphs)

    def draw(self, diffusion: GaussianDiffusion, step: nn.Module, cond: torch.Tensor, shape: tuple,
             noise: ImageNoise) -> torch.Tensor:
        """One batch of samples in [-1, 1]; row i's noise comes from noise's seed i alone. `step`: what prepare()
        returned, or a bare network (then stepped eagerly)."""
        if not isinstance(step, (GuidedStep, CompiledAtFirstCall)):
            step = GuidedStep(step, ddim_update if self.ddim else ddpm_update)
        with self.precision(diffusion.device):
            if self.ddim:
                return diffusion.ddim_sample(None, cond, shape, num_steps=self.num_steps, eta=self.eta,
                                             select=self.select, w=self.w, generator=noise, step=step)
            return diffusion.sample(None, cond, shape, w=self.w, generator=noise, step=step)


class CompiledAtFirstCall:
    """Calls the module `compile_now()` returns, which it asks for at the first call only. With CUDA graphs each
    call starts a new graph step and copies its output out of the graph's memory, which the next replay reuses
    (the sampler feeds each step's output to the next)."""

    def __init__(self, compile_now: Callable[[], nn.Module], cudagraphs: bool = False):
        self.compile_now, self.net, self.cudagraphs = compile_now, None, cudagraphs

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        if self.net is None:
            self.net = self.compile_now()
        if not self.cudagraphs:
            return self.net(*inputs)
        torch.compiler.cudagraph_mark_step_begin()
        return self.net(*inputs).clone()


class PngWriter:
    """Encodes and writes PNGs in a small thread pool, so that the device samples the next batch meanwhile."""

    def __init__(self, out_dir: str, threads: int = 4):
        self.out_dir = out_dir
        self.pool = ThreadPoolExecutor(threads)
        self.pending: list[Future] = []

    def write(self, indices: list[int], images_u8: torch.Tensor) -> None:
        """Queue images_u8[k] (on the CPU) as OUT/{indices[k]}.png."""
        self.pending += [self.pool.submit(save_png, img, os.path.join(self.out_dir, f"{i}.png"))
                         for i, img in zip(indices, images_u8)]

    def close(self) -> None:
        """Wait for every queued PNG; the first failed write is raised here."""
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown()


def image_labels(n: int, clsnum: int, label: str, seed: int) -> torch.Tensor:
    """Class of every image: `range` is i mod clsnum (exactly balanced), `random` is uniform from a fixed seed."""
    if label == "range":
        return torch.arange(n) % clsnum
    if label == "random":
        return torch.randint(clsnum, (n,), generator=torch.Generator().manual_seed(seed))
    raise UserError(f"unknown --label '{label}' (choose range or random)")


def generate(diffusion: GaussianDiffusion, net: nn.Module, cemblayer: nn.Module, indices: list[int],
             labels: torch.Tensor, shape: tuple[int, int, int], sampler: Sampler,
             progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (image indices, uint8 images on the CPU) in batches; image i's noise comes from seed `seed + i` alone."""
    device = diffusion.device
    for start in tqdm(range(0, len(indices), sampler.batch), disable=not progress, desc="sampling",
                      dynamic_ncols=True):
        chunk = indices[start:start + sampler.batch]
        rows = chunk + [chunk[-1]] * (sampler.batch - len(chunk)) if sampler.fixed_batch else chunk
        with torch.inference_mode():
            cond = cemblayer(labels[rows].to(device))
        x = sampler.draw(diffusion, net, cond, (len(rows),) + tuple(shape),
                         ImageNoise([sampler.seed + i for i in rows], device, sampler.normals))
        yield chunk, sampler.pixels.decode(x[:len(chunk)]).cpu()  # one device-to-host copy per batch


def sample_grid(diffusion: GaussianDiffusion, net: nn.Module, cemblayer: nn.Module, cfg: dict, sampler: Sampler,
                path: str) -> str:
    """A class-per-row grid of sampler.batch images (images 0.. of the run's seed), so successive grids compare."""
    per_class = sampler.batch // cfg["clsnum"]
    labels = class_grid_labels(cfg["clsnum"], per_class)
    shape = (cfg["inch"], cfg["image_size"], cfg["image_size"])
    images = torch.cat([u8 for _, u8 in generate(diffusion, net, cemblayer, list(range(len(labels))), labels, shape,
                                                 sampler)])
    save_grid(images, per_class, path)
    return path
