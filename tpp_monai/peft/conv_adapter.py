"""Conv-Adapter (Chen et al., 2022) for 2D/3D CNN residual blocks.

A bottleneck branch parallel to every residual block: point-wise down-projection -> depth-wise
k x k conv (with the block's stride) -> activation -> point-wise up-projection, whose output is
added to the block's output: ``block(x) + up(act(dw(down(x))))``. ``up`` is zero-initialised, so
the network is unchanged at insertion. The branch lives at ``<block>.peft_conv_adapter``.

Residual blocks are taken from ``model.residual_blocks()`` when the backbone provides it (STU-Net);
otherwise every module with ``conv1`` and ``conv2`` convolutions (ResNet-like blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cnn_residual_blocks(model: nn.Module, scope: str = "all") -> list[nn.Module]:
    """Residual blocks of a CNN; ``scope="encoder"`` keeps those under ``conv_blocks_context``/``encoder``."""
    if hasattr(model, "residual_blocks"):
        named = {id(m): n for n, m in model.named_modules()}
        blocks = [(named[id(b)], b) for b in model.residual_blocks()]
    else:
        blocks = [(n, m) for n, m in model.named_modules()
                  if isinstance(getattr(m, "conv1", None), _CONV) and isinstance(getattr(m, "conv2", None), _CONV)]
    if scope == "encoder":
        blocks = [(n, b) for n, b in blocks if n.startswith(("conv_blocks_context", "encoder", "layer"))]
    elif scope != "all":
        raise ValueError(f"scope must be 'all' or 'encoder', got {scope!r}")
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no residual blocks (modules with conv1/conv2) for a CNN PEFT method")
    return [b for _, b in blocks]


def block_io(block: nn.Module) -> tuple[int, int, tuple[int, ...], int]:
    """(in_channels, out_channels, stride, spatial_dims) of a residual block."""
    c1, c2 = block.conv1, block.conv2
    out = c2.out_channels
    c3 = getattr(block, "conv3", None)
    if isinstance(c3, _CONV) and c3.in_channels == c2.out_channels:  # ResNet bottleneck: conv3 is the last conv
        out = c3.out_channels
    stride = tuple(max(a, b) for a, b in zip(c1.stride, c2.stride))
    return c1.in_channels, out, stride, len(c1.kernel_size)


class ConvAdapterBranch(nn.Module):
    """down (1x1) -> depth-wise k (stride) -> act -> up (1x1, zero-init)."""

    def __init__(self, cin: int, cout: int, hidden: int, stride, kernel_size: int = 3, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
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
class ConvAdapterConfig(PeftConfig):
    reduction: int = 4  # hidden = max(out_channels // reduction, min_hidden)
    min_hidden: int = 4
    kernel_size: int = 3
    scope: str = "all"  # "all" residual blocks or only the "encoder"


@PEFT_METHODS.register("conv_adapter")
class ConvAdapter(PeftMethod):
    name = "conv_adapter"
    config_cls = ConvAdapterConfig
    applies_to = frozenset({"cnn"})

    def inject(self, model: nn.Module) -> None:
        c = self.config
        for blk in cnn_residual_blocks(model, c.scope):
            cin, cout, stride, nd = block_io(blk)
            hidden = max(cout // c.reduction, c.min_hidden)
            blk.peft_conv_adapter = ConvAdapterBranch(cin, cout, hidden, stride, c.kernel_size, nd)
            blk.register_forward_hook(_parallel_block_hook)
