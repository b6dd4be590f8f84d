"""Conv-Adapter as in the original design (Chen et al.; reference Hhhhhhao/Conv-Adapter ``ConvAdapter``):
structure, parameter count, forward against a re-statement of its maths, placement parallel to the block's
k x k convolution, and the earlier residual-parallel variant."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones.stunet import BasicResBlock, STUNet
from tpp_monai.peft import apply_peft
from tpp_monai.peft.conv_adapter import ConvAdapterModule, adapter_width, set_conv_adapter_impl

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


# ---------------------------------------------------------------------- the fast ("taps") formulation
def conv_formulation(x, a: ConvAdapterModule):
    """The module's maths as it was computed before the taps formulation: grouped conv, ReLU, 1x1 conv, alpha."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
    d = a.down
    h = conv(x, d.weight, d.bias, d.stride, d.padding, d.dilation, d.groups).clamp_min(0)
    out = conv(h, a.up.weight, a.up.bias)
    return out * a.alpha.view(1, -1, *([1] * (x.ndim - 2)))


def float32_bound(x, a: ConvAdapterModule):
    """Element-wise bound on |taps - conv| in float32, from the computation: each down output is a sum of
    K = (in/w) k^d products + bias, rounded in any order: |fl - exact| <= gamma_{K+1} * sum|terms| (Higham,
    gamma_n = n u / (1 - n u), u = 2^-24), so two orders differ by twice that; ReLU is 1-Lipschitz; the up
    projection (w products + bias, then alpha, or alpha folded into the weight) adds its own 2 gamma_{w+3}."""
    u = 2.0 ** -24
    gamma = lambda n: n * u / (1 - n * u)  # noqa: E731
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
    d = a.down
    x64, w64 = x.double(), d.weight.double()
    k_terms = w64[0].numel()
    mag = conv(x64.abs(), w64.abs(), d.bias.double().abs(), d.stride, d.padding, d.dilation, d.groups)
    dh = 2 * gamma(k_terms + 1) * mag
    h = conv(x64, w64, d.bias.double(), d.stride, d.padding, d.dilation, d.groups).clamp_min(0)
    wu, bu = a.up.weight.double().abs(), a.up.bias.double().abs()
    alpha = a.alpha.double().abs().view(1, -1, *([1] * (x.ndim - 2)))
    width = d.weight.shape[0]
    return alpha * (conv(dh, wu) + 2 * gamma(width + 3) * (conv(h, wu) + bu.view(1, -1, *([1] * (x.ndim - 2)))))


CASES = [  # (spatial dims, in, out, width, stride, spatial size): STU-Net's shapes (groups of 8 -> 1) and odd ones
    (3, 32, 32, 4, 1, (12, 10, 9)), (3, 16, 32, 2, 2, (13, 12, 10)), (3, 1, 16, 1, 1, (8, 8, 8)),
    (3, 64, 128, 8, 2, (8, 8, 8)), (2, 24, 48, 6, 2, (15, 14)), (1, 8, 8, 2, 1, (17,)),
]


@pytest.mark.parametrize("nd,cin,cout,width,stride,spatial", CASES)
def test_taps_formulation_equals_the_conv_formulation(nd, cin, cout, width, stride, spatial):
    torch.manual_seed(3)
    like = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[nd](cin, cout, 3, stride=stride, padding=1)
    a = ConvAdapterModule(like, width)
    with torch.no_grad():
        a.alpha.copy_(torch.linspace(-1.5, 2.0, cout))
    a.impl = "taps"
    x = torch.randn(2, cin, *spatial)
    with torch.no_grad():
        got, ref = a(x), conv_formulation(x, a)
        assert got.shape == ref.shape == like(x).shape
        diff = (got - ref).abs()
        assert bool((diff <= float32_bound(x, a)).all()), diff.max()
        assert diff.max().item() <= 1e-5
    # forward and backward are the same maths: in float64 they agree to rounding (custom backward included)
    a64 = copy.deepcopy(a).double()
    x64 = x.double().requires_grad_()
    g = torch.randn_like(ref, dtype=torch.float64)
    params = [x64] + list(a64.parameters())
    got_g = torch.autograd.grad(a64(x64), params, g)
    ref_g = torch.autograd.grad(conv_formulation(x64, a64), params, g)
    for p, u, v in zip(["x", "down.weight", "down.bias", "up.weight", "up.bias", "alpha"], got_g, ref_g):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-10), p


