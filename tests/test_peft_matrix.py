"""PEFT method matrix: every ViT method x backbone size (tiny / small, depth 4, 32 px).

Checks values, not just shapes: exact requires_grad sets, bit-identical frozen tensors after an
AdamW step, identity at insertion, masking + hidden states, target checkpoint round trip and
mismatch errors, merge equivalence (LoRA, SSF), LoRA on nn.MultiheadAttention, registry errors.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.backbones.vit import build_vit
from tpp_monai.peft import (
    PEFT_METHODS,
    TargetParameterMismatch,
    apply_peft,
    backbone_fingerprint,
    get_peft,
    load_target_state_dict,
    merge_peft,
    target_parameter_names,
    target_state_dict,
)

IMG, DEPTH, B = 32, 4, 2
SIZES = ["tiny", "small"]
METHODS = ["adapter", "adaptformer", "vpt", "evp", "ssf", "bitfit", "lora", "dtl", "linear", "full"]
IDENTITY = [m for m in METHODS if m != "vpt"]
#: small configs (fast); the matrix also runs every method once with its defaults (test_defaults_*)
CONFIGS = {
    "adapter": {"bottleneck": 8},
    "adaptformer": {"bottleneck": 8},
    "vpt": {"num_tokens": 3},
    "evp": {"scale_factor": 8},
    "lora": {"r": 4, "targets": ("attn.qkv", "attn.proj", "mlp.fc1")},
    "dtl": {"rank": 4},
}
#: a second config whose target tensors have other shapes or names -> TargetParameterMismatch
MISMATCH = {
    "adapter": ({"bottleneck": 8}, {"bottleneck": 16}, "mlp.peft_adapter"),
    "adaptformer": ({"bottleneck": 8}, {"bottleneck": 4}, "mlp.peft_adaptformer"),
    "vpt": ({"num_tokens": 3}, {"num_tokens": 5}, "peft_vpt_prompt"),
    "evp": ({"scale_factor": 8}, {"scale_factor": 4}, "peft_evp"),
    "ssf": ({}, {"patch_embed": False}, "patch_embed.proj.peft_ssf_scale"),
    "lora": ({"r": 4}, {"r": 2}, "attn.qkv.peft_lora_A"),
    "dtl": ({"rank": 4}, {"rank": 2}, "peft_dtl.A.weight"),
}


def vit(size: str = "tiny", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_vit(size, img_size=IMG, depth=DEPTH).eval()


def with_method(size: str, method: str, seed: int = 0, **cfg) -> nn.Module:
    m = vit(size, seed)
    apply_peft(m, method, **{**CONFIGS.get(method, {}), **cfg})
    return m


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def visible(seed: int = 2, n: int = 4, k: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])


def tensor_hashes(model: nn.Module) -> dict[str, str]:
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach().cpu().contiguous()
        out[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def expected_targets(method: str, names: list[str]) -> set[str]:
    """The target set worked out independently of ``is_target``."""
    if method == "full":
        return set(names)
    if method == "linear":
        return set()
    if method == "bitfit":
        return {n for n in names if n.endswith(".bias")}
    return {n for n in names if ".peft_" in n}


def train_step(model: nn.Module, head: nn.Module, lr: float = 1e-2, ids_keep=None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    out = model.forward_features(images(), ids_keep=ids_keep)
    loss = F.cross_entropy(head(out.tokens[:, 0]), torch.tensor([0, 1]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


# ------------------------------------------------------------------------------ freeze and train
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_exact_trainable_set_and_frozen_backbone_after_step(method, size):
    model = with_method(size, method)
    head = nn.Linear(model.embed_dim, 2)
    names = [n for n, _ in model.named_parameters()]
    expected = expected_targets(method, names)
    if method not in ("linear",):
        assert expected, f"{method} inserted no target parameters"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert set(target_parameter_names(model)) == expected
    assert {n for n in names if get_peft(model).is_target(n)} == expected
    assert all(p.requires_grad for p in head.parameters())

    before = tensor_hashes(model)
    fp = backbone_fingerprint(model)
    head_before = head.weight.detach().clone()
    targets_before = target_state_dict(model)
    loss = train_step(model, head)
    assert torch.isfinite(loss)
    after = tensor_hashes(model)
    frozen = [n for n in before if n not in expected]
    changed_frozen = [n for n in frozen if before[n] != after[n]]
    assert not changed_frozen, f"frozen backbone tensors changed: {changed_frozen[:5]}"
    assert backbone_fingerprint(model) == fp
    assert not torch.equal(head.weight, head_before)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n, v in target_state_dict(model).items() if not torch.equal(v, targets_before[n])}
    with_grad = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert moved == with_grad  # AdamW (no decay) moves exactly the tensors that got a gradient
    if expected:
        assert moved, f"{method}: no target parameter changed after a step"


def test_freeze_check_catches_a_leak():
    """The comparison above fails if a single backbone tensor is left trainable by mistake."""
    model = with_method("tiny", "lora")
    model.blocks[0].norm1.weight.requires_grad_(True)  # a broken freeze
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable != expected_targets("lora", names)
    before = tensor_hashes(model)
    train_step(model, nn.Linear(model.embed_dim, 2))
    assert before["blocks.0.norm1.weight"] != tensor_hashes(model)["blocks.0.norm1.weight"]


# ------------------------------------------------------------------------------ identity at insertion
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_insertion_and_masking(method, size):
    plain = vit(size)
    model = copy.deepcopy(plain)
    apply_peft(model, method, **CONFIGS.get(method, {}))
    x, ids = images(), visible()
    with torch.no_grad():
        ref = plain.forward_features(x, return_layers=(1, DEPTH))
        out = model.forward_features(x, return_layers=(1, DEPTH))
        ref_m = plain.forward_features(x, ids_keep=ids, return_layers=(2,))
        out_m = model.forward_features(x, ids_keep=ids, return_layers=(2,))
    d = model.embed_dim
    assert out.tokens.shape == (B, 1 + 4, d) and out_m.tokens.shape == (B, 1 + 2, d)
    assert sorted(out.hidden_states) == [1, DEPTH] and out_m.hidden_states[2].shape == (B, 3, d)
    if method == "vpt":  # not zero-init: prompts change the output, also under masking
        assert (out.tokens - ref.tokens).abs().max() > 1e-3
        assert (out_m.tokens - ref_m.tokens).abs().max() > 1e-3
    else:
        for a, b in [(out.tokens, ref.tokens), (out_m.tokens, ref_m.tokens),
                     (out.hidden_states[1], ref.hidden_states[1]), (out_m.hidden_states[2], ref_m.hidden_states[2])]:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_masked_training_step_and_class_token(method):
    """Under MAE masking the targets get gradients; the class token stays at index 0."""
    model = with_method("tiny", method)
    head = nn.Linear(model.embed_dim, 2)
    before = tensor_hashes(model)
    loss = train_step(model, head, ids_keep=visible())
    assert torch.isfinite(loss)
    expected = expected_targets(method, list(before))
    assert all(before[n] == h for n, h in tensor_hashes(model).items() if n not in expected)
    # masking only drops patch tokens: the class-token output does not depend on which patch is dropped
    # when every patch is kept (ids = all, in a permuted order)
    x = images()
    perm = torch.stack([torch.randperm(4) for _ in range(B)])
    with torch.no_grad():
        a = model.forward_features(x).tokens[:, 0]
        b = model.forward_features(x, ids_keep=perm).tokens[:, 0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["adaptformer", "vpt", "evp", "ssf", "bitfit", "lora", "dtl"])
def test_defaults_deepcopy_after_forward_and_trace(method):
    model = vit("tiny")
    apply_peft(model, method)  # default config
    head = nn.Linear(model.embed_dim, 2)
    train_step(model, head, lr=1e-1)  # non-trivial target values
    x = images(3)
    model.forward_features(x, ids_keep=visible())  # a pass with grad: no graph tensors may stay behind
    twin = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(twin(x), ref, atol=0, rtol=0)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), ref, atol=1e-6, rtol=0)
    assert model.context.extras == {} and model.context.image is None


# ------------------------------------------------------------------------------ target checkpoints
@pytest.mark.parametrize("method", METHODS)
def test_target_state_dict_round_trip(method):
    model = with_method("tiny", method)
    train_step(model, nn.Linear(model.embed_dim, 2), lr=5e-2)
    state = target_state_dict(model)
    assert set(state) == set(target_parameter_names(model))
    fresh = with_method("tiny", method, seed=123)  # other random init of the target parameters
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in state}, strict=False)
    load_target_state_dict(fresh, state)
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("method", sorted(MISMATCH))
def test_mismatched_target_state_dict_names_the_tensor(method):
    cfg_a, cfg_b, tensor = MISMATCH[method]
    a = vit("tiny")
    apply_peft(a, method, **cfg_a)
    b = vit("tiny")
    apply_peft(b, method, **cfg_b)
    with pytest.raises(TargetParameterMismatch, match=tensor.replace(".", r"\.")):
        load_target_state_dict(b, target_state_dict(a))


def test_bitfit_mismatch_on_backbone_without_qkv_bias():
    a = with_method("tiny", "bitfit")
    torch.manual_seed(0)
    b = build_vit("tiny", img_size=IMG, depth=DEPTH, qkv_bias=False)
    apply_peft(b, "bitfit")
    with pytest.raises(TargetParameterMismatch, match=r"blocks\.0\.attn\.qkv\.bias"):
        load_target_state_dict(b, target_state_dict(a))


# ------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method,cfg", [
    ("lora", {"r": 4, "targets": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}),
    ("ssf", {}),
])
def test_merge_equivalence_after_training(method, cfg, size):
    plain_keys = set(vit(size).state_dict())
    model = vit(size)
    apply_peft(model, method, **cfg)
    train_step(model, nn.Linear(model.embed_dim, 2), lr=5e-2)
    x = images(5)
    with torch.no_grad():
        hooked = model.forward_features(x, return_layers=(2,))
        plain_out = vit(size)(x)
    assert (hooked.tokens - plain_out).abs().max() > 1e-4  # training really changed the function
    merged = merge_peft(model, inplace=False)
    with torch.no_grad():
        m_out = merged.forward_features(x, return_layers=(2,))
    torch.testing.assert_close(m_out.tokens, hooked.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m_out.hidden_states[2], hooked.hidden_states[2], atol=1e-5, rtol=1e-5)
    assert not [n for n, _ in merged.named_parameters() if "peft_" in n]
    assert set(merged.state_dict()) == plain_keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in merged.modules())
    with pytest.raises(RuntimeError, match="No PEFT method"):
        get_peft(merged)
    assert get_peft(model).name == method  # inplace=False left the hooked model alone


def test_merge_trivial_and_unsupported():
    for method in ("bitfit", "linear", "full"):
        model = with_method("tiny", method)
        assert merge_peft(model) is model
    with pytest.raises(NotImplementedError, match="adapter"):
        merge_peft(with_method("tiny", "adapter"))


# ------------------------------------------------------------------------------ LoRA on nn.MultiheadAttention
class ToyMHA(nn.Module):
    """An arbitrary model: a raw nn.MultiheadAttention plus a stock nn.TransformerEncoderLayer."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.out(self.layer(h).mean(1))


