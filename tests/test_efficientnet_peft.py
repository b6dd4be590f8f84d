"""CNN PEFT (Conv-Adapter, TSA, BatchNorm tuning, BitFit, SSF) on the EfficientNet-Lite0 encoder: exact target sets,
identity at insertion, a frozen backbone after training steps (BatchNorm statistics included), target-checkpoint
round trips, and each method's placement against a re-statement of its maths (64 px, random weights in the file
layout)."""

from __future__ import annotations

import copy
import hashlib
import re

import pytest
import torch
import torch.nn.functional as F
from test_efficientnet import random_file_state
from torch import nn

from tpp_monai.backbones.efficientnet import EfficientNetLite0Encoder
from tpp_monai.backbones.efficientnet_weights import load_efficientnet_lite0_weights
from tpp_monai.peft import apply_peft, get_peft, target_parameter_names, target_state_dict
from tpp_monai.peft.conv_adapter import adapter_width

METHODS = ["conv_adapter", "conv_adapter_residual", "tsa", "norm_tuning", "bitfit", "ssf_cnn"]
#: identity-at-insertion configs (Conv-Adapter's reference init alpha = 1 is not zero-init: alpha_init=0)
ZERO = {"conv_adapter": {"alpha_init": 0.0}}
#: (name, in, out, kernel of the first conv, stride, expanded) of the 16 blocks of Lite0, stage by stage
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BLOCKS = [(f"model.blocks.{s}.{j}", cin if j == 0 else cout, cout, k, st if j == 0 else 1, e)
          for s, (r, k, st, e, cin, cout) in enumerate(STAGES) for j in range(r)]
IMG = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def encoder(seed: int = 0, **kw) -> EfficientNetLite0Encoder:
    torch.manual_seed(seed)
    enc = EfficientNetLite0Encoder(**kw)
    load_efficientnet_lite0_weights(enc, random_file_state(seed, torch.float32))
    return enc.eval()


