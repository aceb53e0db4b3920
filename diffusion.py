"""Gaussian diffusion: schedules, q_sample, the training loss, classifier-free guidance, DDPM and DDIM sampling.

The math of DDPM (Ho et al. 2020, eqs. 4, 11, 14), DDIM (Song et al. 2021, eq. 12) and classifier-free guidance
(Ho & Salimans 2022, eq. 6), with the ProtoDiffusion code's choices (docs/usage.md).

Every random draw of a sampler can come from a `torch.Generator`, or from `noise.ImageNoise`, which draws each
image's noise from its own seed on the sampling device, so that an image does not depend on the batch it was
drawn in. The samplers key their draws by timestep (start: 0, the step at t: t + 1).
"""
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from noise import ImageNoise

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | ImageNoise | None


def linear_betas(T: int) -> np.ndarray:
    """The original's linear schedule, rescaled so that any T spans the same noise range as T = 1000."""
    scale = 1000 / T
    return np.linspace(1e-4 * scale, 0.02 * scale, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal (2021) cosine schedule, betas clipped at 0.999."""
    f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


def make_betas(schedule: str, T: int) -> np.ndarray:
    """Betas of the named schedule ('linear' or 'cosine')."""
    if schedule == "linear":
        return linear_betas(T)
    if schedule == "cosine":
        return cosine_betas(T)
    raise ValueError(f"unknown beta schedule '{schedule}' (choose linear or cosine)")


def randn(shape: Sequence[int], generator: Generator, device: torch.device | str, draw: int = 0) -> torch.Tensor:
    """Standard normal noise; from an ImageNoise, row i comes from image i's seed and the draw key alone."""
    if isinstance(generator, ImageNoise):
        return generator.randn(shape, draw).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


def drop_condition(cond: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each row of the class condition by the null condition (zeros) with probability p (CFG training)."""
    gen_device = generator.device if generator is not None else cond.device
    keep = torch.rand(cond.shape[0], generator=generator, device=gen_device).to(cond.device) >= p
    return cond * keep[:, None].to(cond.dtype)


def guidance_inputs(cond: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What every guided step of a batch reuses: the condition with the null condition below it, [cond; 0] (2B
    rows, one forward pass for both halves), and the weights (1 + w, w) in fp32; for w = 0, cond and None."""
    if w == 0:
        return cond, None
    return torch.cat([cond, torch.zeros_like(cond)]), torch.tensor([1 + w, w], dtype=torch.float32, device=cond.device)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, c: Sequence, noise: torch.Tensor | None) -> torch.Tensor:
    """DDIM (Song et al. eq. 12) with c = (sqrt(1 - abar_t), sqrt(abar_t), sqrt(abar_prev),
    sqrt(1 - abar_prev - sigma^2), sigma): numbers, or a device tensor so that a compiled step serves every t."""
    x0 = (x - c[0] * eps) / c[1]
    out = c[2] * x0 + c[3] * eps
    return out + c[4] * noise if noise is not None else out


def ddpm_update(x: torch.Tensor, eps: torch.Tensor, c: Sequence, noise: torch.Tensor | None) -> torch.Tensor:
    """DDPM's ancestral step (Ho et al. eq. 11) with c = (1 / sqrt(alpha_t), beta_t / sqrt(1 - abar_t) / sqrt(alpha_t),
    sigma_t)."""
    mean = c[0] * x - c[1] * eps
    return mean + c[2] * noise if noise is not None else mean


class GuidedStep(nn.Module):
    """x_t -> the next x: the guided eps (CFG, one 2B forward pass) and the sampler's update as one module, whose
    per-step numbers (timestep, coefficients, guidance, noise) all come in as tensors, so that torch.compile makes
    one graph that serves every step of every batch instead of one per step."""

    def __init__(self, net: nn.Module, update: Callable = ddim_update):
        super().__init__()
        self.net, self.update = net, update

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: torch.Tensor | None,
                coef: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """cond and guidance from guidance_inputs; coef: this step's row of the sampler's coefficients."""
        if guidance is None:
            eps = self.net(x, t, cond).float()
        else:
            eps_cond, eps_null = self.net(torch.cat([x, x]), torch.cat([t, t]), cond).float().chunk(2)
            eps = guidance[0] * eps_cond - guidance[1] * eps_null
        return self.update(x, eps, coef, noise)


def ddim_timesteps(T: int, num_steps: int, select: str = "linear") -> list[int]:
    """The DDIM sub-sequence tau of {0..T-1}, increasing, of length num_steps."""
    if not 2 <= num_steps <= T:
        raise ValueError(f"DDIM needs 2 <= --num_steps <= T ({T}); got {num_steps}")
    if select == "linear":
        return np.floor(np.linspace(0, T - 1, num_steps)).astype(int).tolist()
    if select == "quadratic":
        tau = [0] + np.floor(np.linspace(0, math.sqrt(T), num_steps - 1) ** 2).astype(int).tolist()
        tau[-1] = T - 1
        return tau
    raise ValueError(f"unknown DDIM step selection '{select}' (choose linear or quadratic)")


class GaussianDiffusion:
    """Forward process, eps-MSE loss and guided samplers for a fixed beta schedule."""

    def __init__(self, betas: np.ndarray, device: torch.device | str = "cpu", v: float = 1.0,
                 low_t_frac: float = 0.1, low_t_max: int = 50):
        b = torch.as_tensor(np.asarray(betas), dtype=torch.float64)
        self.T = len(b)
        self.device = torch.device(device)
        self.low_t_frac = low_t_frac
        self.low_t_max = low_t_max
        alphas = 1 - b
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        tilde_beta = b * (1 - abar_prev) / (1 - abar)
        # tilde_beta_0 = 0; t = 0 adds no noise, so only its log needs a finite stand-in
        log_tilde = torch.log(torch.cat([tilde_beta[1:2], tilde_beta[1:]]))
        var = torch.exp(v * torch.log(b) + (1 - v) * log_tilde)
        self.abar = abar.tolist()  # float64 scalars for the DDIM coefficients
        f32 = dict(dtype=torch.float32, device=self.device)
        self.sqrt_abar = abar.sqrt().to(**f32)
        self.sqrt_one_minus_abar = (1 - abar).sqrt().to(**f32)
        self.mean_coef_x = (1 / alphas.sqrt()).to(**f32)
        self.mean_coef_eps = (b / (1 - abar).sqrt() / alphas.sqrt()).to(**f32)
        self.sigma = var.sqrt().to(**f32)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.sqrt_abar[t].view(shape) * x0 + self.sqrt_one_minus_abar[t].view(shape) * noise

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """B//10 timesteps from {0..49} (ProtoDiffusion's emphasis on low noise), the rest from {0..T-1}."""
        n_low = int(batch * self.low_t_frac + 1e-6)
        gen_device = generator.device if generator is not None else self.device
        t = torch.cat([torch.randint(self.T, (batch - n_low,), generator=generator, device=gen_device),
                       torch.randint(min(self.low_t_max, self.T), (n_low,), generator=generator, device=gen_device)])
        return t.to(self.device)

    def train_loss(self, model: Model, x0: torch.Tensor, cond: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error between the predicted and the true noise over all elements."""
        t = self.sample_timesteps(x0.shape[0], generator)
        noise = randn(x0.shape, generator, x0.device)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, cond), noise)

    def guided_eps(self, model: Model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: float,
                   one_pass: bool = True) -> torch.Tensor:
        """CFG: (1 + w) eps(x, t, cond) - w eps(x, t, 0) in fp32; one_pass runs both halves as one 2B batch.

        The network outputs are cast to fp32 before the guidance, which multiplies their rounding by up to 1 + 2w,
        so that a bf16 forward pass does not decide the sampler update. One pass measured as fast as or faster
        than two on this project's CPU (bench.py rows in the README) and is the usual choice on GPUs.
        """
        if w == 0:
            return model(x, t, cond).float()
        if one_pass:
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)])).float()
            eps_cond, eps_null = out.chunk(2)
        else:
            eps_cond, eps_null = model(x, t, cond).float(), model(x, t, torch.zeros_like(cond)).float()
        return (1 + w) * eps_cond - w * eps_null

    def ddpm_coefficients(self) -> torch.Tensor:
        """[T, 3]: ddpm_update's coefficients of every t, on the device."""
        return torch.stack([self.mean_coef_x, self.mean_coef_eps, self.sigma], dim=1)

    def ddpm_step(self, x: torch.Tensor, t: int, eps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, with no noise at t = 0."""
        return ddpm_update(x, eps, (self.mean_coef_x[t], self.mean_coef_eps[t], self.sigma[t]),
                           noise if t > 0 else None)

    def ddim_coefficients(self, t: int, t_prev: int, eta: float) -> tuple[float, ...]:
        """ddim_update's coefficients from t to t_prev (t_prev = -1: the clean image, abar_{-1} = 1), in float64."""
        a_t = self.abar[t]
        a_prev = self.abar[t_prev] if t_prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        return (math.sqrt(1 - a_t), math.sqrt(a_t), math.sqrt(a_prev), math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)),
                sigma)

    def ddim_step(self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
        """One DDIM update from t to t_prev (t_prev = -1 means the clean image, abar_{-1} = 1)."""
        c = self.ddim_coefficients(t, t_prev, eta)
        return ddim_update(x, eps, c, noise if c[4] > 0 else None)

    @torch.inference_mode()
    def sample(self, model: Model, cond: torch.Tensor, shape: Sequence[int], *, w: float = 1.8,
               generator: Generator = None, progress: bool = False, step: Callable | None = None) -> torch.Tensor:
        """Ancestral DDPM sampling over all T steps; returns x_0 clamped to [-1, 1]. `step`: a GuidedStep of
        ddpm_update around `model` (compiled, say); by default one is made."""
        step = GuidedStep(model, ddpm_update) if step is None else step
        cond, guidance = guidance_inputs(cond, w)
        coefs = self.ddpm_coefficients()
        x = randn(shape, generator, self.device, draw=0)
        for t in tqdm(range(self.T - 1, -1, -1), disable=not progress, desc="DDPM", leave=False):
            tt = torch.full((shape[0],), t, device=self.device, dtype=torch.long)
            noise = randn(shape, generator, self.device, draw=t + 1) if t > 0 else None
            x = step(x, tt, cond, guidance, coefs[t], noise)
        return x.clamp(-1, 1)

    @torch.inference_mode()
    def ddim_sample(self, model: Model, cond: torch.Tensor, shape: Sequence[int], *, num_steps: int = 50,
                    eta: float = 0.0, select: str = "linear", w: float = 1.8, generator: Generator = None,
                    progress: bool = False, step: Callable | None = None) -> torch.Tensor:
        """DDIM sampling over the distinct timesteps `select` chooses; returns x_0 clamped to [-1, 1]. `step`: a
        GuidedStep of ddim_update around `model` (compiled, say); by default one is made.

        A DDIM step from t to the same t returns x (sigma is 0 and the eps terms cancel), so a repeated timestep
        (the quadratic selection repeats t = 0: three times at 50 steps and T = 1000) is skipped: same images to
        float rounding, one guided forward fewer per repeat.
        """
        tau = sorted(set(ddim_timesteps(self.T, num_steps, select)))
        step = GuidedStep(model, ddim_update) if step is None else step
        cond, guidance = guidance_inputs(cond, w)  # once per batch, not per step
        coefs = torch.tensor([self.ddim_coefficients(t, tau[i - 1] if i > 0 else -1, eta) for i, t in enumerate(tau)],
                             dtype=torch.float32, device=self.device)
        x = randn(shape, generator, self.device, draw=0)
        for i in tqdm(range(len(tau) - 1, -1, -1), disable=not progress, desc="DDIM", leave=False):
            t, t_prev = tau[i], (tau[i - 1] if i > 0 else -1)
            tt = torch.full((shape[0],), t, device=self.device, dtype=torch.long)
            noise = randn(shape, generator, self.device, draw=t + 1) if eta > 0 and t_prev >= 0 else None
            x = step(x, tt, cond, guidance, coefs[i], noise)
        return x.clamp(-1, 1)
