"""The CUDA path computes what the CPU path does (run by scripts/gpu_check.sh; skipped without a GPU)."""
import glob
import os

import pytest
import torch

from conftest import TINY

import train
from diffusion import GaussianDiffusion, linear_betas
from speed import adamw
from checkpoints import build_models
from sampling import Sampler, generate
from unet import Unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off, so fp32 on the GPU is IEEE fp32 like the CPU (train.py turns TF32 on for speed)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch._dynamo.reset()  # each test compiles its own shapes; none should inherit another's as dynamic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def small_unet() -> Unet:
    torch.manual_seed(0)
    return Unet(3, 64, 3, (1, 2, 2), 2, 32).eval()  # eval: dropout off, so only the device differs


def inputs(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.randint(1000, (n,), generator=g),
            torch.randn(n, 32, generator=g))


def loss_on(net: torch.nn.Module, device: torch.device, amp: torch.dtype | None = None) -> float:
    x, _, c = inputs()
    diff = GaussianDiffusion(linear_betas(1000), device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return diff.train_loss(net, x.to(device), c.to(device), generator=torch.Generator(device).manual_seed(3)).item()


def test_unet_forward_on_cuda_equals_cpu_fp32():
    net = small_unet()
    x, t, c = inputs()
    with torch.no_grad():
        ref = net(x, t, c)
        out = net.to(CUDA)(x.to(CUDA), t.to(CUDA), c.to(CUDA)).cpu()
    # fp32 with another summation order (cuDNN's conv algorithms): errors of a few ulps per op, growing through
    # ~30 layers to ~1e-6 of the output scale; 1e-4 of the largest output leaves room and still catches a wrong op
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_compiled_loss_equals_eager_on_cuda():
    net = small_unet().to(CUDA)
    eager = loss_on(net, CUDA)
    compiled = loss_on(torch.compile(net, dynamic=False), CUDA)
    assert compiled == pytest.approx(eager, rel=1e-4)  # inductor fuses and reorders fp32 reductions


def test_a_short_bf16_run_follows_the_fp32_run_on_cuda():
    from test_speed import bf16_vs_fp32
    # the CPU test's bounds and their reason (tests/test_speed.py: autocast keeps fp32 master weights, so bf16 differs
    # only by activation and gradient rounding; a run holding the parameters in bf16 breaks them); the fp32 run is
    # the product's fp32 path, which allows TF32 (resolve_fast_path turns it on whatever the fixture set), whose
    # 10-bit mantissa sits well inside the same bounds
    loss_diff, function_diff = bf16_vs_fp32(CUDA)
    print(f"\nbf16 vs fp32 on CUDA, 30 steps: loss {loss_diff:.2e}, function {function_diff:.2e}")
    assert loss_diff <= 2e-3 and function_diff <= 1e-2, (loss_diff, function_diff)


def test_fused_adamw_on_cuda_equals_the_cpu_step():
    torch.manual_seed(0)
    cpu_params = [torch.randn(64, 32), torch.randn(128), torch.randn(3, 3, 8, 8)]
    gpu_params = [p.clone().to(CUDA).requires_grad_() for p in cpu_params]
    cpu_params = [p.requires_grad_() for p in cpu_params]
    opts = adamw(cpu_params, 1e-3, 1e-4), adamw(gpu_params, 1e-3, 1e-4)
    assert opts[1].defaults["fused"]
    for step in range(3):
        grads = [torch.randn_like(p, device="cpu") for p in cpu_params]
        for params, opt in zip((cpu_params, gpu_params), opts):
            for p, g in zip(params, grads):
                p.grad = g.to(p.device)
            opt.step()
    for a, b in zip(cpu_params, gpu_params):
        # each step moves a weight by about lr = 1e-3; fp32 rounding of m / (sqrt(v) + eps) is ~1e-7 of that
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-7)


def test_a_compiled_bf16_cuda_run_loads_strict_into_a_plain_cpu_model(tmp_path):
    run = tmp_path / "run"
    train.main(train.build_parser().parse_args(TINY + ["--epoch", "1", "--device", "cuda", "--amp", "bf16",
                                                       "--compile", "True", "--run_dir", str(run)]))
    ckpt = torch.load(glob.glob(os.path.join(run, "checkpoints", "ckpt_1_checkpoint.pt"))[0], map_location="cpu",
                      weights_only=True)
    net, cemb = build_models(ckpt["config"])
    net.load_state_dict(ckpt["net"], strict=True)
    net.load_state_dict(ckpt["ema"]["net"], strict=True)
    cemb.load_state_dict(ckpt["cemblayer"], strict=True)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in ckpt["net"].values())
    with torch.no_grad():
        out = net.eval()(torch.zeros(2, 1, 8, 8), torch.tensor([10, 500]), cemb(torch.tensor([0, 1])))
    assert torch.isfinite(out).all()


def test_per_image_seeds_give_the_same_images_for_two_batch_sizes_on_cuda():
    torch.manual_seed(0)
    net, cemb = Unet(1, 32, 1, (1, 2), 1, 16).to(CUDA).eval(), torch.nn.Embedding(10, 16).to(CUDA)
    diff = GaussianDiffusion(linear_betas(1000), CUDA)
    labels = torch.arange(24) % 10

    def images(batch: int) -> torch.Tensor:
        sampler = Sampler(ddim=True, num_steps=10, eta=1.0, select="linear", w=1.8, batch=batch, seed=5)
        return torch.cat([u8 for _, u8 in generate(diff, net, cemb, list(range(24)), labels, (1, 16, 16),
                                                   sampler)]).cpu().int()

    a, b = images(24), images(5)
    same = (a == b).float().mean().item()
    within_one = ((a - b).abs() <= 1).float().mean().item()
    # cuDNN may choose other kernels for other batch sizes; then images differ by rounding, never by noise
    print(f"\nper-image seeds on CUDA, batch 24 vs 5: {100 * same:.3f}% of pixels identical, "
          f"{100 * within_one:.3f}% within one uint8 level")
    assert within_one >= 0.999


