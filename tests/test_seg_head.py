"""UNETR-style 2D decoder on the ViT: shapes, layer choice, trainability, TorchScript, DiceCE."""

import pytest
import torch
from monai.losses import DiceCELoss

from tpp_monai.backbones.vit import build_vit
from tpp_monai.heads import HEADS
from tpp_monai.heads.segmentation import UNETRDecoder2D, ViTSegmenter, build_vit_segmenter, default_layers, tokens_to_map


def _tiny(depth=4, in_chans=3):
    torch.manual_seed(0)
    return build_vit("tiny", depth=depth, img_size=32, in_chans=in_chans).eval()


def test_default_layers():
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(4) == (1, 2, 3, 4)
    assert default_layers(8) == (2, 4, 6, 8)
    assert default_layers(24) == (6, 12, 18, 24)


def test_registered():
    assert HEADS.get("unetr2d") is UNETRDecoder2D


@pytest.mark.parametrize("hw", [(32, 32), (48, 64)])
def test_output_shape_any_multiple_of_16(hw):
    seg = build_vit_segmenter(_tiny(), num_classes=3, feature_size=8)
    assert seg.decoder.layers == (1, 2, 3, 4)
    x = torch.randn(2, 3, *hw)
    assert seg(x).shape == (2, 3, *hw)


def test_bad_size_and_patch():
    seg = build_vit_segmenter(_tiny(), num_classes=2, feature_size=8)
    with pytest.raises(ValueError, match="divisible by 16"):
        seg.decoder(torch.randn(1, 3, 40, 40), [torch.randn(1, 5, 192)] * 4)
    with pytest.raises(ValueError, match="patch_size 16"):
        UNETRDecoder2D(embed_dim=192, patch_size=8)


def test_tokens_to_map_skips_prefix_tokens():
    b, d, h, w = 2, 4, 2, 3
    patches = torch.arange(b * h * w * d, dtype=torch.float32).reshape(b, h * w, d)
    tokens = torch.cat([torch.full((b, 3, d), -1.0), patches], 1)  # cls + 2 prompts in front
    m = tokens_to_map(tokens, (h, w))
    assert m.shape == (b, d, h, w)
    assert torch.equal(m[1, :, 1, 2], patches[1, 5])  # row-major token order


def test_decoder_reads_the_chosen_layers():
    vit = _tiny(depth=4)
    seg = build_vit_segmenter(vit, num_classes=2, layers=(1, 2, 3, 4), feature_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    out = vit.forward_features(x, return_layers=(1, 2, 3, 4))
    ref = seg.decoder(x, [out.hidden_states[i] for i in (1, 2, 3, 4)], out.grid)
    assert torch.allclose(seg(x), ref)
    # perturbing layer 4's hidden state changes the logits: it really is read
    feats = [out.hidden_states[i].clone() for i in (1, 2, 3, 4)]
    feats[3] += 1.0
    assert not torch.allclose(seg.decoder(x, feats, out.grid), ref)


def test_head_trains_with_frozen_backbone_and_dicece():
    vit = _tiny()
    for p in vit.parameters():
        p.requires_grad_(False)
    seg = build_vit_segmenter(vit, num_classes=2, feature_size=8)
    assert all(p.requires_grad for p in seg.decoder.parameters())
    x = torch.randn(2, 3, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.5).long()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(seg(x), y)
    loss.backward()
    assert all(p.grad is None for p in vit.parameters())
    assert all(p.grad is not None for p in seg.decoder.parameters())


def test_torchscript_trace_matches():
    seg = build_vit_segmenter(_tiny(), num_classes=2, feature_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(seg, x)
        assert torch.allclose(traced(x), seg(x), atol=1e-5)


def test_grayscale_backbone():
    seg = build_vit_segmenter(_tiny(in_chans=1), num_classes=2, feature_size=8)
    assert seg(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    assert isinstance(seg, ViTSegmenter)
