"""The optimised path computes what the straightforward one does; compiled runs save plain checkpoints."""
import functools
import glob
import os

import pytest
import torch

from conftest import TINY

import train
from checkpoints import build_models
from diffusion import GaussianDiffusion, linear_betas
from runtime import adamw, resolve_fast_path
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


def test_bf16_autocast_loss_stays_close():
    ref = losses(False, False, None, steps=1)
    bf16 = losses(True, True, torch.bfloat16, steps=1)
    assert bf16[0] == pytest.approx(ref[0], rel=2e-2)  # stated tolerance: 2% relative, bf16 rounding


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
    # one line for the training step, one for the sampling network of the grids
    assert out.count("torch.compile failed (RuntimeError: C compiler not found); continuing eager") == 2
    a, b = (torch.load(tmp_path / r / "checkpoints" / "ckpt_1_checkpoint.pt", weights_only=True)["net"]
            for r in ("eager", "fallback"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grids_and_periodic_fid_do_not_recompile(tmp_path, monkeypatch):
    from test_sample import write_classifier
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    clf = write_classifier(tmp_path / "clf.pt")
    common = TINY + ["--compile", "True", "--sample_every", "1", "--fid_every", "1", "--fid_num", "20",
                     "--fid_features", "classifier", "--eval_classifier", str(clf), "--data_root", str(tmp_path)]
    torch._dynamo.reset()
    train.main(train.build_parser().parse_args(common + ["--epoch", "1", "--run_dir", str(tmp_path / "one")]))
    once = len(graphs)
    torch._dynamo.reset()
    train.main(train.build_parser().parse_args(common + ["--epoch", "3", "--run_dir", str(tmp_path / "three")]))
    # one graph for the training step, one for the sampling network of grids and FID; three epochs add none
    assert once == 2 and len(graphs) == 2 * once
