"""STU-Net: shapes per size, official key layout, checkpoint loading, CNN PEFT identity and frozen backbone."""

import copy
import hashlib

import pytest
import torch

from tpp_monai.backbones import BACKBONES
from tpp_monai.backbones.stunet import STUNET_SIZES, STUNet, STUNetCheckpointMismatch, load_stunet_checkpoint
from tpp_monai.peft import apply_peft

STRIDES = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2  # 16^3 input -> 2^3 bottleneck


def small(in_ch=1, ncls=3, **kw):
    torch.manual_seed(0)
    return STUNet(in_ch, ncls, size="small", strides=STRIDES, **kw)


def n_params(base, blocks, in_ch=1, ncls=3):
    """Hand count of the official architecture (3x3x3 kernels)."""
    dims = [base * m for m in (1, 2, 4, 8, 16, 16)]

    def block(ci, co, sc):
        return ci * co * 27 + co + 4 * co + co * co * 27 + co + (ci * co + co if sc else 0)

    def stage(ci, co):
        return block(ci, co, True) + (blocks - 1) * block(co, co, False)

    n = stage(in_ch, dims[0]) + sum(stage(dims[d - 1], dims[d]) for d in range(1, 6))
    for u in range(5):
        lo, hi = dims[5 - u], dims[4 - u]
        n += lo * hi + hi + stage(2 * hi, hi) + hi * ncls + ncls
    return n


@pytest.mark.parametrize("size", ["small", "base", "large", "huge"])
def test_param_count_matches_hand_count(size):
    base, blocks = STUNET_SIZES[size]
    if size in ("large", "huge"):  # 0.44e9 / 1.46e9 parameters: count on the meta device
        with torch.device("meta"):
            m = STUNet(1, 3, size=size)
    else:
        m = STUNet(1, 3, size=size)
    assert sum(p.numel() for p in m.parameters()) == n_params(base, blocks)


@pytest.mark.parametrize("size", ["small", "base"])
def test_output_shapes_deep_supervision(size):
    m = STUNet(1, 3, size=size, strides=STRIDES).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 1, 16, 16, 16))
    assert [tuple(o.shape) for o in out] == [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8), (1, 3, 4, 4, 4), (1, 3, 2, 2, 2), (1, 3, 2, 2, 2)]
    m.decoder.deep_supervision = False
    with torch.no_grad():
        assert tuple(m(torch.randn(1, 1, 16, 16, 16)).shape) == (1, 3, 16, 16, 16)


def test_2d_and_registry():
    m = BACKBONES.get("stunet")(size="small", in_channels=2, num_classes=4, spatial_dims=2, strides=[[2, 2]] * 3 + [[1, 1]] * 2)
    with torch.no_grad():
        assert tuple(m.eval()(torch.randn(1, 2, 16, 16))[0].shape) == (1, 4, 16, 16)


def test_official_module_names():
    keys = set(small().state_dict())
    for k in ["conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.norm1.weight", "conv_blocks_context.0.0.conv3.weight",
              "conv_blocks_context.5.0.conv2.bias", "upsample_layers.0.conv.weight", "conv_blocks_localization.4.0.norm2.bias",
              "seg_outputs.4.weight"]:
        assert k in keys, k
    assert not any(k.startswith("decoder") for k in keys)


@pytest.mark.parametrize("key", ["network_weights", "state_dict"])
def test_checkpoint_round_trip(tmp_path, key):
    src = small().eval()
    path = tmp_path / "small_ep4k.model"
    torch.save({key: src.state_dict(), "epoch": 4000}, path)
    dst = copy.deepcopy(src)
    for p in dst.parameters():
        torch.nn.init.normal_(p)
    rep = load_stunet_checkpoint(path, dst, skip=())
    assert rep["missing"] == rep["unexpected"] == rep["mismatched"] == []
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for a, b in zip(src(x), dst.eval()(x)):
            assert torch.equal(a, b)


def test_checkpoint_skips_seg_outputs_and_adapters(tmp_path):
    src = small(ncls=105)  # pre-training head (TotalSegmentator) differs from the target task's
    path = tmp_path / "ck.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = small(ncls=3)
    apply_peft(dst, "conv_adapter")
    before = {k: v.clone() for k, v in dst.state_dict().items() if "seg_outputs" in k or "peft_" in k}
    rep = load_stunet_checkpoint(path, dst)
    assert rep["missing"] == rep["unexpected"] == rep["mismatched"] == []
    assert all(k.startswith("seg_outputs") for k in rep["skipped"]) and len(rep["skipped"]) == 10
    after = dst.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(after["conv_blocks_context.3.0.conv1.weight"], src.state_dict()["conv_blocks_context.3.0.conv1.weight"])


