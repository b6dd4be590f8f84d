"""TorchScript export of the 2D bundles with MONAI's own ``ckpt_export`` (the model zoo's ``verify_torchscript``).

Scripting the whole network is not possible: PEFT methods are forward hooks that pass tensors through
Python-side state (``module.__dict__``, the backbone's ``ForwardContext``), which TorchScript cannot compile.
The documented export is therefore the trace fallback (``--use_trace True``), and it must accept every input
size metadata.json declares (``16*n``), not only the trace size: the ViT records its position-table resize
while tracing instead of freezing the trace-time branch. The pieces that can be scripted (the attention with
its ``split_heads``) are scripted here.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_bundles import TINY, cfg, parser_for  # noqa: E402

MEDCOSS_LAYOUT = {"depth": 2, "pos_embed_mode": "first_rows", "cls_pos": False, "pos_table_rows": 64,
                  "embed_norm": True, "final_norm": False, "layer_scale_init": 0.5}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # bundle_root resolves to bundles/<name> from the repository root
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")


def test_attention_scripts_and_matches_eager():
    """``split_heads`` is declared to return a tuple; ``unbind`` gives a list, which TorchScript rejected."""
    from tpp_monai.backbones.vit import Attention

    torch.manual_seed(0)
    attn = Attention(24, 3).eval()
    qkv = attn.qkv(torch.randn(2, 5, 24))
    parts = attn.split_heads(qkv)
    assert isinstance(parts, tuple) and len(parts) == 3 and parts[0].shape == (2, 3, 5, 8)
    # the heads are the nn.MultiheadAttention row layout: q = rows [0, D), head h = columns [h*hd, (h+1)*hd)
    assert torch.equal(parts[1][:, 2], qkv[..., 24 + 16:24 + 24])
    scripted = torch.jit.script(attn)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        assert torch.allclose(scripted(x), attn(x), atol=1e-6)


@pytest.mark.parametrize("bundle,layout,input_shape", [
    ("mhist", "timm", [1, 3, 32, 32]), ("qata", "timm", [1, 3, 32, 32]), ("qata", "medcoss", [1, 3, 32, 32]),
    ("qata", "timm", None)])
def test_traced_export_accepts_the_declared_sizes(bundle, layout, input_shape, tmp_path):
    """MONAI ckpt_export by tracing, as the README documents it (``--input_shape`` at the bundle's own image size,
    32 here) or with the shape MONAI derives from metadata.json -> the .ts file runs at other 16*n sizes."""
    from monai.bundle import ckpt_export

    over = {**TINY, "bundle_root": str(tmp_path)}
    if layout == "medcoss":
        over["vit_overrides"] = MEDCOSS_LAYOUT
    net = parser_for(bundle, **over).get_parsed_content("network_def").eval()
    with torch.no_grad():  # non-trivial target parameters and position table so a frozen branch would show
        for n, prm in net.named_parameters():
            if "peft_" in n or "pos_embed" in n:
                prm.normal_(0, 0.02)
    ckpt, ts = tmp_path / "model.pt", tmp_path / "model.ts"
    torch.save(net.state_dict(), ckpt)
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt), meta_file=cfg(bundle, "metadata.json"),
                config_file=cfg(bundle, "train.json"), use_trace=True, input_shape=input_shape, **over)
    loaded = torch.jit.load(str(ts))
    for side in (16, 32, 48, 80):  # 16*n, n = 1, 2, 3, 5 (the network was built for 32)
        x = torch.rand(2, 3, side, side)
        with torch.no_grad():
            ref, got = net(x), loaded(x)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-5), (side, (got - ref).abs().max().item())


def test_trace_records_the_position_resize_without_changing_eager_numerics():
    """At the table's own size the eager path returns the table itself; the traced resize is the identity."""
    from tpp_monai.backbones.vit import build_vit

    torch.manual_seed(0)
    vit = build_vit("tiny", depth=1, img_size=32).eval()
    assert torch.equal(vit.patch_positions((2, 2)), vit.pos_embed[:, 1:])
    traced = torch.jit.trace(vit, torch.rand(1, 3, 32, 32), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "upsample_bicubic2d" in graph or "interpolate" in graph
    for side in (32, 64):
        x = torch.rand(1, 3, side, side)
        with torch.no_grad():
            assert torch.equal(traced(x), vit(x)) or torch.allclose(traced(x), vit(x), atol=1e-6)


VIT_METHODS = ["adapter", "adaptformer", "attn_tuning", "bitfit", "dtl", "evp", "full", "linear", "ln_tuning", "lora",
               "ssf", "vpt"]


@pytest.mark.parametrize("method", VIT_METHODS)
def test_trace_of_every_vit_peft_method_follows_the_input_size(method, tmp_path):
    """``--peft_method X`` bundles export the same way: traced at 32 px, equal to eager at 16 and 48 px."""
    net = parser_for("qata", bundle_root=str(tmp_path), peft_method=method).get_parsed_content("network_def").eval()
    with torch.no_grad():
        for n, prm in net.named_parameters():
            if "peft_" in n:
                prm.normal_(0, 0.02)
        traced = torch.jit.trace(net, torch.rand(1, 3, 32, 32), check_trace=False)
        for side in (16, 48):
            x = torch.rand(2, 3, side, side)
            assert torch.allclose(traced(x), net(x), atol=1e-5), (method, side)


def _hfc_reference(x: torch.Tensor, rate: float) -> torch.Tensor:
    """EVP's high-frequency components as the EVP code writes them: zero the centred square of side
    2 * int(sqrt(H * W * rate) / 2) of the shifted spectrum, inverse FFT, |real part|."""
    import math

    h, w = x.shape[-2:]
    half = int(math.sqrt(h * w * rate) / 2)
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    if half > 0:
        spec[..., h // 2 - half: h // 2 + half, w // 2 - half: w // 2 + half] = 0
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), norm="forward").real.abs()


def test_evp_high_frequency_is_unchanged_and_traces():
    """The mask is now built from tensor ops (so a trace follows the size); values equal the reference formula."""
    from tpp_monai.peft.evp import high_frequency

    torch.manual_seed(0)
    for side in (16, 32, 48, 224):
        for rate in (0.0, 0.01, 0.25, 1.0):
            x = torch.rand(2, 3, side, side)
            assert torch.equal(high_frequency(x, rate), _hfc_reference(x, rate)), (side, rate)
    traced = torch.jit.trace(lambda t: high_frequency(t, 0.25), torch.rand(1, 3, 32, 32), check_trace=False)
    x = torch.rand(1, 3, 48, 48)
    assert torch.equal(traced(x), _hfc_reference(x, 0.25))
