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
    # MONAI UNETR / MedCoSS: hidden_states_out[3, 6, 9] (0-based) + the last block, i.e. 1-based 4/7/10/12
    assert default_layers(12) == (4, 7, 10, 12)
    assert default_layers(24) == (7, 13, 19, 24)
    assert default_layers(4) == (2, 3, 4, 4)
    assert UNETRDecoder2D().layers == (4, 7, 10, 12)


def test_registered():
    assert HEADS.get("unetr2d") is UNETRDecoder2D


@pytest.mark.parametrize("hw", [(32, 32), (48, 64)])
def test_output_shape_any_multiple_of_16(hw):
    seg = build_vit_segmenter(_tiny(), num_classes=3, feature_size=8)
    assert seg.decoder.layers == (2, 3, 4, 4)
    x = torch.randn(2, 3, *hw)
    assert seg(x).shape == (2, 3, *hw)


def test_bad_size_and_patch():
    seg = build_vit_segmenter(_tiny(), num_classes=2, feature_size=8)
    with pytest.raises(ValueError, match="divisible by 16"):
        seg.decoder(torch.randn(1, 3, 40, 40), [torch.randn(1, 5, 192)] * 4)
    with pytest.raises(ValueError, match="patch_size 16"):
        UNETRDecoder2D(embed_dim=192, patch_size=4)


def test_patch_8_decoder_makes_one_upsampling_fewer_with_unetrs_skip_resolutions():
    """8-px patches (DINO's /8 ViTs, the study's ViT-tiny at 64 px): grid H/8; the skips sit where UNETR's do
    (H/2, H/4, H/8), the deepest stage fuses at H/8, every stage gets gradient, any multiple of 8 works."""
    torch.manual_seed(0)
    vit = build_vit("tiny", depth=4, img_size=32, in_chans=3, patch_size=8).eval()
    seg = build_vit_segmenter(vit, num_classes=2, feature_size=8)
    x = torch.randn(2, 3, 40, 56)
    feats, grid = seg.features(x)
    assert grid == (5, 7)
    z = [tokens_to_map(t, grid) for t in feats]
    dec = seg.decoder
    assert dec.encoder2(z[0]).shape[-2:] == (20, 28) and dec.encoder3(z[1]).shape[-2:] == (10, 14)
    assert dec.encoder4(z[2]).shape[-2:] == (5, 7) and dec.decoder5(z[3], dec.encoder4(z[2])).shape[-2:] == (5, 7)
    out = seg(x)
    assert out.shape == (2, 2, 40, 56)
    out.square().mean().backward()
    for name in ("encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2"):
        g = [q.grad for q in getattr(dec, name).parameters() if q.grad is not None]
        assert g and sum(float(t.abs().sum()) for t in g) > 0, name
    with pytest.raises(ValueError, match="divisible by 8"):
        dec(torch.randn(1, 3, 36, 36), [torch.randn(1, 16, 192)] * 4)


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
    out = vit.forward_features(x, return_layers=(1, 2, 3, 4), cls_token=False)  # MedCoSS / MONAI: no class token
    # the last block is read after the final norm (the encoder output), as MONAI UNETR does
    ref = seg.decoder(x, [out.hidden_states[i] for i in (1, 2, 3)] + [out.tokens], out.grid)
    assert torch.allclose(seg(x), ref)
    # perturbing layer 4's hidden state changes the logits: it really is read
    feats = [out.hidden_states[i].clone() for i in (1, 2, 3)] + [out.tokens.clone()]
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


class _ViTAsMonai(torch.nn.Module):
    """Our ViT dressed as MONAI's ``ViT`` for ``monai.networks.nets.UNETR``: returns the encoder output
    and the list of *every* block's output. MONAI's ViT (``classification=False``) has no class token: the
    patch embeddings go straight through the blocks (as in MedCoSS's segmentation model)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        h = self.vit.embed(x)[0]
        hidden = []
        for blk in self.vit.blocks:
            h = blk(h)
            hidden.append(h)
        return self.vit.norm(h), hidden


@pytest.mark.parametrize("final_norm", [False, True])  # MedCoSS layout (no final norm) and timm layout
def test_matches_monai_unetr_taps(final_norm):
    """The segmenter equals MONAI's own UNETR forward (taps hidden_states_out[3, 6, 9] + encoder output,
    no class token) run on the same 12-block ViT with the same decoder weights."""
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    vit = build_vit("tiny", depth=12, img_size=32, final_norm=final_norm).eval()
    seg = build_vit_segmenter(vit, num_classes=2, feature_size=8).eval()
    assert seg.decoder.layers == (4, 7, 10, 12)
    ref = UNETR(in_channels=3, out_channels=2, img_size=(32, 32), feature_size=8, hidden_size=vit.embed_dim,
                mlp_dim=4 * vit.embed_dim, num_heads=3, spatial_dims=2, norm_name="instance", res_block=True).eval()
    ref.vit = _ViTAsMonai(vit)
    missing = ref.load_state_dict(seg.decoder.state_dict(), strict=False)
    assert not missing.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = seg(x), ref(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the old taps (1-based blocks 3/6/9), or the class token run along, give a different output: the test can fail
    old = build_vit_segmenter(vit, num_classes=2, layers=(3, 6, 9, 12), feature_size=8).eval()
    old.decoder.load_state_dict(seg.decoder.state_dict())
    with_cls = build_vit_segmenter(vit, num_classes=2, feature_size=8, cls_token=True).eval()
    with_cls.decoder.load_state_dict(seg.decoder.state_dict())
    with torch.no_grad():
        assert not torch.allclose(old(x), want, atol=1e-3)
        assert not torch.allclose(with_cls(x), want, atol=1e-4)


def test_class_token_and_prompts_never_reach_decoder():
    """VPT prompts (first in the class-token-free sequence) never reach the decoder: the maps are built from
    the last h*w tokens, and the segmentation encoder runs without a class token (MedCoSS)."""
    from tpp_monai.peft.api import apply_peft

    torch.manual_seed(0)
    vit = build_vit("tiny", depth=4, img_size=32).eval()
    apply_peft(vit, "vpt", {"num_tokens": 3})
    seg = build_vit_segmenter(vit, num_classes=2, feature_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    feats, grid = seg.features(x)
    assert all(f.shape[1] == 4 for f in feats)  # 2x2 patches: no class token, prompts already dropped by VPT
    seen = []
    orig = seg.decoder.encoder2.forward

    def spy(z):
        seen.append(z)
        return orig(z)

    seg.decoder.encoder2.forward = spy
    with torch.no_grad():
        seg(x)
    assert torch.equal(seen[0], feats[0].transpose(1, 2).reshape(1, -1, *grid))
    # the prompts still act in the class-token-free forward: other prompts, other features
    vit.blocks[0].peft_vpt_prompt.data.add_(torch.randn_like(vit.blocks[0].peft_vpt_prompt))  # (a constant shift: LayerNorm)
    assert not torch.allclose(seg.features(x)[0][0], feats[0])
