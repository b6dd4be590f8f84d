"""PEFT capacities vs the TPP paper's "Ratio" (issue 11, defect 5), and the maths of EVP, DTL and the
adapters' placement beside MedCoSS's layer scale, each against a re-statement of the reference.

Ratios are counted on PyTorch's meta device (no allocation), with the paper's denominator (MedCoSS's
whole downstream model) and with the 2D-only one; see scripts/peft_ratios.py and docs/PEFT_RATIOS.md.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones.vit import VisionTransformer, ViTConfig
from tpp_monai.peft import apply_peft

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("peft_ratios", ROOT / "scripts" / "peft_ratios.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


PR = _load_script()


def _decimals(x: float) -> int:
    s = repr(float(x))
    return len(s.split(".")[1].rstrip("0")) if "." in s else 0


def _agrees(ours: float, paper: float, rel: float = 0.05) -> bool:
    """Within ``rel`` of the paper, or, where the paper's printed precision is coarser than ``rel``
    (0.003: one significant digit, half a unit = 17%), equal to it at that precision."""
    half_unit = 0.5 * 10 ** -_decimals(paper)
    if half_unit > rel * paper:
        return abs(ours - paper) <= half_unit
    return abs(ours - paper) <= rel * paper


# ------------------------------------------------------------------------------------------ ratios
@pytest.mark.parametrize("method", list(PR.PAPER_RATIOS))
def test_default_ratio_reproduces_paper(method):
    counts = PR.method_counts(method)
    paper_cls, paper_seg = PR.PAPER_RATIOS[method]
    assert _agrees(counts["cls_paper"].ratio, paper_cls), (method, counts["cls_paper"].ratio, paper_cls)
    assert _agrees(counts["seg_paper"].ratio, paper_seg), (method, counts["seg_paper"].ratio, paper_seg)


def test_paper_denominator_is_medcoss_whole_downstream_model():
    """VPT (10 tokens), BitFit and the linear probe reproduce the paper's printed digits exactly with
    MedCoSS's whole downstream model (3D embedding tables included), not with the 2D model alone."""
    assert PR.method_counts("linear")["cls_paper"].total == 92_756_736 + 3_074
    assert PR.method_counts("linear")["cls_2d"].total == 86_452_224 + 3_074
    for method in ("vpt", "bitfit", "linear"):
        c = PR.method_counts(method)
        for task, paper in zip(("cls", "seg"), PR.PAPER_RATIOS[method]):
            nd = _decimals(paper)
            assert round(c[f"{task}_paper"].ratio, nd) == pytest.approx(paper), (method, task)
    vpt = PR.method_counts("vpt")
    assert round(vpt["cls_2d"].ratio, 2) != 0.10 and round(vpt["seg_2d"].ratio, 2) != 2.10


def test_target_parameter_counts():
    """The capacities worked out in docs/PEFT_RATIOS.md, counted on the built modules."""
    expected = {
        "adapter": 12 * (2 * 768 * 160 + 160 + 768),
        "adaptformer": 12 * (2 * 768 * 200 + 200 + 768),
        # HFC conv 3*16*16->192, embedding tune 768->192, 12 lightweight MLPs 192->192, one shared 192->768
        "evp": (3 * 256 * 192 + 192) + (768 * 192 + 192) + 12 * (192 * 192 + 192) + (192 * 768 + 768),
        "ssf": 2 * (12 * (768 + 768 + 768 + 3072 + 768) + 768 + 768),  # no SSF on the fused qkv
        "vpt": 12 * 10 * 768,
        "bitfit": 12 * (768 + 2304 + 768 + 768 + 3072 + 768) + 768 + 768,
        "dtl": 12 * 2 * 768 * 2 + 9 * 768,
        "linear": 0,
    }
    for method, n in expected.items():
        assert PR.target_count(method) == n, method


