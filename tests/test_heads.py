"""Linear classification head and the ViTClassifier network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tpp_monai.backbones.vit import ViTConfig, VisionTransformer
from tpp_monai.heads import HEADS
from tpp_monai.heads.classification import LinearClsHead
from tpp_monai.networks import ViTClassifier, build_vit_classifier

D = 64


def _vit() -> VisionTransformer:
    return VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=D, depth=2, num_heads=4))


def test_registered():
    assert HEADS.get("linear_cls") is LinearClsHead


def test_shape_norm_and_init():
    head = LinearClsHead(D, 5)
    assert isinstance(head.fc_norm, nn.LayerNorm) and head.fc_norm.eps == 1e-6
    assert head.head.weight.abs().max() < 1e-4 and torch.all(head.head.bias == 0)  # trunc-normal std 2e-5
    out = head(torch.randn(3, 1 + 16, D))
    assert out.shape == (3, 5)
    assert isinstance(LinearClsHead(D, 5, fc_norm=False).fc_norm, nn.Identity)


def test_pooling_values():
    tokens = torch.randn(2, 1 + 3 + 4, D)  # [cls, 3 prompts, 4 patches]
    mean = LinearClsHead(D, 2, pool="mean", fc_norm=False)
    cls = LinearClsHead(D, 2, pool="cls", fc_norm=False)
    assert torch.allclose(mean.pool_tokens(tokens), tokens[:, 1:].mean(1))
    assert torch.allclose(mean.pool_tokens(tokens, num_patches=4), tokens[:, 4:].mean(1))
    assert torch.equal(cls.pool_tokens(tokens), tokens[:, 0])
    expected = tokens[:, 4:].mean(1) @ mean.head.weight.T + mean.head.bias
    assert torch.allclose(mean(tokens, 4), expected, atol=1e-6)
    with pytest.raises(ValueError, match="pool"):
        LinearClsHead(D, 2, pool="max")
    with pytest.raises(ValueError, match="tokens"):
        mean(torch.randn(2, 5, D + 1))


def test_classifier_gradients_flow():
    model = build_vit_classifier(_vit(), num_classes=3)
    assert isinstance(model, ViTClassifier)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for name in ("head.head.weight", "head.head.bias", "head.fc_norm.weight", "backbone.blocks.0.attn.qkv.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_classifier_with_frozen_peft_backbone_trains_head_only():
    from tpp_monai.peft import apply_peft

    vit = _vit()
    apply_peft(vit, "adapter", bottleneck=8)
    model = ViTClassifier(vit, LinearClsHead(D, 4, pool="cls"))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.head.head.weight.grad is not None
    assert vit.blocks[0].attn.qkv.weight.grad is None  # frozen backbone tensor
    trainable = [n for n, p in vit.named_parameters() if p.requires_grad]
    assert trainable and all("peft_" in n for n in trainable)


@pytest.mark.filterwarnings("ignore")
def test_classifier_traces():
    model = build_vit_classifier(_vit(), num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    traced = torch.jit.trace(model, x)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-6)
