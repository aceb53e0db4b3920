"""Conditional UNet of ProtoDiffusion: the DDPM UNet with attention after every residual block, as the paper's
code has it; parameter names match the original code, so its checkpoints load."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of integer timesteps, cos half first as in the original."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def check_unet_config(mod_ch: int, ch_mul: list[int], image_size: int | None = None) -> None:
    """Raise ValueError with a readable reason if the UNet cannot be built or cannot take this image size."""
    if mod_ch <= 0 or not ch_mul or any(m <= 0 for m in ch_mul):
        raise ValueError(f"--modch ({mod_ch}) and every --chmul entry ({ch_mul}) must be positive")
    bad = [m * mod_ch for m in ch_mul if (m * mod_ch) % 32]
    if bad:
        raise ValueError(f"--modch {mod_ch} with --chmul {','.join(map(str, ch_mul))} gives {bad} channels; "
                         "GroupNorm(32) needs every width m*modch to be a multiple of 32")
    if image_size is not None:
        factor = 2 ** (len(ch_mul) - 1)
        if image_size % factor:
            raise ValueError(f"image size {image_size} cannot be halved {len(ch_mul) - 1} times "
                             f"(len(--chmul) - 1); use a multiple of {factor} or a shorter --chmul")


class EmbedBlock(nn.Module):
    """A block whose forward also takes the time and class embeddings."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EmbedSequential(nn.Sequential):
    """Sequential that hands (temb, cemb) to the layers that take them."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, temb, cemb) if isinstance(layer, EmbedBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.layer = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling when use_conv is False."""

    def __init__(self, in_ch: int, out_ch: int, use_conv: bool):
        super().__init__()
        self.layer = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ResBlock(EmbedBlock):
    """Residual block; time and class embeddings are added after the first conv."""

    def __init__(self, in_ch: int, out_ch: int, tdim: int, cdim: int, droprate: float):
        super().__init__()
        self.block_1 = nn.Sequential(nn.GroupNorm(32, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, out_ch))
        self.cemb_proj = nn.Sequential(nn.SiLU(), nn.Linear(cdim, out_ch))
        self.block_2 = nn.Sequential(nn.GroupNorm(32, out_ch), nn.SiLU(), nn.Dropout(droprate),
                                     nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.residual = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor) -> torch.Tensor:
        h = self.block_1(x) + (self.temb_proj(temb) + self.cemb_proj(cemb))[:, :, None, None]
        return self.block_2(h) + self.residual(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual add."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, in_ch)
        self.proj_q = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_k = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_v = nn.Conv2d(in_ch, in_ch, 1)
        self.proj = nn.Conv2d(in_ch, in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W tokens, C]; SDPA's default scale is C^-0.5, as in the original
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.proj_q, self.proj_k, self.proj_v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class Unet(nn.Module):
    """eps-prediction UNet conditioned on a timestep and a class condition of width cdim (ConditionalEmbedding's
    output); inside, `temb` and `cemb` are their projections that every ResBlock adds."""

    def __init__(self, in_ch: int = 3, mod_ch: int = 64, out_ch: int = 3, ch_mul: tuple[int, ...] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, cdim: int = 128, use_conv: bool = True, droprate: float = 0.1):
        super().__init__()
        check_unet_config(mod_ch, list(ch_mul))
        self.mod_ch = mod_ch
        tdim = 4 * mod_ch
        self.temb_layer = nn.Sequential(nn.Linear(mod_ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.cemb_layer = nn.Sequential(nn.Linear(cdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))

        self.downblocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_ch, mod_ch, 3, padding=1))])
        now = mod_ch
        skips = [now]
        for i, mul in enumerate(ch_mul):
            for _ in range(num_res_blocks):
                self.downblocks.append(EmbedSequential(ResBlock(now, mul * mod_ch, tdim, tdim, droprate),
                                                       AttnBlock(mul * mod_ch)))
                now = mul * mod_ch
                skips.append(now)
            if i != len(ch_mul) - 1:
                self.downblocks.append(EmbedSequential(Downsample(now, now, use_conv)))
                skips.append(now)

        self.middleblocks = EmbedSequential(ResBlock(now, now, tdim, tdim, droprate), AttnBlock(now),
                                            ResBlock(now, now, tdim, tdim, droprate))

        self.upblocks = nn.ModuleList()
        for i, mul in reversed(list(enumerate(ch_mul))):
            for j in range(num_res_blocks + 1):
                layers = [ResBlock(now + skips.pop(), mul * mod_ch, tdim, tdim, droprate), AttnBlock(mul * mod_ch)]
                now = mul * mod_ch
                if i and j == num_res_blocks:
                    layers.append(Upsample(now, now))
                self.upblocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, now), nn.SiLU(), nn.Conv2d(now, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], integer timesteps t [B], class condition cond [B, cdim] (zeros: the CFG null condition)."""
        temb = self.temb_layer(timestep_embedding(t, self.mod_ch))
        cemb = self.cemb_layer(cond)  # the condition projected to the blocks' width, like temb
        hs = []
        h = x
        for block in self.downblocks:
            h = block(h, temb, cemb)
            hs.append(h)
        h = self.middleblocks(h, temb, cemb)
        for block in self.upblocks:
            h = block(torch.cat([h, hs.pop()], dim=1), temb, cemb)
        return self.out(h)
