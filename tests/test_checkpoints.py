"""ViT checkpoint loading: MedCoSS / timm-MAE / DINO files written in their original key layouts.

Each reference network below is written from the published parametrisation (MedCoSS: DESIGN.md's
formula with nn.Embedding position tables and nn.MultiheadAttention blocks; MAE/DINO: the
installed ``timm`` VisionTransformer), its state dict is saved the way the original training code
saves it, and our loader must make our ViT reproduce the reference outputs to 1e-5.
"""

from __future__ import annotations

import argparse
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.backbones.weights import (
    CheckpointFormatError,
    CheckpointLoadError,
    build_vit_from_checkpoint,
    load_vit_checkpoint,
)
from tpp_monai.backbones.vit import ViTConfig, VisionTransformer
from tpp_monai.safe_io import atomic_save
from tpp_monai.pretext.mae import MAEDecoder

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

D, HEADS, DEPTH, P = 64, 4, 3, 16
DEC_D, DEC_DEPTH, DEC_HEADS = 32, 2, 4
TOL = 1e-5


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere (norm weights, biases, layer scales) so no identity hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "gamma" in name or name.endswith(".gamma"):
                p.copy_(0.5 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


# --------------------------------------------------------------------------- MedCoSS reference
class _RefLayer(nn.Module):
    """MedCoSS fused-encoder layer (pre-norm, nn.MultiheadAttention, layer scale gamma_1/gamma_2)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.linear1 = nn.Linear(d, 4 * d)
        self.linear2 = nn.Linear(4 * d, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.gamma_1 = nn.Parameter(torch.ones(d))
        self.gamma_2 = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.gamma_1 * self.self_attn(y, y, y, need_weights=False)[0]
        return x + self.gamma_2 * self.linear2(F.gelu(self.linear1(self.norm2(x))))


class _RefSTPos(nn.Module):
    def __init__(self, rows: int, d: int, frames: int = 8) -> None:
        super().__init__()
        self.spatial_pos_embed = nn.Embedding(rows, d)
        self.temporal_pos_embed = nn.Embedding(frames, d)


class _RefVideoEmbed(nn.Module):
    def __init__(self, d: int, rows_2d: int, rows_3d: int) -> None:
        super().__init__()
        self.embeddings_norm = nn.LayerNorm(d)
        self.embeddings_pos = nn.Module()
        self.embeddings_pos.position_embeddings = nn.Embedding(40, d)  # unused by the 2D path
        self.embeddings_type = nn.Embedding(1, d)  # unused
        self.embeddings_st_pos_2D = _RefSTPos(rows_2d, d)
        self.embeddings_st_pos_3D = _RefSTPos(rows_3d, d)
        self.embeddings = nn.Conv2d(3, d, kernel_size=P, stride=P)
        self.embeddings_3D = nn.Conv3d(1, d, kernel_size=P, stride=P)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(img).flatten(2).transpose(1, 2)
        n = x.shape[1]
        st = self.embeddings_st_pos_2D
        pos = st.spatial_pos_embed.weight[:n] + st.temporal_pos_embed.weight[0]  # eval: temporal row 0
        return self.embeddings_norm(x + pos)


class _RefMedCoSS(nn.Module):
    """The MedCoSS ``Unified_Model`` parameter layout, tiny, with the 2D encoder forward (eval)."""

    def __init__(self, rows_2d: int = 64, grid_2d: int = 4) -> None:
        super().__init__()
        self.fused_encoder = nn.Module()
        self.fused_encoder.layers = nn.ModuleList([_RefLayer(D, HEADS) for _ in range(DEPTH)])
        self.token_embed = nn.Module()
        self.token_embed.embeddings = nn.Embedding(50, D)
        self.video_embed = _RefVideoEmbed(D, rows_2d, rows_3d=8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_embed = nn.Linear(D, DEC_D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DEC_D))
        self.decoder_pos_embed_1D = nn.Embedding(2, D)
        self.decoder_pos_embed_2D = nn.Parameter(torch.zeros(1, grid_2d * grid_2d + 1, DEC_D))
        self.decoder_pos_embed_3D = nn.Parameter(torch.zeros(1, 9, DEC_D))
        self.decoder_blocks = nn.ModuleList([TimmBlock(DEC_D, DEC_HEADS, 4.0, qkv_bias=True) for _ in range(DEC_DEPTH)])
        self.decoder_norm = nn.LayerNorm(DEC_D, eps=1e-6)
        self.decoder_pred_2D = nn.Linear(DEC_D, P * P * 3)
        self.decoder_pred_3D = nn.Linear(DEC_D, P ** 3)
        self.mlm_head = nn.Linear(D, 50)

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        x = self.video_embed(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        outs = []
        for layer in self.fused_encoder.layers:
            x = layer(x)
            outs.append(x)
        return outs


def _medcoss_file(tmp_path, name="checkpoint-299.pth"):
    ref = _randomise(_RefMedCoSS(), seed=1)
    path = tmp_path / name
    torch.save({"model": ref.state_dict(), "optimizer": {}, "epoch": 299, "scaler": {},
                "args": argparse.Namespace(model="Unified_Model", mask_ratio=0.75, lr=1.5e-4)}, path)
    return ref, path


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("size", [64, 32])
def test_medcoss_reproduces_reference(tmp_path, size):
    ref, path = _medcoss_file(tmp_path)
    model, loaded = build_vit_from_checkpoint(path, allow_pickle=True, num_heads=HEADS)
    model.eval()
    assert loaded.format == "medcoss" and loaded.ok
    cfg = loaded.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (D, DEPTH, HEADS, P)
    assert cfg.pos_embed_mode == "first_rows" and cfg.pos_table_rows == 64 and not cfg.cls_pos
    assert cfg.embed_norm and not cfg.final_norm and cfg.layer_scale_init is not None and cfg.norm_eps == 1e-5
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref_outs = ref(x)
        out = model.forward_features(x, return_layers=range(1, DEPTH + 1))
    diffs = [_max_diff(out.hidden_states[i + 1], r) for i, r in enumerate(ref_outs)]
    diffs.append(_max_diff(out.tokens, ref_outs[-1]))  # no final norm
    print(f"MedCoSS {size}px max abs diff per block / final: {diffs}")
    assert max(diffs) < TOL


def test_medcoss_decoder_ignored_and_provenance(tmp_path):
    ref, path = _medcoss_file(tmp_path)
    loaded = load_vit_checkpoint(path, allow_pickle=True)
    sd = ref.state_dict()
    dec = loaded.decoder_state
    assert set(k for k in dec if not k.startswith("decoder_blocks.")) == {
        "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
        "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    assert torch.equal(dec["decoder_pos_embed"], sd["decoder_pos_embed_2D"])
    assert torch.equal(dec["decoder_pred.weight"], sd["decoder_pred_2D.weight"])
    for i in range(DEC_DEPTH):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            assert f"decoder_blocks.{i}.{part}.weight" in dec
    # the decoder loads into our MAE decoder (timm-MAE names) without renaming
    mae_dec = MAEDecoder(D, P, 3, (4, 4), decoder_dim=DEC_D, decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS)
    mae_dec.load_state_dict(dec, strict=True)
    ignored = " ".join(loaded.ignored)
    for k in ("video_embed.embeddings_3D.weight", "video_embed.embeddings_st_pos_3D.spatial_pos_embed.weight",
              "token_embed.embeddings.weight", "mlm_head.weight", "decoder_pred_3D.weight",
              "decoder_pos_embed_3D", "decoder_pos_embed_1D.weight", "video_embed.embeddings_type.weight",
              "video_embed.embeddings_pos.position_embeddings.weight"):
        assert k in ignored, k
    assert not any(k.startswith(("video_embed", "fused_encoder", "token_embed")) for k in loaded.backbone_state)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.source == str(path) and loaded.meta["epoch"] == 299
    assert loaded.meta["args"]["mask_ratio"] == 0.75
    assert loaded.provenance()["sha256"] == loaded.sha256


def test_medcoss_pickle_needs_opt_in(tmp_path):
    _, path = _medcoss_file(tmp_path)
    with pytest.raises(CheckpointFormatError, match="allow_pickle=True") as e:
        load_vit_checkpoint(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------ timm MAE / DINO
def _timm_vit(init_values=None, seed=2) -> TimmViT:
    return _randomise(TimmViT(img_size=32, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                              num_classes=0, init_values=init_values), seed=seed)


def _compare_timm(ref: TimmViT, model: VisionTransformer, size: int = 32) -> float:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return _max_diff(model.eval().forward_features(x).tokens, ref.forward_features(x))


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_timm_mae_reproduces_reference(tmp_path, init_values):
    ref = _timm_vit(init_values)
    dec = _randomise(MAEDecoder(D, P, 3, (2, 2), decoder_dim=DEC_D, decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS))
    path = tmp_path / "mae.pth"
    atomic_save({"model": {**ref.state_dict(), **dec.state_dict()}}, path)
    model, loaded = build_vit_from_checkpoint(path, num_heads=HEADS)
    assert loaded.format == "mae" and loaded.ok
    assert loaded.config.cls_pos and loaded.config.final_norm and loaded.config.img_size == 32
    assert (loaded.config.layer_scale_init is not None) == (init_values is not None)
    assert set(loaded.decoder_state) == set(dec.state_dict())
    assert not any(k.startswith(("decoder_", "mask_token")) for k in loaded.backbone_state)
    diff = _compare_timm(ref, model)
    print(f"timm MAE (init_values={init_values}) max abs diff: {diff}")
    assert diff < TOL
    # into an existing model of the right architecture (which differs from the reference before loading)
    other = VisionTransformer(loaded.config)
    assert _compare_timm(ref, other) > 1e-2
    again = load_vit_checkpoint(path, other)
    assert again.ok and _compare_timm(ref, other) < TOL


def test_dino_teacher_with_backbone_prefix(tmp_path):
    ref = _timm_vit(seed=3)
    sd = ref.state_dict()
    head = {"head.mlp.0.weight": torch.randn(32, D), "head.mlp.0.bias": torch.zeros(32),
            "head.last_layer.weight_g": torch.ones(100, 1), "head.last_layer.weight_v": torch.randn(100, 32)}
    teacher = {**{f"backbone.{k}": v for k, v in sd.items()}, **head}
    student = {f"module.{k}": v + 1.0 for k, v in teacher.items()}
    path = tmp_path / "dino.pth"
    atomic_save({"teacher": teacher, "student": student, "epoch": 100}, path)
    model, loaded = build_vit_from_checkpoint(path, num_heads=HEADS)
    assert loaded.format == "dino" and loaded.ok and loaded.meta["container"] == "teacher"
    assert loaded.decoder_state == {}
    assert sorted(i.split(" ")[0] for i in loaded.ignored) == sorted(head)
    diff = _compare_timm(ref, model)
    print(f"DINO teacher max abs diff: {diff}")
    assert diff < TOL
    # student only, with module.backbone. prefixes (DDP)
    st = load_vit_checkpoint({"student": {f"module.backbone.{k}": v for k, v in sd.items()}})
    assert st.format == "dino" and st.ok and "cls_token" in st.backbone_state


def test_plain_backbone_and_state_dict_container(tmp_path):
    ref = _timm_vit(seed=4)
    for obj in (ref.state_dict(), {"state_dict": ref.state_dict()}):
        model, loaded = build_vit_from_checkpoint(obj, num_heads=HEADS)
        assert loaded.format == "timm" and loaded.ok and loaded.source is None
        assert _compare_timm(ref, model) < TOL


def test_peft_model_loads_without_peft_keys_missing(tmp_path):
    from tpp_monai.peft import apply_peft

    ref = _timm_vit(seed=5)
    probe = load_vit_checkpoint(ref.state_dict(), num_heads=HEADS)
    model = VisionTransformer(probe.config)
    apply_peft(model, "adapter", bottleneck=8)
    loaded = load_vit_checkpoint(ref.state_dict(), model)
    assert loaded.ok
    assert torch.equal(model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------ errors
def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vit_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointFormatError, match="corrupt.pth") as e:
        load_vit_checkpoint(bad)
    assert "corrupt" in str(e.value)
    # a truncated real checkpoint
    good = tmp_path / "good.pth"
    atomic_save(_timm_vit().state_dict(), good)
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointFormatError, match="truncated.pth"):
        load_vit_checkpoint(trunc)
    unknown = tmp_path / "unknown.pth"
    atomic_save({"foo.weight": torch.zeros(3)}, unknown)
    with pytest.raises(CheckpointFormatError, match="Unknown ViT checkpoint layout"):
        load_vit_checkpoint(unknown)


def _model_and_state():
    ref = _timm_vit(seed=6)
    model = VisionTransformer(load_vit_checkpoint(ref.state_dict(), num_heads=HEADS).config)
    return model, dict(ref.state_dict())


def test_wrong_shape_is_named():
    model, sd = _model_and_state()
    sd["blocks.1.mlp.fc1.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointLoadError, match=r"blocks\.1\.mlp\.fc1\.bias: checkpoint \(7,\)"):
        load_vit_checkpoint(sd, model)


def test_extra_and_missing_keys_are_named():
    model, sd = _model_and_state()
    extra = dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(CheckpointLoadError, match=r"unexpected keys \(1\): blocks\.0\.attn\.q_norm\.weight"):
        load_vit_checkpoint(extra, model)
    short = {k: v for k, v in sd.items() if k != "blocks.2.norm2.bias"}
    with pytest.raises(CheckpointLoadError, match=r"missing keys \(1\): blocks\.2\.norm2\.bias"):
        load_vit_checkpoint(short, model)


def test_allow_partial_loads_and_reports():
    model, sd = _model_and_state()
    before = model.blocks[1].mlp.fc1.bias.detach().clone()
    sd["blocks.1.mlp.fc1.bias"] = torch.zeros(7)
    sd["extra.thing"] = torch.ones(2)
    del sd["blocks.2.norm2.bias"]
    loaded = load_vit_checkpoint(sd, model, allow_partial=True)
    assert loaded.unexpected == ["extra.thing"]
    assert loaded.missing == ["blocks.2.norm2.bias"]
    assert [m.split(":")[0] for m in loaded.mismatched] == ["blocks.1.mlp.fc1.bias"]
    assert torch.equal(model.blocks[1].mlp.fc1.bias, before)  # wrong-shaped tensor not loaded
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_medcoss_into_wrong_model_names_pos_embed(tmp_path):
    _, path = _medcoss_file(tmp_path)
    wrong = VisionTransformer(ViTConfig.medcoss(embed_dim=D, depth=DEPTH, num_heads=HEADS, pos_table_rows=16))
    with pytest.raises(CheckpointLoadError, match=r"pos_embed: checkpoint \(1, 64, 64\) vs model \(1, 16, 64\)"):
        load_vit_checkpoint(path, wrong, allow_pickle=True)


def test_bad_format_argument():
    with pytest.raises(CheckpointFormatError, match="Unknown checkpoint format"):
        load_vit_checkpoint({}, format="beit")
    with pytest.raises(CheckpointFormatError, match="look like 'timm'"):
        load_vit_checkpoint(_timm_vit().state_dict(), format="medcoss")


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    ref = _timm_vit(seed=7)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model, loaded = build_vit_from_checkpoint(path, num_heads=HEADS)
    assert loaded.format == "timm" and loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _compare_timm(ref, model) < TOL