def test_the_products_loss_graph_compiles_on_cuda_without_falling_back():
    import train_step
    from speed import FastPath
    torch.manual_seed(0)
    net = Unet(3, 64, 3, (1, 2, 2), 1, 32).to(CUDA, memory_format=torch.channels_last)
    from embedding import ConditionalEmbedding
    models = torch.nn.ModuleDict({"net": net, "cemblayer": ConditionalEmbedding(10, 32, 32).to(CUDA)}).train()
    diff = GaussianDiffusion(linear_betas(1000), CUDA)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(256, (16, 3, 16, 16), generator=g, dtype=torch.uint8).to(CUDA),
             torch.randint(10, (16,), generator=g).to(CUDA))
    fast = FastPath(torch.bfloat16, True, True)
    eager_fast = FastPath(torch.bfloat16, False, True)
    with torch._inductor.config.patch(fallback_random=True):  # the graph's random ops draw what eager draws
        loss, outcome = train_step.make_loss(models, diff, 0.1, fast, batch, print)
        assert outcome["compiled"], outcome["reason"]
        torch.manual_seed(5)
        with fast.autocast(CUDA):  # where TrainStep enters it: outside the compiled graph, as on CPU
            compiled = loss(*batch)
        compiled.backward()
    grads = torch.cat([p.grad.flatten() for p in models.parameters()])
    models.zero_grad(set_to_none=True)
    eager, _ = train_step.make_loss(models, diff, 0.1, eager_fast, batch, print)
    torch.manual_seed(5)
    with eager_fast.autocast(CUDA):
        reference = eager(*batch)
    reference.backward()
    expected = torch.cat([p.grad.flatten() for p in models.parameters()])
    # bf16 autocast on both sides, fused and reordered by inductor. Bounds: the loss to 1% (bf16 keeps 8 bits of
    # mantissa, about 0.4% per rounding, and the MSE averages them); the whole gradient to 5% of its norm, compared
    # as one vector, since single parameters can have an exact gradient of zero (the attention key bias: softmax
    # ignores a constant shift), where both sides are rounding noise
    assert compiled.item() == pytest.approx(reference.item(), rel=1e-2)
    assert (grads - expected).norm() <= 5e-2 * expected.norm()


@pytest.mark.parametrize("counter,key,expected", [  # Random123's known-answer vectors for Philox4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
])
def test_philox_known_answers_on_cuda(counter, key, expected):
    from noise import philox4x32
    words = philox4x32([torch.tensor(c, device=CUDA) for c in counter], [torch.tensor(k, device=CUDA) for k in key])
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("compiled", [False, True])
def test_image_noise_has_the_same_bits_on_cpu_and_cuda(compiled):
    from noise import ImageNoise, PhiloxNormals, normals
    seeds = [0, 1, 2 ** 40 + 7]
    blocks = torch.arange(300, dtype=torch.int64)[None]
    draw = torch.tensor(2 ** 33 + 5)
    keys = ImageNoise(seeds, "cpu").key
    cpu = normals(blocks, draw, *keys)
    cuda = ImageNoise(seeds, CUDA, torch.compile(PhiloxNormals(), dynamic=False) if compiled else normals)
    gpu = cuda.normals(blocks.to(CUDA), draw.to(CUDA), *cuda.key).cpu()
    # the integer rounds are exact on both; the float Box-Muller differs by a few ulps of libm at most
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_the_samplers_fast_path_follows_eager_fp32_on_cuda():
    from speed import FastPath
    torch.manual_seed(0)
    net, cemb = Unet(3, 64, 3, (1, 2), 1, 16).to(CUDA).eval(), torch.nn.Embedding(10, 16).to(CUDA)
    diff = GaussianDiffusion(linear_betas(1000), CUDA)
    labels = torch.arange(13) % 10

    def images(fast, net_for_sampler) -> torch.Tensor:
        sampler = Sampler(ddim=True, num_steps=10, eta=0.0, select="linear", w=1.8, batch=8, seed=3, fast=fast)
        if fast is not None:
            net_for_sampler = sampler.prepare(net_for_sampler, (3, 16, 16), 16, CUDA, print, outcomes.append)
        return torch.cat([u8 for _, u8 in generate(diff, net_for_sampler, cemb, list(range(13)), labels,
                                                   (3, 16, 16), sampler)]).float()

    outcomes = []
    reference = images(None, net)
    got = images(FastPath(torch.bfloat16, True, True), net.to(memory_format=torch.channels_last))
    assert outcomes and outcomes[0]["compiled"], outcomes
    assert got.shape == reference.shape == (13, 3, 16, 16)  # 2 batches of 8, the last one padded
    levels = (got - reference).abs()
    print(f"\nsampler fast path (compiled, bf16, channels_last, padded batch) vs eager fp32: mean {levels.mean():.3f}, "
          f"max {levels.max():.0f} uint8 levels")
    # the CPU test's bounds for bf16 vs fp32 sampling (tests/test_sample.py: bf16 rounding of a 10-step DDIM
    # trajectory moves a few pixels near the clamp by many levels, most by under one), printed above so that the
    # first GPU run can tighten them
    assert levels.mean() <= 2.0 and levels.flatten().quantile(0.999) <= 96
