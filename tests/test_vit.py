"""The ViT backbone: position-embedding interpolation, hidden states, masking, input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones.vit import ViTConfig, VisionTransformer, build_vit


def tiny(**kw):
    torch.manual_seed(0)
    return build_vit("tiny", img_size=32, depth=3, **kw).eval()


def test_position_table_interpolates_to_other_sizes():
    vit = tiny()
    table = vit.pos_embed[:, 1:]  # 2x2 grid
    assert torch.equal(vit.patch_positions((2, 2)), table)  # native grid: the table itself
    pos = vit.patch_positions((4, 6))
    expect = F.interpolate(table.reshape(1, 2, 2, -1).permute(0, 3, 1, 2), size=(4, 6), mode="bicubic",
                           align_corners=False).permute(0, 2, 3, 1).reshape(1, 24, -1)
    assert pos.shape == (1, 24, 192)
    torch.testing.assert_close(pos, expect)
    with torch.no_grad():
        out = vit.forward_features(torch.rand(2, 3, 64, 96))
    assert out.grid == (4, 6) and out.tokens.shape == (2, 25, 192)


def test_first_rows_table_uses_leading_rows_and_errors_past_the_table():
    vit = VisionTransformer(ViTConfig.medcoss(embed_dim=192, depth=2, num_heads=3, img_size=32, pos_table_rows=16))
    assert torch.equal(vit.patch_positions((3, 3)), vit.pos_embed[:, :9])
    assert vit(torch.rand(1, 3, 48, 48)).shape == (1, 10, 192)
    with pytest.raises(ValueError, match="position table has 16 rows"):
        vit(torch.rand(1, 3, 80, 80))


def test_hidden_states_are_block_outputs():
    vit = tiny()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = vit.forward_features(x, return_layers=(1, 3))
        h = torch.cat([vit.class_token(2), vit.embed(x)[0]], dim=1)
        h1 = vit.blocks[0](h)
        h3 = vit.blocks[2](vit.blocks[1](h1))
    assert sorted(out.hidden_states) == [1, 3]
    torch.testing.assert_close(out.hidden_states[1], h1)
    torch.testing.assert_close(out.hidden_states[3], h3)
    torch.testing.assert_close(out.tokens, vit.norm(h3))
    with pytest.raises(ValueError, match=r"return_layers \[4\] outside 1\.\.3"):
        vit.forward_features(x, return_layers=(4,))


def test_masking_keeps_the_chosen_tokens():
    vit = tiny()
    x = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([[3, 0], [1, 2]])
    with torch.no_grad():
        full = vit.forward_features(x, return_layers=(1,))
        masked = vit.forward_features(x, ids_keep=ids)
        tokens, _ = vit.embed(x)
    assert masked.tokens.shape == (2, 3, 192)
    # the first block only mixes visible tokens: compare with running it on the gathered tokens
    h = torch.cat([vit.class_token(2), torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, 192))], 1)
    with torch.no_grad():
        torch.testing.assert_close(vit.norm(vit.blocks[2](vit.blocks[1](vit.blocks[0](h)))), masked.tokens)
    assert not torch.allclose(full.tokens[:, 0], masked.tokens[:, 0])
    assert vit.context.image is None  # the batch is not kept alive


@pytest.mark.parametrize("shape,msg", [
    ((3, 32, 32), r"shape \(B, 3, H, W\)"),
    ((1, 1, 32, 32), r"shape \(B, 3, H, W\)"),
    ((1, 3, 30, 32), "not divisible by patch size 16"),
])
def test_wrong_input_shapes_raise(shape, msg):
    with pytest.raises(ValueError, match=msg):
        tiny()(torch.rand(*shape))


def test_unknown_size():
    with pytest.raises(KeyError, match="Known sizes: tiny"):
        build_vit("huge")
