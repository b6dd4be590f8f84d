"""DTL: Disentangled Transfer Learning (Fu et al., AAAI 2024), the compact side network (CSN).

As in the reference ViT code (heekhero/DTL): for every block i the side network adds a low-rank
map of the block's *input* ``x_i`` to a running feature, ``h <- h + B_i A_i x_i`` (``h = 0`` before
block 1). After each block from ``start`` on (1-based; default ``depth // 2 + 1``, the reference's
``add_after_blocks 6-11`` counted from 0 for depth 12) the activated side feature is added to the
block's output: ``z_i <- z_i + fuse(swish_beta(h))`` with ``swish_beta(h) = h * sigmoid(beta * h)``
(beta 100). ``fuse`` is the reference's depth-wise ``fusion_size x fusion_size`` convolution over the
patch grid (bias-free; the class token passes unchanged); its training script's default
``fusion_size`` is 3, and with it rank 2 gives 43,776 parameters on ViT-B, the TPP paper's DTL
Ratio (0.05% cls / 2.05% seg; docs/PEFT_RATIOS.md). ``fusion_size=0`` drops it (36,864).

``B_i`` is zero-initialised, so DTL is the identity at insertion. ``A_i``/``B_i`` live at
``blocks.N.peft_dtl.{A,B}`` (bias-free Linears, rank ``rank``), the convolution at
``blocks.0.peft_dtl_fusion``. Under MAE masking the visible tokens are scattered onto the patch
grid (zeros elsewhere) for the convolution and gathered back. The running ``h`` passes between
blocks through ``model.context.extras["peft_dtl"]`` and is removed by the last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpp_monai.peft._common import vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_KEY = "peft_dtl"


@dataclass
class DTLConfig(PeftConfig):
    rank: int = 2
    #: first 1-based block whose output receives the side feature; None -> depth // 2 + 1
    start: int | None = None
    #: swish sharpness of the reference (``--beta 100``)
    beta: float = 100.0
    #: depth-wise conv kernel over the patch grid (reference default 3); 0 = none
    fusion_size: int = 3


class LowRankMap(nn.Module):
    """``B(A(x))`` with A Kaiming-uniform and B zero-init; flags say where the block sits in the chain."""

    def __init__(self, dim: int, rank: int, first: bool, last: bool, add_back: bool) -> None:
        super().__init__()
        self.A = nn.Linear(dim, rank, bias=False)
        self.B = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.B.weight)
        self.first, self.last, self.add_back = first, last, add_back

    def forward(self, z):
        return self.B(self.A(z))


def swish(x: torch.Tensor, beta: float) -> torch.Tensor:
    return x * torch.sigmoid(beta * x)


def fuse_patches(conv: nn.Conv2d, tokens: torch.Tensor, grid: tuple[int, int],
                 ids_keep: torch.Tensor | None) -> torch.Tensor:
    """Depth-wise conv over the patch tokens (the last ``n`` of ``tokens``); the prefix passes unchanged."""
    b, n_tok, d = tokens.shape
    h, w = grid
    n = h * w if ids_keep is None else ids_keep.shape[1]
    prefix, patches = tokens[:, : n_tok - n], tokens[:, n_tok - n:]
    if ids_keep is None:
        full = patches
    else:
        full = patches.new_zeros(b, h * w, d).scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), patches)
    out = conv(full.transpose(1, 2).reshape(b, d, h, w)).flatten(2).transpose(1, 2)
    if ids_keep is not None:
        out = torch.gather(out, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    return torch.cat([prefix, out], dim=1)


def _dtl_pre_hook(module: nn.Module, args):
    side = module.peft_dtl
    ctx = module._peft_dtl_context
    h = side(args[0])
    ctx.extras[_KEY] = h if side.first else ctx.extras[_KEY] + h
    return None


def _dtl_hook(module: nn.Module, args, output):
    side = module.peft_dtl
    ctx = module._peft_dtl_context
    h = ctx.extras.pop(_KEY) if side.last else ctx.extras[_KEY]  # do not keep graph tensors after the pass
    if not side.add_back:
        return output
    r = swish(h, module._peft_dtl_beta)
    conv = module._peft_dtl_fusion
    if conv is not None:
        r = fuse_patches(conv, r, ctx.grid, ctx.ids_keep)
    return output + r


@PEFT_METHODS.register("dtl")
class DTL(PeftMethod):
    name = "dtl"
    config_cls = DTLConfig

    def inject(self, model: nn.Module) -> None:
        blocks = vit_blocks(model)
        ctx = getattr(model, "context", None)
        if ctx is None or not hasattr(ctx, "extras"):
            raise TypeError(f"dtl needs a backbone with a ForwardContext (.context); {type(model).__name__} has none")
        depth = len(blocks)
        start = self.config.start if self.config.start is not None else depth // 2 + 1
        if not 1 <= start <= depth:
            raise ValueError(f"dtl start must be in 1..{depth}, got {start}")
        k = self.config.fusion_size
        if k < 0 or (k > 0 and k % 2 == 0):
            raise ValueError(f"dtl fusion_size must be 0 (off) or odd, got {k}")
        d = model.embed_dim
        fusion = None
        if k:
            fusion = nn.Conv2d(d, d, kernel_size=k, padding=k // 2, groups=d, bias=False)
            blocks[0].peft_dtl_fusion = fusion
        for i, blk in enumerate(blocks, start=1):
            blk.peft_dtl = LowRankMap(d, self.config.rank, i == 1, i == depth, i >= start)
            blk._peft_dtl_context = ctx
            blk._peft_dtl_beta = float(self.config.beta)
            object.__setattr__(blk, "_peft_dtl_fusion", fusion)  # plain reference, not a second sub-module
            blk.register_forward_pre_hook(_dtl_pre_hook)
            blk.register_forward_hook(_dtl_hook)
