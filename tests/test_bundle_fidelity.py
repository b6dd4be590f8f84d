"""Resolved configs of the 2D bundles show the paper's / MedCoSS's settings (issue 11 acceptance)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bundle_parser(bundle: str, **over):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(ROOT / f"bundles/{bundle}_adapter_tpp/configs/train.json")])
    for k, v in over.items():
        p[k] = v
    return p


# ------------------------------------------------------------ UNETR taps and GlaS size (defects 6, 7)
@pytest.mark.parametrize("bundle", ["glas", "qata"])
def test_seg_bundles_unetr_taps_4_7_10_12_patch_tokens_only(bundle, monkeypatch, tmp_path):
    """The bundle's network reads blocks 4, 7, 10 and the last (MONAI UNETR / MedCoSS
    hidden_states_out[3, 6, 9] + encoder output) and feeds the decoder patch tokens only."""
    monkeypatch.chdir(ROOT)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")
    p = _bundle_parser(bundle, vit_size="tiny", vit_overrides={"depth": 12}, image_size=32, backbone_ckpt="",
                       tpp_ckpt="", bundle_root=str(tmp_path))
    net = p.get_parsed_content("network_def").eval()
    assert net.decoder.layers == (4, 7, 10, 12)
    seen = {}
    for name in ("encoder2", "encoder3", "encoder4"):
        getattr(net.decoder, name).register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0]))
    net.decoder.decoder5.register_forward_pre_hook(lambda m, a: seen.__setitem__("decoder5", a[0]))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        net(x)
        out = net.backbone.forward_features(x, return_layers=(4, 7, 10))
    grid = out.grid
    want = {"encoder2": out.hidden_states[4], "encoder3": out.hidden_states[7], "encoder4": out.hidden_states[10],
            "decoder5": out.tokens}
    for name, tokens in want.items():
        patches = tokens[:, 1:]  # the class token (index 0) never reaches the decoder
        assert torch.allclose(seen[name], patches.transpose(1, 2).reshape(1, -1, *grid), atol=1e-6), name


def test_glas_bundle_trains_and_evaluates_at_512(monkeypatch):
    """MedCoSS resizes GlaS to 512 x 512 (Preprocess/GlaS.py) and trains with batch 4 for 25,000 iterations."""
    monkeypatch.chdir(ROOT)
    p = _bundle_parser("glas")
    assert p.get_parsed_content("image_size") == 512
    assert p.get_parsed_content("batch_size") == 4 and p.get_parsed_content("num_iterations") == 25000
    for split in ("train", "eval"):
        sizes = [t.resizer.spatial_size for t in p.get_parsed_content(f"transforms#{split}").transforms
                 if type(t).__name__ == "Resized"]
        assert sizes and all(tuple(s) == (512, 512) for s in sizes), split