def test_cpu_default_runs_no_grouped_convolution_and_matches_in_the_network():
    """On CPU a Conv-Adapter training step calls no grouped convolution (oneDNN's grouped 3D kernels made the
    step 1.5x full fine-tuning); the whole STU-Net gives the conv formulation's output and gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Groups(TorchDispatchMode):
        seen: list = []
        masks: list = []  # convolution_backward's output_mask: (input grad, weight grad, bias grad)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
                groups = args[8] if func is torch.ops.aten.convolution.default else args[9]
                self.seen.append(groups)
                if func is torch.ops.aten.convolution_backward.default:
                    self.masks.append(tuple(args[10]))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = STUNet(1, 3, size="small", strides=STRIDES, enable_deep_supervision=False)
    apply_peft(m, "conv_adapter")
    m.double()
    ref = copy.deepcopy(m)
    set_conv_adapter_impl(ref, "conv")
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    with Groups() as mode:
        out = m(x)
        out.square().mean().backward()
    assert mode.seen and max(mode.seen) == 1  # every convolution that ran (forward and backward) is dense
    # the backbone is frozen: every frozen convolution's backward computes the input gradient only (no weight or
    # bias gradient); the two that read the image (first block's conv1 and 1x1 shortcut) get no backward, nor
    # the deep-supervision heads whose outputs are not returned. The first block's adapter reads the image's
    # one channel (a dense 1 -> 1 convolution): its backward is its own weight and bias gradient only
    frozen = [mk for mk in mode.masks if tuple(mk) != (False, True, True)]
    assert len(mode.masks) - len(frozen) == 1
    assert frozen and all(tuple(mk) == (True, False, False) for mk in frozen)
    assert len(mode.seen) - len(mode.masks) == len(frozen) + 1 + 2 + (len(m.seg_outputs) - 1)
    ref(x).square().mean().backward()
    assert torch.allclose(out, ref(x), rtol=1e-10, atol=1e-12)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), n
    with pytest.raises(ValueError, match="impl"):
        set_conv_adapter_impl(m, "fast")


def test_taps_path_adds_into_the_frozen_convolution_in_one_pass():
    """The parallel hook returns ``conv(x) + alpha * (W relu(down(x)) + b)`` with one batched matrix product
    (``baddbmm``) as the only op that writes a map of the output's size besides the frozen convolution itself
    (before: a transposing ``matmul`` with two copies, the bias add and the sum with the conv output)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Writes(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.ops = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and isinstance(out, torch.Tensor) and out.numel() == self.numel:
                self.ops.append(func.overloadpacket.__name__)
            return out

    torch.manual_seed(4)
    blk = BasicResBlock(16, 16, 3, 1)
    apply_peft(torch.nn.Sequential(blk), "conv_adapter")
    a = blk.peft_conv_adapter
    with torch.no_grad():
        a.alpha.copy_(torch.linspace(-1.0, 2.0, 16))
    x = torch.randn(2, 16, 7, 6, 5, requires_grad=True)
    with Writes(2 * 16 * 7 * 6 * 5) as mode:
        out = blk.conv1(x)
    assert mode.ops == ["convolution", "baddbmm"], mode.ops
    with torch.no_grad():
        ref = F.conv3d(x, blk.conv1.weight, blk.conv1.bias, 1, 1) + conv_formulation(x, a)
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(a.added_to(None, x), conv_formulation(x, a), atol=1e-5)


SLAB_CASES = [  # (spatial dims, in, groups, spatial size, kernel, dilation, slab bytes): several slabs, edges, dilation
    (3, 16, 2, (9, 8, 7), 3, 1, 3000), (3, 24, 3, (7, 9, 6), 3, 2, 2000), (3, 16, 4, (6, 5, 4), 1, 1, 100),
    (3, 16, 2, (8, 6, 5), 5, 1, 1 << 30), (3, 8, 1, (3, 3, 3), 5, 2, 100), (2, 24, 6, (15, 14), 3, 1, 1000),
]


@pytest.mark.parametrize("nd,cin,groups,spatial,k,dil,slab", SLAB_CASES)
def test_stride_one_slab_path_equals_grouped_convolution(nd, cin, groups, spatial, k, dil, slab, monkeypatch):
    """The stride-1 path (depth slab by depth slab, :class:`_GroupedConvSlabs`) is the grouped convolution:
    forward and all three gradients in float64 to rounding, whatever the slab size (one slice per slab, several,
    or the whole volume) and at the edges (taps that read only padding, dilation)."""
    import tpp_monai.peft.grouped_conv as gc

    monkeypatch.setattr(gc, "SLAB_BYTES", slab)
    torch.manual_seed(5)
    conv = {2: F.conv2d, 3: F.conv3d}[nd]
    x = torch.randn(2, cin, *spatial, dtype=torch.float64, requires_grad=True)
    w = torch.randn(groups, cin // groups, *([k] * nd), dtype=torch.float64, requires_grad=True)
    b = torch.randn(groups, dtype=torch.float64, requires_grad=True)
    p = dil * (k // 2)
    ref = conv(x, w, b, padding=p, dilation=dil, groups=groups)
    got = gc.grouped_conv_taps(x, w, b, (1,) * nd, (p,) * nd, (dil,) * nd)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for name, u, v in zip(("x", "weight", "bias"), torch.autograd.grad(got, (x, w, b), g),
                          torch.autograd.grad(ref, (x, w, b), g)):
        assert torch.allclose(u, v, rtol=1e-11, atol=1e-11), name


def test_stride_one_slab_path_sums_in_float32_under_bfloat16():
    """Under CPU autocast (bf16) the slab path sums its taps in float32 and returns bf16, like the strided path.
    Bound from the computation (bf16 unit roundoff u = 2^-9): each tap's partial sum (one bf16 matrix product)
    is rounded once, |e| <= u |z_t|, the float32 sum of the 27 partials adds ~1e-7 relative, the bf16 output
    rounds once more: |got - ref| <= 3 u sum_t |z_t| <= 3 u conv(|x|, |w|)."""
    from tpp_monai.peft.grouped_conv import grouped_conv_taps

    torch.manual_seed(6)
    x = torch.randn(2, 16, 8, 8, 8, requires_grad=True)
    w = torch.randn(2, 8, 3, 3, 3, requires_grad=True)
    got = grouped_conv_taps(x.bfloat16(), w.bfloat16(), None, (1, 1, 1), (1, 1, 1), (1, 1, 1))
    ref = F.conv3d(x.bfloat16().float(), w.bfloat16().float(), None, padding=1, groups=2)
    assert got.dtype == torch.bfloat16
    mag = F.conv3d(x.bfloat16().float().abs(), w.bfloat16().float().abs(), None, padding=1, groups=2)
    err = (got.float() - ref).abs()
    assert bool((err <= 3 * 2.0 ** -9 * mag + 1e-6).all()), (err / mag).max()
    got.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
