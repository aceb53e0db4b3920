"""--compat: each restored behaviour against an independent statement of what the original code did."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from conftest import TINY

import sampling
import lr_schedule
import sample
import train
from compat import Compat, parse_compat
from datasets import Pixels
from embedding import ConditionalEmbedding, set_class_table
from test_reliability import assert_identical, final_weights


def main(argv):
    return train.main(train.build_parser().parse_args(argv))


# the original's GradualWarmupScheduler on torch 2.14.1 at --epoch 100 --lr 2e-4 --multiplier 2.5 (issue 25), in 1e-4
ORIGINAL_FIRST_12 = [2.0, 2.6, 3.2, 3.8, 4.4, 5.0, 2.0, 2.0, 1.998, 1.996, 1.992, 1.988]
ORIGINAL_LAST_5 = [0.059, 0.049, 0.040, 0.031, 0.024]


def lr_trajectory(epochs, lr=2e-4, multiplier=2.5, original=True):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr * multiplier)
    sched = lr_schedule.make_lr_schedule(opt, epochs, multiplier, original)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_the_original_lr_trajectory_matches_its_measured_values():
    lrs = [v / 1e-4 for v in lr_trajectory(100)]
    assert lrs[:12] == pytest.approx(ORIGINAL_FIRST_12, abs=6e-4)
    assert lrs[-5:] == pytest.approx(ORIGINAL_LAST_5, abs=6e-4)


@pytest.mark.parametrize("epochs", [40, 61, 200])
def test_the_original_warm_up_rises_linearly_then_falls_back_to_the_base_lr(epochs):
    lr, m, warm = 3e-4, 2.5, epochs // 20
    lrs = lr_trajectory(epochs, lr, m)
    for e in range(warm + 1):
        assert lrs[e] == pytest.approx(lr * (1 + (m - 1) * e / warm), rel=1e-9)
    assert lrs[warm + 1] == pytest.approx(lr, rel=1e-9)  # the cosine restarts from the base lr, not the peak
    assert all(a > b for a, b in zip(lrs[warm + 1:], lrs[warm + 2:]))


@pytest.fixture(scope="module")
def original_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("original") / "run")
    main(TINY + ["--epoch", "2", "--interval", "1", "--compat", "original", "--run_dir", run])
    return run


def test_padding_idx_keeps_class_0_at_zero_through_training(original_run):
    ckpt = torch.load(os.path.join(original_run, "checkpoints", "ckpt_2_checkpoint.pt"), weights_only=True)
    first = torch.load(os.path.join(original_run, "checkpoints", "ckpt_1_checkpoint.pt"), weights_only=True)
    for state in (ckpt, ckpt["ema"]):
        table = state["cemblayer"]["condEmbedding.0.weight"]
        assert torch.equal(table[0], torch.zeros_like(table[0]))
        assert (table[1:].norm(dim=1) > 5).all()  # the other rows are N(0, 1) rows of width 128
    assert not torch.equal(first["cemblayer"]["condEmbedding.0.weight"][1:],
                           ckpt["cemblayer"]["condEmbedding.0.weight"][1:])  # and they train
    assert json.load(open(os.path.join(original_run, "config.json")))["compat"] == "original"


def test_the_audit_flags_the_original_baselines_class_0_on_a_real_run(original_run):
    import audit
    for weights in ("raw", "ema"):
        (report,) = audit.main(audit.build_parser().parse_args([original_run, "--weights", weights]))
        assert report["verdict"].startswith("DEAD CLASS ROW: class(es) 0 ")
        assert [r["zero"] for r in report["classes_rows"]] == [True] + [False] * 9
        assert all(r["moved"] for r in report["classes_rows"][1:])


def test_padding_idx_gives_a_loaded_row_0_no_gradient_only_weight_decay(tmp_path):
    emb = ConditionalEmbedding(10, 16, 16, padding_idx=0)
    set_class_table(emb, torch.randn(10, 16), trainable=True)
    emb(torch.arange(10).repeat(3)).square().sum().backward()
    grad = emb.table.grad
    assert torch.equal(grad[0], torch.zeros(16)) and (grad[1:].abs().sum(1) > 0).all()

    protos = torch.randn(10, 128)
    torch.save(protos, tmp_path / "protos.pt")
    out = main(TINY + ["--epoch", "1", "--mode", "proto_unfrozen", "--path_proto", str(tmp_path / "protos.pt"),
                       "--compat", "padding_idx", "--results", str(tmp_path)])
    table = out["cemblayer"].table.detach()
    # 28 AdamW steps at the first epoch's lr (2e-4) with weight decay 1e-4 and a zero gradient: a pure rescale
    torch.testing.assert_close(table[0], protos[0] * (1 - 2e-4 * 1e-4) ** 28, rtol=1e-6, atol=0)
    assert (table[1:] - protos[1:]).abs().max() > 1e-4


def original_png(x, path, stl10):
    """What the original sample.py wrote for one sample x [C, H, W] in [-1, 1], with torchvision itself."""
    if stl10:
        inverse = transforms.Compose([transforms.Normalize([0.0] * 3, [1 / 0.2471, 1 / 0.2435, 1 / 0.2616]),
                                      transforms.Normalize([-0.4914, -0.4822, -0.4465], [1.0] * 3)])
        x = inverse(x).clamp(0, 1)
    torchvision.utils.save_image(x, path, normalize=True)
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


@pytest.mark.parametrize("channels,stl10", [(1, False), (3, False), (3, True)])
def test_saved_samples_equal_the_originals_min_max_stretch(tmp_path, channels, stl10):
    torch.manual_seed(0)
    x = (torch.rand(6, channels, 8, 8) * 1.6 - 0.9).clamp(-1, 1)
    x[0] = 0.25  # a constant image: the stretch's 1e-5 floor
    ours = Compat.of("png_stretch,stl10_norm" if stl10 else "png_stretch", "stl10").pixels.decode(x)
    for i in range(len(x)):
        ref = original_png(x[i], tmp_path / f"{i}.png", stl10)
        assert torch.equal(ours[i], ref[:channels]), i  # save_image repeats one channel to three


def test_stl10_normalisation_is_the_originals_transform():
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    reference = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))(u8.float() / 255)
    torch.testing.assert_close(Compat.of("stl10_norm", "stl10").pixels.encode(u8), reference)
    assert Compat.of("original", "cifar10").pixels == Pixels(stretch=True)  # STL10's round trip is STL10's alone


def test_compat_values():
    assert parse_compat("original") == ("padding_idx", "lr_schedule", "raw_weights", "png_stretch", "stl10_norm")
    assert parse_compat("png_stretch, padding_idx") == ("padding_idx", "png_stretch")
    assert parse_compat("none") == ()
    for bad in ("padding", "original,padding_idx", ""):
        with pytest.raises(ValueError):
            parse_compat(bad)


def test_a_compat_original_run_resumes_bit_exactly(tmp_path, original_run):
    run = str(tmp_path / "run")
    main(TINY + ["--epoch", "2", "--compat", "original", "--run_dir", run, "--max_steps", "33"])  # inside epoch 2
    main(["--path_resume", run])
    assert_identical(final_weights(original_run), final_weights(run))
    log = open(os.path.join(run, "log.txt")).read()
    assert "--compat original: restored the original's padding_idx" in log and "(raw weights)" in log


def test_sample_follows_the_runs_compat(original_run, tmp_path, monkeypatch, capsys):
    def draw(self, diffusion, net, cond, shape, noise):  # unsaturated samples, as a trained model draws them
        scale = 0.3 + 0.07 * torch.arange(shape[0]).view(-1, 1, 1, 1)  # images 0-9 are one batch
        return torch.linspace(-0.6, 0.3, math.prod(shape[1:])).view(shape[1:]) * scale
    monkeypatch.setattr(sampling.Sampler, "draw", draw)
    common = ["--path", original_run, "--epoch", "2", "--genum", "10", "--genbatch", "10"]
    sample.main(sample.build_parser().parse_args(common + ["--out", str(tmp_path / "a")]))
    said = capsys.readouterr().out
    assert "raw weights" in said and "--compat original: restored" in said
    sample.main(sample.build_parser().parse_args(common + ["--out", str(tmp_path / "b"), "--compat", "none"]))
    assert "ema weights" in capsys.readouterr().out
    x = draw(None, None, None, None, (10, 1, 8, 8), None)
    for i in range(10):
        ours = torch.from_numpy(np.array(Image.open(tmp_path / "a" / f"{i}.png")))
        assert torch.equal(ours, original_png(x[i], tmp_path / f"ref{i}.png", stl10=False)[0])
        plain = torch.from_numpy(np.array(Image.open(tmp_path / "b" / f"{i}.png")))
        assert torch.equal(plain, torch.floor((x[i, 0] + 1) / 2 * 255 + 0.5).to(torch.uint8))
