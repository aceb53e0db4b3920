import math

import numpy as np
import pytest
import torch

from diffusion import (GaussianDiffusion, GuidedStep, ddim_timesteps, ddim_update, ddpm_update, drop_condition,
                       linear_betas, randn)
from noise import ImageNoise, PhiloxNormals, philox4x32
from unet import Unet

T = 1000


def closed_form_abar():
    betas = np.linspace(1e-4, 0.02, T)
    return betas, np.cumprod(1 - betas)


@pytest.fixture
def diff():
    return GaussianDiffusion(linear_betas(T))


class Oracle(torch.nn.Module):
    """Knows x0; returns the eps that makes x_t consistent with it (a perfect denoiser)."""

    def __init__(self, x0, abar):
        super().__init__()
        self.x0, self.abar = x0, torch.tensor(abar)

    def forward(self, x, t, cemb):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        x0 = self.x0.repeat(len(x) // len(self.x0), 1, 1, 1)  # CFG may stack both halves into one batch
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def test_linear_betas_scale_with_T():
    np.testing.assert_allclose(linear_betas(1000), np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(linear_betas(500), np.linspace(2e-4, 0.04, 500))


def test_q_sample_closed_form(diff):
    _, abar = closed_form_abar()
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    ref = torch.tensor(np.sqrt(abar[[0, 500, 999]])).float().view(-1, 1, 1, 1) * x0 + \
        torch.tensor(np.sqrt(1 - abar[[0, 500, 999]])).float().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(diff.q_sample(x0, t, noise), ref)


def test_train_loss_is_eps_mse_with_ten_percent_low_t(diff):
    _, abar = closed_form_abar()
    seen = {}

    def model(x, t, cemb):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    x0 = torch.randn(100, 1, 4, 4)
    loss = diff.train_loss(model, x0, torch.zeros(100, 8))
    t = seen["t"]
    a = torch.tensor(abar[t.numpy()]).float().view(-1, 1, 1, 1)
    noise = (seen["x"] - a.sqrt() * x0) / (1 - a).sqrt()  # recover the true noise independently
    torch.testing.assert_close(loss, (noise ** 2).mean(), rtol=1e-4, atol=1e-5)
    assert (t < 50).sum() >= 10 and t.max() < T and t.min() >= 0
    counts = [(diff.sample_timesteps(100) < 50).sum().item() for _ in range(200)]
    assert min(counts) >= 10  # exactly B//10 forced low, plus ~5% of the rest by chance
    assert abs(np.mean(counts) - (10 + 90 * 50 / T)) < 1.0


def test_drop_condition_rate_and_zero_rows():
    cemb = torch.ones(20000, 4)
    out = drop_condition(cemb, 0.1, torch.Generator().manual_seed(0))
    dropped = (out == 0).all(1)
    assert ((out == 1).all(1) | dropped).all()
    assert abs(dropped.float().mean().item() - 0.1) < 0.01


def test_one_pass_cfg_equals_two_passes(diff):
    torch.manual_seed(0)
    net = Unet(1, 32, 1, (1, 2), 1, 16).eval()
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([1, 400, 999]), torch.randn(3, 16)
    with torch.no_grad():
        one = diff.guided_eps(net, x, t, c, 1.8, one_pass=True)
        two = diff.guided_eps(net, x, t, c, 1.8, one_pass=False)
        ref = 2.8 * net(x, t, c) - 1.8 * net(x, t, torch.zeros_like(c))
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, ref, atol=1e-5, rtol=1e-5)


def test_ddpm_step_mean_is_the_posterior_mean_and_v1_variance_is_beta(diff):
    betas, abar = closed_form_abar()
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = 300
    xt = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
    # q(x_{t-1} | x_t, x_0) mean, Ho et al. (2020) eq. 7
    post = (math.sqrt(abar[t - 1]) * betas[t] / (1 - abar[t])) * x0 + \
        (math.sqrt(1 - betas[t]) * (1 - abar[t - 1]) / (1 - abar[t])) * xt
    torch.testing.assert_close(diff.ddpm_step(xt, t, eps, None), post.float(), atol=1e-5, rtol=1e-4)
    one = torch.ones(1)
    assert diff.ddpm_step(0 * one, t, 0 * one, one).item() == pytest.approx(math.sqrt(betas[t]), rel=1e-5)
    tilde = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    small = GaussianDiffusion(linear_betas(T), v=0.0)
    assert small.ddpm_step(0 * one, t, 0 * one, one).item() == pytest.approx(math.sqrt(tilde), rel=1e-5)
    assert diff.ddpm_step(0 * one, 0, 0 * one, one).item() == 0.0  # no noise at t = 0


def test_ddim_timesteps_closed_forms():
    assert ddim_timesteps(T, 5, "linear") == [0, 249, 499, 749, 999]
    q = ddim_timesteps(T, 5, "quadratic")
    assert q == [0] + [int(v) for v in np.linspace(0, math.sqrt(T), 4) ** 2][:-1] + [999]
    for bad in (1, T + 1):
        with pytest.raises(ValueError, match="num_steps"):
            ddim_timesteps(T, bad)


def test_ddim_eta0_with_true_noise_recovers_x0(diff):
    _, abar = closed_form_abar()
    x0, eps = torch.rand(2, 1, 4, 4) * 1.6 - 0.8, torch.randn(2, 1, 4, 4)
    tau = ddim_timesteps(T, 10)
    x = math.sqrt(abar[999]) * x0 + math.sqrt(1 - abar[999]) * eps
    for i in range(len(tau) - 1, -1, -1):
        x = diff.ddim_step(x, tau[i], tau[i - 1] if i else -1, eps, 0.0, None)
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eta,select", [(0.0, "linear"), (1.0, "quadratic")])
def test_ddim_sample_with_a_perfect_denoiser_returns_x0(diff, eta, select):
    _, abar = closed_form_abar()
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    out = diff.ddim_sample(Oracle(x0, abar), torch.randn(2, 8), (2, 1, 4, 4), num_steps=20, eta=eta, select=select,
                           w=1.8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def test_ddpm_sample_with_a_perfect_denoiser_returns_x0():
    betas = linear_betas(50)
    diff = GaussianDiffusion(betas)
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    out = diff.sample(Oracle(x0, np.cumprod(1 - betas)), torch.randn(2, 8), (2, 1, 4, 4), w=0.5,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_per_image_noise_makes_images_independent_of_the_batch(diff):
    torch.manual_seed(0)
    net = Unet(1, 32, 1, (1, 2), 1, 16).eval()
    c = torch.randn(3, 16)
    both = diff.ddim_sample(net, c, (3, 1, 8, 8), num_steps=4, eta=1.0, generator=ImageNoise([10, 11, 12], "cpu"))
    last = diff.ddim_sample(net, c[2:], (1, 1, 8, 8), num_steps=4, eta=1.0, generator=ImageNoise([12], "cpu"))
    # equal up to rounding: the batch size changes the CPU convolutions' summation order (1e-3 = 0.13 uint8 levels)
    torch.testing.assert_close(both[2:], last, atol=1e-3, rtol=0)
    other = diff.ddim_sample(net, c[2:], (1, 1, 8, 8), num_steps=4, eta=1.0, generator=ImageNoise([13], "cpu"))
    assert (other - last).abs().max() > 0.1  # the seed does decide the image
    again = diff.ddim_sample(net, c, (3, 1, 8, 8), num_steps=4, generator=ImageNoise([10, 11, 12], "cpu"))
    assert torch.equal(again, diff.ddim_sample(net, c, (3, 1, 8, 8), num_steps=4,
                                               generator=ImageNoise([10, 11, 12], "cpu")))
    assert randn((2, 3), ImageNoise([5, 6], "cpu"), "cpu", draw=4)[1].equal(ImageNoise([6], "cpu").randn((1, 3), 4)[0])


@pytest.mark.parametrize("counter,key,expected", [  # Random123's known-answer vectors for Philox4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_reference_vectors(counter, key, expected):
    words = philox4x32([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in words) == expected


def test_image_noise_is_standard_normal_and_independent_across_images_and_draws():
    from scipy import stats
    noise = ImageNoise(list(range(64)), "cpu")
    a, b = noise.randn((64, 3, 16, 16), 0), noise.randn((64, 3, 16, 16), 1)
    assert stats.kstest(a.flatten().numpy(), "norm").pvalue > 1e-3  # 49,152 draws: a wrong law shows at once
    n = a[0].numel()
    for x, y in ((a[0], a[1]), (a[0], b[0]), (a[:, 0, 0, 0], a[:, 0, 0, 1])):
        r = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1].abs().item()
        assert r < 5 / math.sqrt(min(n, x.numel())), r  # 5 standard errors of a correlation of independent draws
    assert torch.equal(ImageNoise([2**40 + 3], "cpu").randn((1, 5), 9), ImageNoise([2**40 + 3], "cpu").randn((1, 5), 9))


def test_quadratic_ddim_skips_repeated_timesteps_and_matches_the_original_loop(diff):
    tau = ddim_timesteps(T, 50, "quadratic")
    assert tau[:3] == [0, 0, 0] and len(set(tau)) == 48  # the original repeats t = 0 three times at 50 steps
    torch.manual_seed(0)
    net = Unet(1, 32, 1, (1, 2), 1, 16).eval()
    calls = []
    counted = lambda x, t, c: calls.append(1) or net(x, t, c)  # noqa: E731
    c = torch.randn(2, 16)
    out = diff.ddim_sample(counted, c, (2, 1, 8, 8), num_steps=50, select="quadratic", generator=ImageNoise([1, 2], "cpu"))
    assert len(calls) == 48
    with torch.no_grad():  # the original formula: every entry of tau, repeats included
        x = ImageNoise([1, 2], "cpu").randn((2, 1, 8, 8), 0)
        for i in range(len(tau) - 1, -1, -1):
            t = torch.full((2,), tau[i], dtype=torch.long)
            x = diff.ddim_step(x, tau[i], tau[i - 1] if i else -1, diff.guided_eps(net, x, t, c, 1.8), 0.0, None)
    # a step from t to t adds and removes sqrt(1 - abar_t) eps: exact up to fp32 rounding of x (|x| <~ 4)
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_compiled_noise_draws_the_same_normals_as_the_eager_ops():
    seeds = [0, 7, 2 ** 40 + 3]
    eager = ImageNoise(seeds, "cpu").randn((3, 2, 5, 5), 2 ** 33 + 11)
    compiled = ImageNoise(seeds, "cpu", torch.compile(PhiloxNormals(), dynamic=False)).randn((3, 2, 5, 5), 2 ** 33 + 11)
    # one wrong bit of a Philox word moves a normal by far more than the float rounding of Box-Muller (~1e-7)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert not torch.equal(eager, ImageNoise(seeds, "cpu").randn((3, 2, 5, 5), 2 ** 33 + 12))


@pytest.mark.parametrize("sampler", ["ddim", "ddim eta 1", "ddpm"])
def test_one_compiled_step_serves_every_step_of_the_sampler(sampler):
    """The step's numbers are tensor inputs, so dynamo compiles it once (twice where the last step has no noise)
    for all 50 DDIM or 60 DDPM steps, not once per step, and the images equal the eager sampler's."""
    from torch._dynamo.testing import CompileCounter
    diff = GaussianDiffusion(linear_betas(60 if sampler == "ddpm" else T))
    torch.manual_seed(0)
    net = Unet(1, 32, 1, (1, 2), 1, 16).eval()
    c = torch.randn(2, 16)
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(GuidedStep(net, ddpm_update if sampler == "ddpm" else ddim_update), backend=counter,
                         dynamic=False)
    eta = 1.0 if sampler == "ddim eta 1" else 0.0

    def draw(**how):
        if sampler == "ddpm":
            return diff.sample(**how, cond=c, shape=(2, 1, 8, 8), w=1.8, generator=ImageNoise([1, 2], "cpu"))
        return diff.ddim_sample(**how, cond=c, shape=(2, 1, 8, 8), num_steps=50, eta=eta, w=1.8,
                                generator=ImageNoise([1, 2], "cpu"))
    compiled = draw(model=None, step=step)
    assert counter.frame_count == (1 if sampler == "ddim" else 2)
    assert torch.equal(compiled, draw(model=net))
