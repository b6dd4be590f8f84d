"""Hugging Face peft interop, tested with ``peft`` itself: our target parameters exported as a peft adapter
folder give, through ``peft.PeftModel.from_pretrained`` on the plain backbone, the output of our model; a
folder saved by peft (``save_pretrained``) initialises our method to the same output; bad folders are refused."""

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[dev]')")

from tpp_monai.backbones.vit import build_vit  # noqa: E402
from tpp_monai.peft.target_checkpoint import save_target_checkpoint  # noqa: E402
from tpp_monai.peft.target_checkpoint import load_target_checkpoint
from tpp_monai.peft import apply_peft  # noqa: E402
from tpp_monai.peft.hf_interop import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftInteropError, export_peft_adapter, import_peft_adapter,
    load_peft_adapter)

# float32, ViT-tiny on 32 px: peft computes base(x) + scale * B(A(x)) in the same order as our hook, so the
# two graphs run the same kernels; the bound leaves room for a different GEMM blocking (~1e-7 relative)
TOL = 1e-6


def _pair(method, cfg):
    torch.manual_seed(0)
    plain = build_vit("tiny", img_size=32).eval()
    ours = copy.deepcopy(plain)
    apply_peft(ours, method, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking target parameters (LoRA B is zero at insertion)
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return plain, ours, torch.randn(2, 3, 32, 32)


@pytest.mark.filterwarnings("ignore:Unsupported layer type")  # peft probes LayerNorm for in_features
@pytest.mark.parametrize("method,cfg", [("lora", {"r": 4, "alpha": 8.0, "targets": ("attn.qkv", "mlp.fc1")}),
                                        ("ln_tuning", {})])
def test_export_runs_in_peft_and_imports_back(tmp_path, method, cfg):
    plain, ours, x = _pair(method, cfg)
    export_peft_adapter(ours, tmp_path / "adapter", base_model="tpp-monai/vit-tiny")
    with torch.no_grad():
        ref = ours(x)
        assert not torch.allclose(ref, plain(x))  # the adapter changes the output
        hf = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "adapter")).eval()
        assert (hf(x) - ref).abs().max().item() <= TOL
    # import back into a fresh backbone (the method is inserted from the adapter's config): equal tensors
    back = copy.deepcopy(plain)
    desc = load_peft_adapter(back, tmp_path / "adapter")
    assert desc["method"] == method
    theirs = {n: p for n, p in back.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[n], mine[n]) for n in mine)
    with torch.no_grad():
        assert torch.equal(back(x), ref)


def test_peft_saved_lora_initialises_our_lora(tmp_path):
    """A LoRA adapter made and saved by peft (its own names, its config file) loads into our LoRA."""
    torch.manual_seed(0)
    plain = build_vit("tiny", img_size=32).eval()
    hf = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["qkv"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = copy.deepcopy(plain)
    desc = load_peft_adapter(ours, tmp_path / "hf")
    assert desc["config"]["r"] == 2 and desc["config"]["alpha"] == 6.0 and tuple(desc["config"]["targets"]) == ("attn.qkv",)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf.eval()(x)).abs().max().item() <= TOL


def test_import_writes_a_target_checkpoint_the_bundles_load(tmp_path):
    plain, ours, x = _pair("lora", {"r": 4})
    save_target_checkpoint(tmp_path / "tpp.pt", ours)
    export_peft_adapter(tmp_path / "tpp.pt", tmp_path / "adapter")  # from the TPP stage's file, no model needed
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == [f"blocks.{i}.attn.qkv" for i in range(len(plain.blocks))]
    import_peft_adapter(tmp_path / "adapter", copy.deepcopy(plain), tmp_path / "imported.pt")
    fresh = copy.deepcopy(plain)
    apply_peft(fresh, "lora", {"r": 4})  # the bundle's own config
    load_target_checkpoint(tmp_path / "imported.pt", fresh)  # checks method, config and backbone fingerprint
    with torch.no_grad():
        assert torch.equal(fresh(x), ours(x))


def test_cli_round_trip(tmp_path):
    from tpp_monai.cli import main

    plain, ours, x = _pair("lora", {"r": 4})
    save_target_checkpoint(tmp_path / "tpp.pt", ours)
    assert main(["export-peft", str(tmp_path / "tpp.pt"), str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    with torch.no_grad():
        hf = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "adapter")).eval()
        assert (hf(x) - ours(x)).abs().max().item() <= TOL
    # import-peft builds the bundles' backbone (here the seeded random ViT-tiny) and writes its --tpp_ckpt
    assert main(["import-peft", str(tmp_path / "adapter"), str(tmp_path / "init.pt"), "--size", "tiny",
                 "--img-size", "32"]) == 0
    from tpp_monai.bundle.networks import build_peft_backbone

    net = build_peft_backbone("", size="tiny", img_size=32, peft_method="lora", peft_config={"r": 4},
                              tpp_ckpt=str(tmp_path / "init.pt"))  # checked load, as in the bundles
    got = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert got and all(torch.equal(p, dict(ours.named_parameters())[n]) for n, p in got.items())


def test_refusals(tmp_path):
    plain, ours, _ = _pair("adapter", {})
    with pytest.raises(PeftInteropError, match="no Hugging Face peft tuner"):
        export_peft_adapter(ours, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(copy.deepcopy(plain), tmp_path / "missing")
    _, lora, _ = _pair("lora", {"r": 4})
    export_peft_adapter(lora, tmp_path / "l")
    cfg_path = tmp_path / "l" / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(PeftInteropError, match="use_dora"):
        load_peft_adapter(copy.deepcopy(plain), tmp_path / "l")
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(PeftInteropError, match="IA3"):
        load_peft_adapter(copy.deepcopy(plain), tmp_path / "l")
    cfg_path.write_text(json.dumps(cfg))
    other = copy.deepcopy(plain)
    apply_peft(other, "lora", {"r": 2})  # alpha 8: another scale
    with pytest.raises(PeftInteropError, match="lora_alpha/r"):
        load_peft_adapter(other, tmp_path / "l")
    other = copy.deepcopy(plain)
    apply_peft(other, "lora", {"r": 2, "alpha": 4.0})  # same scale, other rank
    with pytest.raises(PeftInteropError, match="shape"):
        load_peft_adapter(other, tmp_path / "l")
