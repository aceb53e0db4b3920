import pytest
import torch
import torch.nn.functional as F

from embedding import ConditionalEmbedding
from unet import AttnBlock, Unet, check_unet_config, timestep_embedding


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_paper_architecture():
    assert n_params(Unet(3, 64, 3, (1, 2, 2, 2), 2, 128)) == 10_439_235
    assert n_params(Unet(3, 64, 3, (1, 2, 4, 4), 2, 128)) == 28_173_763
    assert n_params(ConditionalEmbedding(10, 128, 128)) == 34_304


def test_parameter_names_are_the_original_codes():
    keys = set(Unet(3, 32, 3, (1, 2), 1, 16).state_dict())
    for k in ["temb_layer.0.weight", "cemb_layer.2.bias", "downblocks.0.0.weight",
              "downblocks.1.0.block_1.0.weight", "downblocks.1.0.temb_proj.1.weight", "downblocks.1.0.cemb_proj.1.weight",
              "downblocks.1.0.block_2.3.weight", "downblocks.1.1.proj_q.weight", "downblocks.2.0.layer.weight",
              "downblocks.3.0.residual.weight", "middleblocks.1.group_norm.weight", "middleblocks.2.block_1.2.bias",
              "upblocks.1.2.layer.weight", "upblocks.3.1.proj.weight", "out.0.weight", "out.2.weight"]:
        assert k in keys, k
    assert set(ConditionalEmbedding(10, 16, 16).state_dict()) == {
        "condEmbedding.0.weight", "condEmbedding.1.weight", "condEmbedding.1.bias", "condEmbedding.3.weight",
        "condEmbedding.3.bias"}


def test_attention_equals_the_originals_bmm_form():
    torch.manual_seed(0)
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 4)
    B, C, H, W = x.shape
    h = blk.group_norm(x)
    q = blk.proj_q(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
    k = blk.proj_k(h).reshape(B, C, H * W)
    v = blk.proj_v(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
    w = F.softmax(torch.bmm(q, k) * C ** -0.5, dim=-1)
    ref = x + blk.proj(torch.bmm(w, v).view(B, H, W, C).permute(0, 3, 1, 2))
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([3]), 8)[0]
    f = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(e, torch.cat([torch.cos(3 * f), torch.sin(3 * f)]))


def test_output_shape_and_class_dependence():
    torch.manual_seed(0)
    net = Unet(1, 32, 1, (1, 2), 1, 16).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    c = torch.randn(2, 16)
    out = net(x, t, c)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, torch.zeros_like(c)))


@pytest.mark.parametrize("modch,chmul,size,msg", [(48, [1, 2], None, "multiple of 32"), (32, [1, 2, 2], 10, "halved"),
                                                   (32, [], None, "positive")])
def test_bad_configs_are_refused(modch, chmul, size, msg):
    with pytest.raises(ValueError, match=msg):
        check_unet_config(modch, chmul, size)
