"""The optimised path computes what the straightforward one does; compiled runs save plain checkpoints."""
import functools
import glob
import json
import os

import pytest
import torch

from conftest import TINY

import train
from checkpoints import build_models
from diffusion import GaussianDiffusion, linear_betas
from speed import adamw, resolve_fast_path
from unet import Unet


def losses(channels_last: bool, fused: bool, amp: torch.dtype | None, steps: int = 3):
    torch.manual_seed(0)
    net = Unet(3, 32, 3, (1, 2), 1, 16)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    params = list(net.parameters())
    opt = adamw(params, 1e-3, 1e-4) if fused else torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    diff = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(1)
    x, c = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.randn(8, 16, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    losses_seen = []
    for i in range(steps):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            net.train(False)  # dropout off, so only the path differs
            loss = diff.train_loss(net, x, c, generator=torch.Generator().manual_seed(10 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses_seen.append(loss.item())
    return losses_seen


def test_fp32_optimised_cpu_path_matches_eager():
    # parameters are not compared: Adam turns rounding noise in gradients that are zero in exact arithmetic
    # (e.g. the key bias under softmax) into full-size steps that do not change the function
    ref = losses(False, False, None, steps=4)
    fast = losses(True, True, None, steps=4)
    assert fast == pytest.approx(ref, rel=1e-5)  # stated tolerance: 1e-5 relative on the loss, fp32


def short_run(amp: str, device: torch.device, params_in_bf16: bool = False, steps: int = 30):
    """train.py's step (via bench.py's construction) for `steps` steps from seed 0 on fixed random batches:
    (losses, initial weights, final weights, the trained function's output on a fixed fp32 batch)."""
    import bench
    args = bench.build_parser().parse_args(["--inch", "3", "--modch", "32", "--chmul", "1,2", "--numres", "1",
                                            "--image_size", "16", "--batchsize", "16"])
    fast = resolve_fast_path(amp, "False", "True", device)
    models = bench.build(args, device, fast).train()
    if params_in_bf16:
        models.to(torch.bfloat16)
    init = [p.detach().float().clone() for p in models.parameters()]
    g = torch.Generator().manual_seed(3)
    data = torch.randint(256, (steps, 16, 3, 16, 16), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(10, (steps, 16), generator=g).to(device)
    step, _ = bench.make_train_step(models, fast, device, (data[0], labels[0]))
    torch.manual_seed(0)
    losses = torch.stack([step(data[i], labels[i]).float() for i in range(steps)]).cpu()
    final = [p.detach().float().clone() for p in models.parameters()]

    def function(weights):
        m = bench.build(args, device, resolve_fast_path("none", "False", "True", device)).eval()
        with torch.no_grad():
            for p, w in zip(m.parameters(), weights):
                p.copy_(w)
            g = torch.Generator().manual_seed(9)
            x, t = torch.randn(32, 3, 16, 16, generator=g), torch.randint(1000, (32,), generator=g)
            return m["net"](x.to(device), t.to(device), m["cemblayer"](torch.arange(32, device=device) % 10)).cpu()
    return losses, function(init), function(final)


def bf16_vs_fp32(device: torch.device, params_in_bf16: bool = False) -> tuple[float, float]:
    """(largest relative loss difference over the run, |f_bf16 - f_fp32| / |f_fp32 - f_init| of the trained nets)."""
    loss32, f_init, f32 = short_run("none", device)
    loss16, _, f16 = short_run("bf16", device, params_in_bf16)
    return ((loss16 - loss32).abs() / loss32).max().item(), ((f16 - f32).norm() / (f32 - f_init).norm()).item()


def test_a_short_bf16_run_follows_the_fp32_run():
    # Autocast keeps fp32 master weights, so bf16 training differs from fp32 only by the rounding of activations
    # and gradients (8 significant bits, ~0.4% per element, partly averaged over the batch). Measured on this CPU
    # over 30 steps: losses within 0.05% at every step, and the trained function differs by 0.33% of what
    # training changed. Holding the parameters themselves in bf16 (a broken cast: AdamW's small steps round away)
    # measured 0.33% and 1.7%, so the bounds (4x and 3x the measured values) fail it.
    loss_diff, function_diff = bf16_vs_fp32(torch.device("cpu"))
    assert loss_diff <= 2e-3 and function_diff <= 1e-2, (loss_diff, function_diff)


def test_the_bf16_bound_catches_parameters_held_in_bf16():
    loss_diff, function_diff = bf16_vs_fp32(torch.device("cpu"), params_in_bf16=True)
    assert loss_diff > 2e-3 or function_diff > 1e-2, (loss_diff, function_diff)


def test_fast_path_defaults_per_device():
    cpu = resolve_fast_path("auto", "auto", "auto", torch.device("cpu"))
    assert cpu.amp is None and cpu.compile is False and cpu.channels_last is True
    assert resolve_fast_path("fp16", "True", "False", torch.device("cpu")).amp == torch.float16


def test_a_compiled_run_saves_plain_weights(tmp_path, monkeypatch):
    # the eager backend wraps the module exactly as inductor does (the `_orig_mod.` prefix) without minutes of codegen
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run = tmp_path / "run"
    train.main(train.build_parser().parse_args(TINY + ["--epoch", "1", "--compile", "True", "--run_dir", str(run)]))
    ckpt = torch.load(glob.glob(os.path.join(run, "checkpoints", "ckpt_1_checkpoint.pt"))[0], weights_only=True)
    assert not [k for k in ckpt["net"] if k.startswith(("_orig_mod.", "module."))]
    net, cemb = build_models(ckpt["config"])
    net.load_state_dict(ckpt["net"], strict=True)
    net.load_state_dict(ckpt["ema"]["net"], strict=True)
    cemb.load_state_dict(ckpt["cemblayer"], strict=True)


def test_a_failing_compile_says_so_once_and_trains_eager_like_an_uncompiled_run(tmp_path, monkeypatch, capsys):
    class Broken(torch.nn.Module):
        """Stands in for a compiled module whose first call fails (no compiler, unsupported op)."""

        def __init__(self, module, **options):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            self.module(*a, **k)  # draws dropout noise first: the probe must leave the RNG as it found it
            raise RuntimeError("C compiler not found\nmore detail")

    train.main(train.build_parser().parse_args(TINY + ["--epoch", "1", "--run_dir", str(tmp_path / "eager")]))
    monkeypatch.setattr(torch, "compile", Broken)
    train.main(train.build_parser().parse_args(TINY + ["--epoch", "1", "--compile", "True",
                                                       "--run_dir", str(tmp_path / "fallback")]))
    out = capsys.readouterr().out
    # one line for the training step, one for the grids' noise and one for their sampling step, and a record
    # of each
    assert out.count("failed (RuntimeError: C compiler not found); continuing eager") == 3
    records = [json.loads(line) for line in open(tmp_path / "fallback" / "metrics.jsonl")]
    assert [(r["network"], r["compiled"], r["reason"]) for r in records if r["event"] == "compile"] == [
        ("loss", False, "RuntimeError: C compiler not found"),
        ("per-image noise", False, "RuntimeError: C compiler not found"),
        ("sampling step", False, "RuntimeError: C compiler not found")]
    a, b = (torch.load(tmp_path / r / "checkpoints" / "ckpt_1_checkpoint.pt", weights_only=True)["net"]
            for r in ("eager", "fallback"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grids_and_periodic_fid_do_not_recompile(tmp_path, compiled_graphs):
    from test_sample import write_classifier
    graphs = compiled_graphs
    clf = write_classifier(tmp_path / "clf.pt")
    common = TINY + ["--compile", "True", "--sample_every", "1", "--fid_every", "1", "--fid_num", "20",
                     "--fid_features", "classifier", "--eval_classifier", str(clf), "--data_root", str(tmp_path)]
    train.main(train.build_parser().parse_args(common + ["--epoch", "1", "--run_dir", str(tmp_path / "one")]))
    once = len(graphs)
    torch._dynamo.reset()
    train.main(train.build_parser().parse_args(common + ["--epoch", "3", "--run_dir", str(tmp_path / "three")]))
    # one graph for the training step, then one for the noise of the sampler's batch and one for the sampling
    # network of grids and FID; three epochs add none
    assert graphs[:once] == ["network", "noise", "network"] and graphs[once:] == graphs[:once]


@torch._dynamo.config.patch(recompile_limit=8)  # dynamo's default, restored after the test
def test_regional_compile_compiles_every_block_past_dynamos_recompile_limit(compiled_graphs):
    import train_step
    from embedding import ConditionalEmbedding
    from speed import FastPath
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    net = Unet(3, 32, 3, (1, 2, 2, 2), 1, 16)  # 17 regions: one forward code object, 17 block configurations
    models = torch.nn.ModuleDict({"net": net, "cemblayer": ConditionalEmbedding(10, 16, 16)}).train()
    batch = (torch.randint(256, (4, 3, 16, 16), dtype=torch.uint8), torch.arange(4))
    counters.clear()
    fast = FastPath(None, True, False, compile_scope="regional")
    loss, outcome = train_step.make_loss(models, GaussianDiffusion(linear_betas(1000), "cpu"), 0.1, fast, batch,
                                         lambda line: None)
    assert outcome["compiled"] and outcome["scope"] == "regional", outcome
    # every frame dynamo met compiled (none left eager at the limit), more of them than the default limit allows
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 8 and len(compiled_graphs) > 8
    assert not counters["unimplemented"]


@torch._dynamo.config.patch(recompile_limit=1)
def test_a_recompile_limit_hit_is_seen():
    from speed import recompile_limit_hits
    torch._dynamo.reset()
    before = recompile_limit_hits()
    f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    for n in (1, 2, 3):
        f(torch.ones(n))
    assert recompile_limit_hits() > before


def test_every_run_of_the_cuda_graph_probe_starts_without_gradients(monkeypatch):
    """reduce-overhead's probe runs forward and backward three times; a run that accumulated into the gradients of
    the run before would read memory its CUDA graph replay overwrote (PyTorch issue 169545)."""
    from speed import compile_or_eager
    traced = lambda gm, inputs, **options: gm.forward  # noqa: E731  (the mode's options are inductor's)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=traced))
    module, seen = torch.nn.Linear(3, 2), []

    def probe(m):
        seen.append([p.grad for p in module.parameters()])
        m(torch.ones(4, 3)).sum().backward()
    _, outcome = compile_or_eager(module, probe, torch.device("cpu"), lambda line: None, "reduce-overhead")
    assert outcome["compiled"], outcome
    assert len(seen) == 3 and all(grad is None for run in seen for grad in run)
    assert all(p.grad is None for p in module.parameters())  # and the run that follows starts clean too
