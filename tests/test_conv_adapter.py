"""Conv-Adapter as in the original design (Chen et al.; reference Hhhhhhao/Conv-Adapter ``ConvAdapter``):
structure, parameter count, forward against a re-statement of its maths, placement parallel to the block's
k x k convolution, and the earlier residual-parallel variant."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones.stunet import BasicResBlock, STUNet
from tpp_monai.peft import apply_peft
from tpp_monai.peft.conv_adapter import ConvAdapterModule, adapter_width

STRIDES = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


def small(**kw):
    torch.manual_seed(0)
    return STUNet(1, 3, size="small", strides=STRIDES, **kw)


def restated_adapter(x, a: ConvAdapterModule, stride, padding):
    """Grouped k x k down-projection written group by group, ReLU, 1x1 up-projection as a channel sum, alpha."""
    w1, b1 = a.down.weight, a.down.bias
    width, per_group = w1.shape[0], w1.shape[1]
    hidden = torch.cat([F.conv3d(x[:, g * per_group:(g + 1) * per_group], w1[g:g + 1], b1[g:g + 1], stride=stride,
                                 padding=padding) for g in range(width)], dim=1)
    hidden = hidden.clamp_min(0)
    up = torch.einsum("bidhw,oi->bodhw", hidden, a.up.weight.flatten(1)) + a.up.bias.view(1, -1, 1, 1, 1)
    return up * a.alpha.view(1, -1, 1, 1, 1)


def test_structure_and_parameter_count():
    m = small()
    apply_peft(m, "conv_adapter")  # reduction 8 (reference --adapt_size), alpha 1, ReLU
    blocks = m.residual_blocks()
    expected = 0
    for blk in blocks:
        a = blk.peft_conv_adapter
        cin, cout = blk.conv1.in_channels, blk.conv1.out_channels
        w = adapter_width(cin, 8)
        assert w == max(cin // 8, 1)  # STU-Net widths are multiples of 8 (first block: 1 input channel -> 1)
        assert a.down.groups == w and a.down.kernel_size == (3, 3, 3) and a.down.stride == blk.conv1.stride
        assert tuple(a.down.weight.shape) == (w, cin // w, 3, 3, 3) and tuple(a.up.weight.shape) == (cout, w, 1, 1, 1)
        assert isinstance(a.act, torch.nn.ReLU) and torch.equal(a.alpha, torch.ones(cout))
        expected += w * (cin // w) * 27 + w + cout * w + cout + cout
    got = sum(p.numel() for n, p in m.named_parameters() if "peft_conv_adapter" in n)
    assert got == expected
    # hand count for STU-Net-small (16 x [1, 2, 4, 8, 16, 16], 1 block per stage): encoder + decoder adapters
    dims = [16, 32, 64, 128, 256, 256]
    ins = [1] + dims[:-1] + [2 * d for d in dims[4::-1]]
    outs = dims + dims[4::-1]

    def one(ci, co):
        w = max(ci // 8, 1)
        return ci * 27 + w + co * w + 2 * co

    assert got == sum(one(ci, co) for ci, co in zip(ins, outs)) == 78_358
    assert adapter_width(12, 8) == 1 and adapter_width(24, 4) == 6 and adapter_width(20, 8) == 2


def test_forward_matches_restated_maths():
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(16, 24, 3, stride=2, padding=1)
    a = ConvAdapterModule(conv, width=4)
    with torch.no_grad():
        a.alpha.copy_(torch.linspace(0.5, 2.0, 24))
    x = torch.randn(2, 16, 9, 8, 7)
    out = a(x)
    assert out.shape == conv(x).shape
    assert torch.allclose(out, restated_adapter(x, a, 2, 1), atol=1e-5)


def test_parallel_to_the_blocks_kxk_conv():
    """block(x) with the adapter = act2(norm2(conv2(act1(norm1(conv1(x) + adapter(x))))) + conv3(x))."""
    torch.manual_seed(2)
    blk = BasicResBlock(8, 16, 3, 2, use_1x1conv=True).eval()
    x = torch.randn(1, 8, 8, 8, 8)
    apply_peft(torch.nn.Sequential(blk), "conv_adapter")
    a = blk.peft_conv_adapter
    with torch.no_grad():
        y = blk.act1(blk.norm1(F.conv3d(x, blk.conv1.weight, blk.conv1.bias, 2, 1) + restated_adapter(x, a, 2, 1)))
        ref = blk.act2(blk.norm2(F.conv3d(y, blk.conv2.weight, blk.conv2.bias, 1, 1)) + blk.conv3(x))
        assert torch.allclose(blk(x), ref, atol=1e-5)
        # alpha = 0 removes the branch: the frozen block's own output
        a.alpha.zero_()
        y0 = blk.act1(blk.norm1(F.conv3d(x, blk.conv1.weight, blk.conv1.bias, 2, 1)))
        assert torch.allclose(blk(x), blk.act2(blk.norm2(blk.conv2(y0)) + blk.conv3(x)), atol=1e-6)


def test_deepcopy_calls_its_own_adapter():
    """DINO's teacher is a deepcopy: its conv hooks must run the teacher's adapters, not the student's."""
    m = small().eval()
    apply_peft(m, "conv_adapter")
    t = copy.deepcopy(m)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = t(x)[0].clone()
        for n, p in m.named_parameters():
            if "peft_" in n:
                p.add_(1.0)
        assert torch.equal(t(x)[0], before)  # student edits do not leak into the copy
        assert not torch.equal(m(x)[0], before)
    names = [n for n, _ in m.named_parameters() if "peft_" in n]
    assert all(n.split(".peft_conv_adapter.")[0].count("conv1") == 0 for n in names)  # named only under the block


def test_alpha_zero_is_identity_and_residual_variant_is_zero_init():
    x = torch.randn(1, 1, 16, 16, 16)
    for method, cfg in (("conv_adapter", {"alpha_init": 0.0}), ("conv_adapter_residual", {})):
        m = small().eval()
        with torch.no_grad():
            ref = m(x)
        apply_peft(m, method, cfg)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(ref, m(x))), method
    m = small().eval()
    with torch.no_grad():
        ref = m(x)
    apply_peft(m, "conv_adapter")  # original init (alpha 1, default conv init): the output changes at insertion
    with torch.no_grad():
        assert not torch.allclose(ref[0], m(x)[0])