def test_bundle_peft_configs_are_the_method_defaults():
    """The PEFT defaults live only in the method dataclasses (issue 22.3): no generated bundle restates them, so
    every bundle's network is built with the defaults that reproduce the paper's Ratio."""
    from monai.bundle import ConfigParser

    assert "peft_configs" not in json.loads((ROOT / "bundles" / "common" / "base.json").read_text())
    for train in sorted((ROOT / "bundles").glob("*/configs/train.json")):
        cfg = json.loads(train.read_text())
        if "peft_method" not in cfg or "backbone" not in cfg:
            continue  # the 3D bundles configure nnU-Net trainers, not a PEFT backbone
        assert "peft_configs" not in cfg and cfg.get("peft_config") == {}, train
        parser = ConfigParser(cfg)
        assert parser.get_parsed_content("peft_config") == {}, train


# --------------------------------------------------------------------- re-statements of the maths
def _medcoss_tiny(seed: int = 0, gamma: float = 0.05) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(ViTConfig.medcoss(img_size=32, embed_dim=48, depth=3, num_heads=3,
                                              layer_scale_init=gamma)).eval()
    return vit


def _randomise_targets(vit, method, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if vit.tpp_peft.is_target(name):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _images(seed: int = 1, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _attn_half(blk, x):
    return x + blk.ls1.gamma * blk.attn(blk.norm1(x))


def _mlp(blk, n):
    return blk.mlp.fc2(F.gelu(blk.mlp.fc1(n)))


def _tokens(vit, img, ids_keep=None):
    t, _ = vit.embed(img)
    if ids_keep is not None:
        t = torch.gather(t, 1, ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    return torch.cat([vit.cls_token.expand(img.shape[0], -1, -1), t], dim=1)


@pytest.mark.parametrize("method", ["adapter", "adaptformer"])
def test_adapters_sit_outside_the_layer_scale(method):
    """x + gamma_2 * MLP(LN x) + A(.): the new branch is not multiplied by the frozen gamma_2."""
    vit = _medcoss_tiny()
    apply_peft(vit, method, bottleneck=8)
    _randomise_targets(vit, method)
    img = _images()
    with torch.no_grad():
        got = vit(img)
        x = inside = _tokens(vit, img)
        for blk in vit.blocks:
            x = _attn_half(blk, x)
            n = blk.norm2(x)
            m = _mlp(blk, n)
            if method == "adapter":  # Houlsby: A reads the MLP output
                a = blk.mlp.peft_adapter
                branch = a.up(F.gelu(a.down(m)))
            else:  # AdaptFormer: A reads the MLP input, scaled by s
                a = blk.mlp.peft_adaptformer
                branch = 0.1 * a.up(F.relu(a.down(n)))
            x = x + blk.ls2.gamma * m + branch
        # the placement this replaces: branch inside the scaled MLP output
        for blk in vit.blocks:
            inside = _attn_half(blk, inside)
            n = blk.norm2(inside)
            m = _mlp(blk, n)
            a = getattr(blk.mlp, f"peft_{method}")
            branch = a.up(F.gelu(a.down(m))) if method == "adapter" else 0.1 * a.up(F.relu(a.down(n)))
            inside = inside + blk.ls2.gamma * (m + branch)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert (got - inside).abs().max() > 1e-2


def test_adapter_gradient_not_scaled_by_layer_scale():
    """d out / d up.bias of the last block's adapter is exactly 1 per token (not gamma_2)."""
    vit = _medcoss_tiny(gamma=0.01)
    apply_peft(vit, "adapter", bottleneck=4)
    out = vit(_images(b=1))
    out.sum().backward()
    up_bias = vit.blocks[-1].mlp.peft_adapter.up.bias
    torch.testing.assert_close(up_bias.grad, torch.full_like(up_bias, float(out.shape[1])))


def _evp_reference_hfc(img: torch.Tensor, rate: float) -> torch.Tensor:
    """EVP's ``fft`` written as the reference does: shift over all dims, mask of ones, high pass 1 - mask."""
    mask = torch.zeros(img.shape)
    w, h = img.shape[-2:]
    line = int((w * h * rate) ** 0.5 // 2)
    mask[:, :, w // 2 - line: w // 2 + line, h // 2 - line: h // 2 + line] = 1
    spec = torch.fft.fftshift(torch.fft.fft2(img, norm="forward")) * (1 - mask)
    return torch.abs(torch.fft.ifft2(torch.fft.ifftshift(spec), norm="forward").real)


@pytest.mark.parametrize("masked", [False, True])
def test_evp_matches_reference_prompt_generator(masked):
    """prompt_i = shared_up(mlp_i(hfc_embed(HFC(img)) + embed_tune(patch_embed(img)))), added to the
    patch tokens before block i: per-layer lightweight MLPs, one shared up-projection."""
    vit = _medcoss_tiny()
    apply_peft(vit, "evp", scale_factor=4)
    names = [n for n, _ in vit.named_parameters() if "peft_evp" in n]
    assert sum(".shared_up.weight" in n for n in names) == 1
    assert sum(n.endswith("peft_evp_mlp.0.weight") for n in names) == len(vit.blocks)
    _randomise_targets(vit, "evp")
    img = _images()
    ids = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(s))[:2] for s in (5, 6)]) if masked else None
    gen = vit.blocks[0].peft_evp
    with torch.no_grad():
        got = vit.forward_features(img, ids_keep=ids).tokens
        hfc = gen.hfc_embed(_evp_reference_hfc(img, 0.25)).flatten(2).transpose(1, 2)
        emb = gen.embed_tune(vit.patch_embed.proj(img).flatten(2).transpose(1, 2))
        feat = hfc + emb
        if masked:
            feat = torch.gather(feat, 1, ids.unsqueeze(-1).expand(-1, -1, feat.shape[-1]))
        x = _tokens(vit, img, ids)
        for blk in vit.blocks:
            lw = blk.peft_evp_mlp[0]
            prompt = gen.shared_up(F.gelu(lw(feat)))
            x = torch.cat([x[:, :1], x[:, 1:] + prompt], dim=1)
            y = _attn_half(blk, x)
            x = y + blk.ls2.gamma * _mlp(blk, blk.norm2(y))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_dtl_matches_reference_side_network(masked):
    """h += B_i A_i x_i (block input); after blocks >= start: z_i += dwconv(swish_beta(h)) on patches."""
    vit = _medcoss_tiny()
    apply_peft(vit, "dtl", rank=2, fusion_size=3)
    _randomise_targets(vit, "dtl")
    img = _images()
    ids = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(s))[:3] for s in (5, 6)]) if masked else None
    conv = vit.blocks[0].peft_dtl_fusion
    start = len(vit.blocks) // 2 + 1
    with torch.no_grad():
        got = vit.forward_features(img, ids_keep=ids).tokens
        x = _tokens(vit, img, ids)
        h = 0.0
        for i, blk in enumerate(vit.blocks, start=1):
            h = h + blk.peft_dtl.B(blk.peft_dtl.A(x))
            y = _attn_half(blk, x)
            x = y + blk.ls2.gamma * _mlp(blk, blk.norm2(y))
            if i >= start:
                r = h * torch.sigmoid(100.0 * h)
                patches = r[:, 1:]
                grid = torch.zeros(r.shape[0], 4, r.shape[-1])
                if masked:
                    for b in range(r.shape[0]):
                        grid[b, ids[b]] = patches[b]
                else:
                    grid = patches
                conv_out = F.conv2d(grid.transpose(1, 2).reshape(r.shape[0], -1, 2, 2), conv.weight, padding=1,
                                    groups=r.shape[-1]).flatten(2).transpose(1, 2)
                if masked:
                    conv_out = torch.stack([conv_out[b, ids[b]] for b in range(r.shape[0])])
                x = x + torch.cat([r[:, :1], conv_out], dim=1)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert math.isclose(PR.target_count("dtl", {"fusion_size": 0}), 12 * 2 * 768 * 2)