def test_lora_on_multihead_attention_identity_train_merge():
    torch.manual_seed(0)
    plain = ToyMHA().eval()
    model = copy.deepcopy(plain)
    apply_peft(model, "lora", r=2, targets=("inp",))
    names = set(target_parameter_names(model))
    assert names == {
        "inp.peft_lora_A", "inp.peft_lora_B", "mha.peft_lora_A", "mha.peft_lora_B",
        "layer.self_attn.peft_lora_A", "layer.self_attn.peft_lora_B",
    }
    assert model.mha.peft_lora_B.shape == (48, 2) and model.mha.peft_lora_A.shape == (2, 16)
    x = torch.randn(3, 5, 4)
    with torch.no_grad():  # eval + no_grad: the encoder layer's fused fast path must stay off
        torch.testing.assert_close(model(x), plain(x), atol=1e-6, rtol=1e-5)
    before = tensor_hashes(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    for _ in range(2):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = tensor_hashes(model)
    assert all(before[n] == after[n] for n in before if n not in names)
    assert all(before[n] != after[n] for n in names)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        y = model(x)
        assert (y - plain(x)).abs().max() > 1e-4
        torch.testing.assert_close(twin(x), y, atol=0, rtol=0)
        torch.testing.assert_close(torch.jit.trace(model, x, check_trace=False)(x), y, atol=1e-6, rtol=0)
        merged = merge_peft(model)
        assert type(merged.mha) is nn.MultiheadAttention and type(merged.layer.self_attn) is nn.MultiheadAttention
        assert set(merged.state_dict()) == set(plain.state_dict())
        torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)


def test_lora_rejects_mha_out_proj_and_no_match():
    with pytest.raises(TypeError, match="MultiheadAttention"):
        apply_peft(ToyMHA(), "lora", targets=("mha.out_proj",))
    with pytest.raises(TypeError, match="found no nn.Linear"):
        apply_peft(nn.Sequential(nn.Linear(2, 2)), "lora", targets=("qkv",))


# ------------------------------------------------------------------------------ registry errors
def test_unknown_method_and_option():
    with pytest.raises(KeyError, match=r"Known PEFT methods: .*adaptformer.*lora.*vpt"):
        apply_peft(vit(), "loraa")
    with pytest.raises(TypeError, match=r"no option\(s\) \['rank'\]"):
        apply_peft(vit(), "lora", rank=4)
    for m in METHODS:
        assert m in PEFT_METHODS
    assert not PEFT_METHODS.get("full").tpp_supported and not PEFT_METHODS.get("linear").tpp_supported
