"""Per-image noise for sampling: image i's noise depends on its own seed only, drawn on the sampling device.

A counter-based generator (Philox4x32-10, Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") in
plain tensor ops: the key is the image's seed, the counter is (element block, draw key), so a whole batch of
differently seeded images is one vectorised computation with no per-image launches and no host copy. The bits
are the same on every device; the normals (Box-Muller in fp32) agree across devices to float rounding.
"""
import math
from typing import Callable, Sequence

import torch

MASK = 0xFFFFFFFF
MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # the golden ratio and sqrt(3) - 1, as 32-bit fractions


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32 on int64 tensors holding unsigned 32-bit words (broadcasting); returns the four output words.

    32 x 32-bit products fit in 64 bits up to the sign, and wrapping keeps the low 64 bits exact, so masking after
    the arithmetic shift recovers the unsigned high word.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + KEY_STEPS[0]) & MASK, (k1 + KEY_STEPS[1]) & MASK
        p0, p1 = c0 * MULTIPLIERS[0], c2 * MULTIPLIERS[1]
        hi0, lo0 = (p0 >> 32) & MASK, p0 & MASK
        hi1, lo1 = (p1 >> 32) & MASK, p1 & MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def normals(blocks: torch.Tensor, draw: torch.Tensor, key0: torch.Tensor, key1: torch.Tensor) -> torch.Tensor:
    """Four standard normals per (image, block): Philox of counter (block, draw low, draw high, 0) under the image's
    key, then Box-Muller; [images, blocks, 4], float32. Pure tensor ops, so torch.compile fuses it into one kernel."""
    zero = torch.zeros_like(blocks)
    words = philox4x32((blocks, zero + (draw & MASK), zero + ((draw >> 32) & MASK), zero), (key0, key1))
    # 24 high bits of each word -> uniform in (0, 1); Box-Muller turns two uniforms into two normals
    u = [((w >> 8).float() + 0.5) * 2.0 ** -24 for w in words]
    radius = [torch.sqrt(-2 * torch.log(u[0])), torch.sqrt(-2 * torch.log(u[2]))]
    angle = [2 * math.pi * u[1], 2 * math.pi * u[3]]
    return torch.stack([radius[0] * torch.cos(angle[0]), radius[0] * torch.sin(angle[0]),
                        radius[1] * torch.cos(angle[1]), radius[1] * torch.sin(angle[1])], dim=-1)


class ImageNoise:
    """Standard normal noise for a batch of images, row i from `seeds[i]` alone, any draw keyed by an integer.

    The samplers key the starting noise 0 and the noise of the step at timestep t with t + 1, so a sampler that
    skips a step (a repeated timestep) leaves every other step's noise unchanged. `normals` computes the draw:
    `normals` above (about 200 small ops), or a compiled PhiloxNormals (one kernel; the draw key is a tensor, so new
    keys do not recompile).
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: torch.device | str,
                 normals: Callable[..., torch.Tensor] = normals):
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
        if (seeds < 0).any():
            raise ValueError("seeds must be >= 0")
        self.device = torch.device(device)
        self.key = ((seeds & MASK).to(self.device)[:, None], ((seeds >> 32) & MASK).to(self.device)[:, None])
        self.normals = normals

    def __len__(self) -> int:
        return self.key[0].shape[0]

    def randn(self, shape: Sequence[int], draw: int) -> torch.Tensor:
        """Noise of `shape` (rows = images) for draw key `draw` >= 0, float32 on the device."""
        if shape[0] != len(self):
            raise ValueError(f"{len(self)} seeds for a batch of {shape[0]}")
        n = math.prod(shape[1:])
        z = self.normals(*normals_inputs(n, draw, self.key, self.device))
        return z.reshape(shape[0], -1)[:, :n].reshape(tuple(shape))


def normals_inputs(n: int, draw: int, key: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple:
    """The arguments of `normals` for n values per image and draw key `draw`."""
    blocks = torch.arange((n + 3) // 4, device=device, dtype=torch.int64)[None]
    return blocks, torch.full((), draw, dtype=torch.int64, device=device), *key


class PhiloxNormals(torch.nn.Module):
    """`normals` as a module, so that it compiles behind the same probe and fallback as the networks."""

    def forward(self, blocks: torch.Tensor, draw: torch.Tensor, key0: torch.Tensor, key1: torch.Tensor) -> torch.Tensor:
        return normals(blocks, draw, key0, key1)