def images(seed: int = 1, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def hashes(model: nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def expected_targets(method: str, enc: nn.Module) -> set[str]:
    """The target set worked out from the architecture, independently of ``is_target``."""
    names = [n for n, _ in enc.named_parameters()]
    if method in ("conv_adapter", "conv_adapter_residual"):
        out = {n for n in names if ".peft_conv_adapter." in n}
        assert {n.split(".peft_conv_adapter.")[0] for n in out} == {b[0] for b in BLOCKS}  # one per block
        return out
    if method == "tsa":
        return {"model.conv_stem.peft_tsa.weight"} | {f"{b[0]}.conv_dw.peft_tsa.weight" for b in BLOCKS}
    if method == "norm_tuning":
        return {n for n in names if re.search(r"(^model\.bn1|\.bn\d)\.(weight|bias)$", n)}
    if method == "bitfit":
        return {n for n in names if n.endswith(".bias")}
    if method == "ssf_cnn":
        mods = [n for n, m in enc.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        return {f"{n}.peft_ssf_{p}" for n in mods for p in ("scale", "shift")}
    raise KeyError(method)


def step(enc: nn.Module, head: nn.Module, steps: int = 2, lr: float = 5e-2) -> None:
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    enc.train()
    for i in range(steps):
        loss = F.cross_entropy(head(enc(images(10 + i))[-1]).mean((2, 3)), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_insertion_and_exact_targets(method):
    plain = encoder()
    enc = copy.deepcopy(plain)
    peft = apply_peft(enc, method, **ZERO.get(method, {}))
    x = images()
    with torch.no_grad():
        ref, out = plain(x), enc(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    want = expected_targets(method, enc)
    assert want and {n for n, p in enc.named_parameters() if p.requires_grad} == want
    assert set(target_parameter_names(enc)) == want and all(peft.is_target(n) for n in want)


def test_conv_adapter_reference_init_changes_the_output():
    plain, enc = encoder(), encoder()
    apply_peft(enc, "conv_adapter")  # alpha = 1, PyTorch's default conv init (the reference's)
    with torch.no_grad():
        assert (enc(images())[-1] - plain(images())[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_frozen_backbone_and_its_batchnorm_statistics_after_training(method):
    enc = encoder()
    apply_peft(enc, method)
    head = nn.Conv2d(320, 2, 1)
    want = expected_targets(method, enc)
    before, targets = hashes(enc), target_state_dict(enc)
    step(enc, head)
    after = hashes(enc)
    changed_frozen = [n for n in before if n not in want and before[n] != after[n]]
    assert not changed_frozen, changed_frozen[:5]  # running_mean / running_var / num_batches_tracked included
    moved = {n for n, v in target_state_dict(enc).items() if not torch.equal(v, targets[n])}
    assert moved == want or (method == "tsa" and moved)  # TSA: zero-init 1x1s all get gradients after step 1
    assert moved <= want


def test_batchnorm_statistics_update_only_when_asked():
    enc = encoder(bn_stats="update")
    apply_peft(enc, "bitfit")
    before = hashes(enc)
    step(enc, nn.Conv2d(320, 2, 1), steps=1)
    assert before["model.bn1.running_mean"] != hashes(enc)["model.bn1.running_mean"]
    with pytest.raises(ValueError, match="bn_stats"):
        EfficientNetLite0Encoder(bn_stats="train")


@pytest.mark.parametrize("method", METHODS)
def test_target_checkpoint_round_trip_and_refusals(method, tmp_path):
    from tpp_monai.peft.target_checkpoint import load_target_checkpoint, save_target_checkpoint
    from tpp_monai.safe_io import CheckpointMismatch

    enc = encoder()
    apply_peft(enc, method)
    step(enc, nn.Conv2d(320, 2, 1))
    path = save_target_checkpoint(tmp_path / "t.pt", enc)
    fresh = encoder()  # the same pre-trained backbone, new random target parameters
    torch.manual_seed(123)
    apply_peft(fresh, method)
    load_target_checkpoint(path, fresh)
    x = images(3)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fresh(x), enc(x)))
    other = encoder(seed=5)  # another backbone
    apply_peft(other, method)
    with pytest.raises(CheckpointMismatch, match="different backbone"):
        load_target_checkpoint(path, other)
    imnet = encoder(input_norm="imagenet")  # the same weights in another pixel space
    apply_peft(imnet, method)
    with pytest.raises(CheckpointMismatch, match="input_mean"):
        load_target_checkpoint(path, imnet)


# ------------------------------------------------------------------------------------------- placements
def grouped_conv_by_group(x, w, b, stride, padding):
    """A grouped convolution written group by group (groups = out channels of ``w``)."""
    g, per = w.shape[0], w.shape[1]
    return torch.cat([F.conv2d(x[:, i * per:(i + 1) * per], w[i:i + 1], b[i:i + 1], stride, padding)
                      for i in range(g)], dim=1)


@pytest.mark.parametrize("act", ["relu", "block"])
@pytest.mark.parametrize("idx", [0, 1, 3])  # depth-wise separable (k 3, s 1), inverted residual s 2, k 5 s 2
def test_conv_adapter_is_parallel_to_the_whole_mbconv_block(idx, act):
    """Reference placement for inverted residuals: block(x) + alpha * up(act(down(x))), down = grouped conv with
    the block's first conv's kernel (1x1 after expansion; the depth-wise k x k without), the block's stride."""
    plain = encoder()
    enc = copy.deepcopy(plain)
    apply_peft(enc, "conv_adapter", act=act)
    name, cin, cout, k, stride, e = BLOCKS[idx]
    s, j = (int(v) for v in name.split(".")[2:4])
    blk, ref_blk = enc.model.blocks[s][j], plain.model.blocks[s][j]
    a = blk.peft_conv_adapter
    w = adapter_width(cin, 8)
    k_first = 1 if e != 1 else k
    assert a.down.weight.shape == (w, cin // w, k_first, k_first) and a.up.weight.shape == (cout, w, 1, 1)
    assert isinstance(a.act, nn.ReLU6 if act == "block" else nn.ReLU)
    with torch.no_grad():
        a.alpha.copy_(torch.linspace(0.5, 2.0, cout))
        x = torch.randn(2, cin, 16, 16)
        h = grouped_conv_by_group(x, a.down.weight, a.down.bias, stride, (k_first - 1) // 2)
        h = h.clamp(0, 6) if act == "block" else h.clamp_min(0)
        branch = torch.einsum("bihw,oi->bohw", h, a.up.weight.flatten(1)) + a.up.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(blk(x), ref_blk(x) + branch * a.alpha.view(1, -1, 1, 1), atol=1e-5, rtol=1e-5)


def test_tsa_parallel_1x1_beside_the_stem_and_the_depthwise_convs():
    """Stem (groups 1): conv(x) + W x[::2, ::2]; depth-wise conv: conv(x) + w_c * x_c[::s, ::s] per channel."""
    plain = encoder()
    enc = copy.deepcopy(plain)
    apply_peft(enc, "tsa")
    stem, dw = enc.model.conv_stem, enc.model.blocks[2][0].conv_dw  # 3x3 s2 (TF SAME), 5x5 depth-wise s2
    assert stem.peft_tsa.weight.shape == (32, 3, 1, 1) and dw.peft_tsa.weight.shape == (144, 1, 1, 1)
    with torch.no_grad():
        stem.peft_tsa.weight.normal_()
        dw.peft_tsa.weight.normal_()
        x = torch.randn(2, 3, 32, 32)
        want = plain.model.conv_stem(x) + torch.einsum("bihw,oi->bohw", x[..., ::2, ::2], stem.peft_tsa.weight.flatten(1))
        torch.testing.assert_close(stem(x), want, atol=1e-5, rtol=1e-5)
        y = torch.randn(2, 144, 15, 16)  # odd and even sides
        want = plain.model.blocks[2][0].conv_dw(y) + y[..., ::2, ::2] * dw.peft_tsa.weight.view(1, -1, 1, 1)
        torch.testing.assert_close(dw(y), want, atol=1e-5, rtol=1e-5)
    n_tsa = sum(p.numel() for n, p in enc.named_parameters() if "peft_tsa" in n)
    assert n_tsa == 3 * 32 + sum(cin * e for _, cin, _, _, _, e in BLOCKS)  # stem + one weight per dw channel


def test_ssf_sits_between_batchnorm_and_its_activation():
    """timm's BatchNormAct2d applies ReLU6 itself: SSF must scale the normalised map, not the activated one."""
    plain = encoder()
    enc = copy.deepcopy(plain)
    apply_peft(enc, "ssf_cnn")
    bn, ref = enc.model.bn1, plain.model.bn1
    with torch.no_grad():
        bn.peft_ssf_scale.uniform_(0.5, 1.5)
        bn.peft_ssf_shift.normal_()
        x = torch.randn(2, 32, 8, 8)
        normed = F.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias, False, 0.0, ref.eps)
        want = (normed * bn.peft_ssf_scale.view(1, -1, 1, 1) + bn.peft_ssf_shift.view(1, -1, 1, 1)).clamp(0, 6)
        torch.testing.assert_close(bn(x), want, atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(enc)  # the teacher's hooks read the teacher's parameters
        bn.peft_ssf_shift.add_(1.0)
        assert not torch.allclose(twin.model.bn1(x), bn(x))


@pytest.mark.parametrize("method", ["conv_adapter", "ssf_cnn", "tsa"])
def test_deepcopy_and_trace(method):
    enc = encoder()
    apply_peft(enc, method)
    step(enc, nn.Conv2d(320, 2, 1), steps=1)
    x = images(4)
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        ref = enc(x)
        assert all(torch.equal(a, b) for a, b in zip(twin(x), ref))
        traced = torch.jit.trace(enc, x, check_trace=False, strict=False)
        for a, b in zip(traced(x), ref):  # the trace runs Conv-Adapter's grouped conv, eager its "taps" form
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_conv_adapter_parameter_count_hand_count():
    enc = encoder()
    apply_peft(enc, "conv_adapter")
    got = sum(p.numel() for n, p in enc.named_parameters() if "peft_" in n)

    def one(cin, cout, k):
        w = adapter_width(cin, 8)
        return w * (cin // w) * k * k + w + cout * w + cout + cout  # down (+bias), up (+bias), alpha

    assert got == sum(one(cin, cout, 1 if e != 1 else k) for _, cin, cout, k, _, e in BLOCKS) == 36_534


def test_peft_inside_monai_flexible_unet_and_the_cnn_family():
    from monai.networks.nets import FlexibleUNet

    from tpp_monai.peft.registry import methods_for

    assert {"conv_adapter", "tsa", "norm_tuning", "bitfit", "ssf_cnn"} <= set(methods_for("cnn", tpp=True))
    net = FlexibleUNet(3, 2, backbone="tpp-efficientnet-lite0", pretrained=False)
    plain = copy.deepcopy(net).eval()
    apply_peft(net.encoder, "conv_adapter", alpha_init=0.0)
    assert get_peft(net.encoder).name == "conv_adapter"
    x = images()
    with torch.no_grad():
        assert torch.equal(net.eval()(x), plain(x))
    net.train()
    assert not any(m.training for m in net.encoder.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in net.decoder.modules() if isinstance(m, nn.BatchNorm2d))


def test_ratio_table_counts():
    """scripts/cnn_peft_ratios.py (the table in docs/PEFT_RATIOS.md) against counts from the architecture."""
    from conftest import load_script

    rows = {r["method"]: r for r in load_script("cnn_peft_ratios").ratios()}
    bn_channels = 32 + sum(cin * e * (2 if e != 1 else 1) + cout for _, cin, cout, _, _, e in BLOCKS)
    convs = 32 + sum(cin * e * (2 if e != 1 else 1) + cout for _, cin, cout, _, _, e in BLOCKS)  # out channels
    assert rows["bitfit"]["target"] == bn_channels == 9_864 * 2  # BN biases only: the convs have none
    assert rows["norm_tuning"]["target"] == 2 * bn_channels
    assert rows["ssf_cnn"]["target"] == 2 * (convs + bn_channels)
    assert rows["tsa"]["target"] == 96 + sum(cin * e for _, cin, _, _, _, e in BLOCKS) == 9_056
    assert rows["conv_adapter"]["target"] == 36_534 and rows["linear"]["target"] == 0
    assert rows["full"]["target"] == rows["full"]["total"] == 2_958_848
    assert abs(rows["conv_adapter"]["encoder"] - 100 * 36_534 / (2_958_848 + 36_534)) < 1e-9
