"""Conv-Adapter (Chen et al., "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for ConvNets")
for 2D/3D CNN residual blocks. Two registered variants:

``conv_adapter`` (default of the bundles and nnU-Net trainers): the original design, "Conv-Parallel"
placement as in the reference code (Hhhhhhao/Conv-Adapter ``ConvAdapter`` "design 2 v4"): parallel to the
block's first k x k convolution ``conv`` (STU-Net / ResNet basic block: ``conv1``; bottleneck: ``conv2``),
its output added to that convolution's output before the block's norm::

    conv(x) + alpha * up(act(down(x)))

- ``down``: k x k convolution ``in -> w`` channels, ``groups = w`` (each hidden channel sees
  ``in / w`` input channels), the conv's stride / padding / dilation, bias;
- ``act``: ReLU (the reference's ``act_layer`` for ResNets);
- ``up``: 1 x 1 convolution ``w -> out``, bias;
- ``alpha``: learnable per-output-channel scale, initialised to 1 (the reference's ``se`` parameter);
- width ``w = in // reduction`` (reference ``--adapt_size``, default 8), lowered to a divisor of ``in``.

Initialisation follows the reference (PyTorch's default conv init, ``alpha = 1``), so unlike the zero-init
methods the network's output changes at insertion. ``alpha_init=0`` gives an identity-at-insertion start.

``conv_adapter_residual``: the earlier tpp-monai design, kept for comparison: a bottleneck branch parallel to
the whole residual block (point-wise down -> depth-wise k x k with the block's stride -> LeakyReLU -> point-wise
up, zero-initialised): ``block(x) + up(act(dw(down(x))))``.

Both live at ``<block>.peft_conv_adapter``. Residual blocks are taken from ``model.residual_blocks()`` when the
backbone provides it (STU-Net); otherwise every module with ``conv1`` and ``conv2`` convolutions, and every
MobileNet/EfficientNet block (a module with a depth-wise ``conv_dw`` and point-wise ``conv_pw``/``conv_pwl``: timm's
``InvertedResidual`` and ``DepthwiseSeparableConv``, e.g. EfficientNet-Lite0).

Inverted-residual (MBConv) blocks: the reference places the adapter differently there
(``models/backbones/efficientnet/efficientnet_blocks.py``, ``InvertedResidual``): parallel to the *whole block*, from
the block's input to its output (added after the skip connection), with the kernel of the block's first convolution
(``exp_kernel_size``: the 1 x 1 expansion, so a grouped 1 x 1 down-projection), the block's stride, symmetric padding
``(k - 1) // 2``, ``width = in // adapt_size`` groups and the block's activation (ReLU6 in EfficientNet-Lite; set
``act="block"`` or ``"relu6"`` for it, the default ``"relu"`` is the ResNet one)::

    block(x) + alpha * up(act(down(x)))      # down: k_first x k_first, in -> w, groups w, stride of conv_dw

A block without expansion (``DepthwiseSeparableConv``, EfficientNet's first block) gets the same rule with its first
convolution, the k x k depth-wise one (the reference builds it with a tuning config but its class takes none; this is
our reading, as for its ``ConvBnAct`` / ``EdgeResidual`` blocks, whose adapters use their first conv's kernel). The
module and its maths are the same ``ConvAdapterModule``; only where it reads its input and adds its output differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from types import SimpleNamespace

import torch
from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.grouped_conv import grouped_conv_taps
from tpp_monai.peft.registry import PEFT_METHODS

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: activation modules -> ``ConvAdapterModule`` act names (``act="block"``: the block's own activation)
_ACT_NAMES = ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.LeakyReLU, "leakyrelu"), (nn.GELU, "gelu"), (nn.SiLU, "silu"))


def cnn_residual_blocks(model: nn.Module, scope: str = "all") -> list[nn.Module]:
    """Residual blocks of a CNN; ``scope="encoder"`` keeps those under ``conv_blocks_context``/``encoder``."""
    if hasattr(model, "residual_blocks"):
        named = {id(m): n for n, m in model.named_modules()}
        blocks = [(named[id(b)], b) for b in model.residual_blocks()]
    else:
        blocks = [(n, m) for n, m in model.named_modules()
                  if (isinstance(getattr(m, "conv1", None), _CONV) and isinstance(getattr(m, "conv2", None), _CONV))
                  or is_mbconv_block(m)]
    if scope == "encoder":
        blocks = [(n, b) for n, b in blocks if n.startswith(("conv_blocks_context", "encoder", "layer"))]
    elif scope != "all":
        raise ValueError(f"scope must be 'all' or 'encoder', got {scope!r}")
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no residual blocks (modules with conv1/conv2, or MBConv blocks "
                        "with conv_dw and conv_pw/conv_pwl) for a CNN PEFT method")
    return [b for _, b in blocks]


def is_mbconv_block(m: nn.Module) -> bool:
    """A MobileNet/EfficientNet block: a depth-wise ``conv_dw`` and a point-wise ``conv_pw`` (timm
    ``DepthwiseSeparableConv``) or ``conv_pw`` + ``conv_pwl`` (timm ``InvertedResidual``)."""
    dw = getattr(m, "conv_dw", None)
    return (isinstance(dw, _CONV) and dw.groups > 1
            and isinstance(getattr(m, "conv_pwl", getattr(m, "conv_pw", None)), _CONV))


def mbconv_geometry(block: nn.Module) -> SimpleNamespace:
    """What the reference's MBConv Conv-Adapter is "like": a convolution from the block's input to its output with
    the kernel of the block's first convolution (``conv_pw`` of an inverted residual, ``conv_dw`` without expansion),
    the depth-wise convolution's stride, symmetric padding ``(k - 1) // 2`` and dilation 1."""
    expanded = isinstance(getattr(block, "conv_pwl", None), _CONV)
    first = block.conv_pw if expanded else block.conv_dw
    last = block.conv_pwl if expanded else block.conv_pw
    k = first.kernel_size
    return SimpleNamespace(in_channels=first.in_channels, out_channels=last.out_channels, kernel_size=k,
                           stride=block.conv_dw.stride, padding=tuple((i - 1) // 2 for i in k),
                           dilation=(1,) * len(k))


def block_activation(block: nn.Module) -> str:
    """Name (for ``ConvAdapterModule(act=)``) of the first activation module of ``block``."""
    for m in block.modules():
        for cls, name in _ACT_NAMES:
            if type(m) is cls:
                return name
    raise TypeError(f"{type(block).__name__} has no activation module ({', '.join(n for _, n in _ACT_NAMES)}) "
                    "for Conv-Adapter act='block'")


def block_io(block: nn.Module) -> tuple[int, int, tuple[int, ...], int]:
    """(in_channels, out_channels, stride, spatial_dims) of a residual block."""
    if is_mbconv_block(block) and not isinstance(getattr(block, "conv1", None), _CONV):
        g = mbconv_geometry(block)
        return g.in_channels, g.out_channels, tuple(g.stride), len(g.kernel_size)
    c1, c2 = block.conv1, block.conv2
    out = c2.out_channels
    c3 = getattr(block, "conv3", None)
    if isinstance(c3, _CONV) and c3.in_channels == c2.out_channels:  # ResNet bottleneck: conv3 is the last conv
        out = c3.out_channels
    stride = tuple(max(a, b) for a, b in zip(c1.stride, c2.stride))
    return c1.in_channels, out, stride, len(c1.kernel_size)


def first_kxk_conv(block: nn.Module) -> nn.Module:
    """The block's first convolution with a kernel larger than 1 (``conv1`` of basic blocks, ``conv2`` of
    bottlenecks): the convolution the original Conv-Adapter runs parallel to."""
    for name in ("conv1", "conv2", "conv_dw"):
        conv = getattr(block, name, None)
        if isinstance(conv, _CONV) and max(conv.kernel_size) > 1:
            return conv
    raise TypeError(f"{type(block).__name__} has no k x k convolution (conv1/conv2/conv_dw with kernel > 1) for "
                    "Conv-Adapter")


def adapter_width(in_channels: int, reduction: float) -> int:
    """``in // reduction`` (at least 1), lowered until it divides ``in`` (grouped down-projection)."""
    w = max(int(in_channels // reduction), 1)
    while in_channels % w:
        w -= 1
    return w


class ConvAdapterModule(nn.Module):
    """Original Conv-Adapter: grouped k x k down (``groups = width``) -> act -> 1 x 1 up -> per-channel ``alpha``.
    ``like`` is the convolution it runs parallel to (its kernel, stride, padding and dilation are reused, so the
    output has that convolution's shape).

    ``impl`` chooses how the same maths runs: ``"conv"`` calls the grouped and 1 x 1 convolutions (cuDNN on CUDA;
    also used while tracing for TorchScript); ``"taps"`` runs the grouped convolution as matrix products and
    shifted slices (:func:`tpp_monai.peft.grouped_conv.grouped_conv_taps`) and the 1 x 1 up-projection with
    ``alpha`` folded into its weight as one matrix product (``groups == 1``, one input channel: a dense
    convolution, which oneDNN runs fast): about 10x faster than oneDNN's grouped 3D
    convolution on CPU, forward and backward (``benchmarks/conv_adapter_step.py``); ``"auto"`` (default):
    ``"taps"`` on CPU, ``"conv"`` elsewhere. Parameters and ``state_dict`` are the same for every ``impl``; it is a
    plain attribute, not part of the method's config (so checkpoints do not depend on it): set it with
    :func:`set_conv_adapter_impl`.
    """

    IMPLS = ("auto", "taps", "conv")

    def __init__(self, like: nn.Module, width: int, alpha_init: float = 1.0, act: str = "relu",
                 impl: str = "auto") -> None:
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"Conv-Adapter impl must be one of {self.IMPLS}, got {impl!r}")
        self.impl = impl
        conv = _CONV_BY_DIMS[len(like.kernel_size)]
        cin, cout = like.in_channels, like.out_channels
        self.down = conv(cin, width, like.kernel_size, stride=like.stride, padding=like.padding,
                         dilation=like.dilation, groups=width)
        self.act = {"relu": nn.ReLU(), "leakyrelu": nn.LeakyReLU(0.01), "gelu": nn.GELU(), "relu6": nn.ReLU6(),
                    "silu": nn.SiLU()}[act]
        self.up = conv(width, cout, 1)
        self.alpha = nn.Parameter(torch.full((cout,), float(alpha_init)))

    def _use_taps(self, x: torch.Tensor) -> bool:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return False  # the taps plan depends on the input size; a trace must stay size-generic
        return self.impl == "taps" or (self.impl == "auto" and x.device.type == "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.added_to(None, x)

    def added_to(self, base: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """``base + self(x)`` (``base``: the parallel convolution's output, or ``None``). On the taps path the
        1 x 1 up-projection, its bias, ``alpha`` and the sum with ``base`` are one batched matrix product
        (``baddbmm``): every extra pass over a full-resolution map (or a fresh allocation of one) costs about as
        much as the adapter's own arithmetic."""
        if not self._use_taps(x):
            out = self.up(self.act(self.down(x)))
            out = out * self.alpha.view(1, -1, *([1] * (out.ndim - 2)))
            return out if base is None else base + out
        d = self.down
        if d.groups == 1:  # one input channel (STU-Net's first block): a dense convolution, fast in oneDNN
            h = d(x)
        else:
            h = grouped_conv_taps(x, d.weight, d.bias, d.stride, d.padding, d.dilation)
        h = torch.relu_(h) if isinstance(self.act, nn.ReLU) else self.act(h)  # h is a fresh tensor
        b = h.shape[0]
        # alpha * (W h + b) = (alpha W) h + alpha b; the bias rides on a row of ones appended to h
        w = torch.cat([self.up.weight.flatten(1) * self.alpha[:, None], (self.alpha * self.up.bias)[:, None]], 1)
        h1 = torch.cat([h.flatten(2), h.new_ones(b, 1, h[0, 0].numel())], 1)
        w = w.expand(b, *w.shape)
        out = torch.bmm(w, h1) if base is None else torch.baddbmm(base.flatten(2), w, h1)
        return out.view(b, out.shape[1], *h.shape[2:])


def set_conv_adapter_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` (``"auto"``, ``"taps"``, ``"conv"``) of every Conv-Adapter in ``model``; returns how many."""
    if impl not in ConvAdapterModule.IMPLS:
        raise ValueError(f"Conv-Adapter impl must be one of {ConvAdapterModule.IMPLS}, got {impl!r}")
    mods = [m for m in model.modules() if isinstance(m, ConvAdapterModule)]
    for m in mods:
        m.impl = impl
    return len(mods)


def _parallel_conv_hook(conv: nn.Module, inputs, output):
    # the adapter is kept on the conv as a plain attribute (not a submodule, so its tensors are named only
    # under <block>.peft_conv_adapter); deepcopy (DINO's teacher) maps it to the copied adapter
    return conv.__dict__["_peft_parallel"].added_to(output, inputs[0])


@dataclass
class ConvAdapterConfig(PeftConfig):
    reduction: float = 8  # width = in_channels // reduction (reference --adapt_size 8)
    alpha_init: float = 1.0  # reference: ones
    act: str = "relu"  # reference act_layer for ResNets; "block": the block's own (reference for MBConv: ReLU6)
    scope: str = "all"  # "all" residual blocks or only the "encoder"


@PEFT_METHODS.register("conv_adapter")
class ConvAdapter(PeftMethod):
    """Original Conv-Adapter, parallel to each residual block's first k x k convolution."""

    name = "conv_adapter"
    config_cls = ConvAdapterConfig
    applies_to = frozenset({"cnn"})

    def inject(self, model: nn.Module) -> None:
        c = self.config
        for blk in cnn_residual_blocks(model, c.scope):
            act = block_activation(blk) if c.act == "block" else c.act
            if is_mbconv_block(blk) and not isinstance(getattr(blk, "conv1", None), _CONV):
                # the reference's inverted-residual placement: parallel to the whole block (module docstring)
                like = mbconv_geometry(blk)
                blk.peft_conv_adapter = ConvAdapterModule(like, adapter_width(like.in_channels, c.reduction),
                                                          c.alpha_init, act)
                blk.register_forward_hook(_parallel_block_hook)
                continue
            conv = first_kxk_conv(blk)
            adapter = ConvAdapterModule(conv, adapter_width(conv.in_channels, c.reduction), c.alpha_init, act)
            blk.peft_conv_adapter = adapter
            object.__setattr__(conv, "_peft_parallel", adapter)
            conv.register_forward_hook(_parallel_conv_hook)


class ConvAdapterBranch(nn.Module):
    """``conv_adapter_residual``: down (1x1) -> depth-wise k (stride) -> act -> up (1x1, zero-init)."""

    def __init__(self, cin: int, cout: int, hidden: int, stride, kernel_size: int = 3, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = _CONV_BY_DIMS[spatial_dims]
        self.down = conv(cin, hidden, 1)
        self.dw = conv(hidden, hidden, kernel_size, stride=stride, padding=kernel_size // 2, groups=hidden)
        self.act = nn.LeakyReLU(0.01)
        self.up = conv(hidden, cout, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.act(self.dw(self.down(x))))


def _parallel_block_hook(module: nn.Module, inputs, output):
    return output + module.peft_conv_adapter(inputs[0])


@dataclass
class ConvAdapterResidualConfig(PeftConfig):
    reduction: int = 4  # hidden = max(out_channels // reduction, min_hidden)
    min_hidden: int = 4
    kernel_size: int = 3
    scope: str = "all"  # "all" residual blocks or only the "encoder"


@PEFT_METHODS.register("conv_adapter_residual")
class ConvAdapterResidual(PeftMethod):
    """Zero-init bottleneck branch parallel to the whole residual block (tpp-monai's earlier design)."""

    name = "conv_adapter_residual"
    config_cls = ConvAdapterResidualConfig
    applies_to = frozenset({"cnn"})

    def inject(self, model: nn.Module) -> None:
        c = self.config
        for blk in cnn_residual_blocks(model, c.scope):
            cin, cout, stride, nd = block_io(blk)
            hidden = max(cout // c.reduction, c.min_hidden)
            blk.peft_conv_adapter = ConvAdapterBranch(cin, cout, hidden, stride, c.kernel_size, nd)
            blk.register_forward_hook(_parallel_block_hook)