def test_checkpoint_refusals(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save({"state_dict": small().state_dict()}, path)
    with pytest.raises(STUNetCheckpointMismatch, match="shape mismatch"):
        load_stunet_checkpoint(path, STUNet(1, 3, size="base", strides=STRIDES))
    sd = small().state_dict()
    sd.pop("conv_blocks_context.2.0.norm1.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"network_weights": sd}, path)
    with pytest.raises(STUNetCheckpointMismatch, match=r"missing 1: conv_blocks_context\.2\.0\.norm1\.weight.*unexpected 1: extra\.weight"):
        load_stunet_checkpoint(path, small())
    rep = load_stunet_checkpoint(path, small(), strict=False)
    assert rep["missing"] == ["conv_blocks_context.2.0.norm1.weight"]


def test_pickle_needs_opt_in(tmp_path):
    import numpy as np

    path = tmp_path / "legacy.model"
    torch.save({"state_dict": small().state_dict(), "amp_grad_scaler": np.float64(1.0)}, path)
    with pytest.raises(RuntimeError, match="allow_pickle=True"):
        load_stunet_checkpoint(path, small())
    assert load_stunet_checkpoint(path, small(), allow_pickle=True)["missing"] == []


@pytest.mark.parametrize("mode", ["repeat", "average"])
def test_more_input_channels(tmp_path, mode):
    src = small(in_ch=1).eval()
    dst = small(in_ch=3).eval()
    load_stunet_checkpoint(src.state_dict(), dst, skip=(), input_channels_mode=mode)
    w = dst.state_dict()["conv_blocks_context.0.0.conv1.weight"]
    w0 = src.state_dict()["conv_blocks_context.0.0.conv1.weight"]
    assert torch.equal(w[:, 2:3], w0 / 3 if mode == "average" else w0)
    if mode == "average":  # channel-replicated input -> same output as the 1-channel model
        x = torch.randn(1, 1, 16, 16, 16)
        with torch.no_grad():
            assert torch.allclose(src(x)[0], dst(x.repeat(1, 3, 1, 1, 1))[0], atol=1e-4)


@pytest.mark.parametrize("method", ["conv_adapter_residual", "tsa", "norm_tuning", "ssf_cnn"])  # zero-init methods
def test_cnn_peft_identity_at_insertion(method):
    m = small().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = m(x)
    peft = apply_peft(m, method)
    with torch.no_grad():
        out = m(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(peft.is_target(n) for n in trainable)
    if method == "norm_tuning":
        assert all(".norm" in n for n in trainable)


def _digest(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def test_conv_adapter_trains_only_adapters_and_head():
    m = small().train()
    apply_peft(m, "conv_adapter")
    for p in m.seg_outputs.parameters():
        p.requires_grad_(True)
    before = {n: _digest(p) for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 16, 16, 16))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(m(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in m.named_parameters() if _digest(p) != before[n]}
    assert changed and all("peft_conv_adapter" in n or n.startswith("seg_outputs") for n in changed)
    assert any(n.endswith("peft_conv_adapter.up.weight") for n in changed)


def test_dino3d_updates_targets_and_projector_only():
    from tpp_monai.pretext import PRETEXT_TASKS

    m = small()
    apply_peft(m, "conv_adapter")
    before = {n: _digest(p) for n, p in m.named_parameters()}
    task = PRETEXT_TASKS.get("dino3d")(m, global_size=16, local_size=16, n_local_crops=1, out_dim=32, hidden_dim=16,
                                        bottleneck_dim=8)
    params = task.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for n, p in m.named_parameters() if "peft_" in n} | {
        id(p) for p in task.head.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    teacher_before = _digest(dict(task.teacher_backbone.named_parameters())["conv_blocks_context.1.0.peft_conv_adapter.down.weight"])
    for i in range(2):
        out = task(torch.randn(2, 1, 20, 20, 20))
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.after_step(i, 2)
    changed = {n for n, p in m.named_parameters() if _digest(p) != before[n]}
    assert changed and all("peft_" in n for n in changed)
    assert all(not p.requires_grad for p in task.teacher_backbone.parameters())
    assert _digest(dict(task.teacher_backbone.named_parameters())["conv_blocks_context.1.0.peft_conv_adapter.down.weight"]) != teacher_before
