"""DTL: Disentangled Transfer Learning (Fu et al., AAAI 2024), the compact side network (CSN).

For each block i with output ``z_i`` the side network accumulates low-rank maps of the (frozen)
block outputs: ``h_i = h_{i-1} + B_i A_i z_i`` (``h_0 = 0``). From block ``M`` on (1-based,
default ``depth // 2``) the side feature is added back into the main stream: the block's output
becomes ``z_i + h_i``. ``B_i`` is zero-initialised, so DTL is the identity at insertion.
``A_i``/``B_i`` live at ``blocks.N.peft_dtl.{A,B}`` (bias-free Linears, rank ``rank``).

The running ``h`` is passed between blocks through ``model.context.extras["peft_dtl"]`` (each
hooked block keeps a plain reference to the model's context) and removed by the last block. The
maps are token-wise, so DTL works unchanged under MAE masking.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft._common import vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_KEY = "peft_dtl"


@dataclass
class DTLConfig(PeftConfig):
    rank: int = 2
    #: first 1-based block whose output receives the side feature; None -> depth // 2
    start: int | None = None


class LowRankMap(nn.Module):
    """``B(A(z))`` with A Kaiming-uniform and B zero-init; flags say where the block sits in the chain."""

    def __init__(self, dim: int, rank: int, first: bool, last: bool, add_back: bool) -> None:
        super().__init__()
        self.A = nn.Linear(dim, rank, bias=False)
        self.B = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.B.weight)
        self.first, self.last, self.add_back = first, last, add_back

    def forward(self, z):
        return self.B(self.A(z))


def _dtl_hook(module: nn.Module, args, output):
    side = module.peft_dtl
    ctx = module._peft_dtl_context
    h = side(output)
    if not side.first:
        h = ctx.extras[_KEY] + h
    if side.last:
        ctx.extras.pop(_KEY, None)  # do not keep graph tensors in the model after the pass
    else:
        ctx.extras[_KEY] = h
    return output + h if side.add_back else output


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
        start = self.config.start if self.config.start is not None else max(1, depth // 2)
        if not 1 <= start <= depth:
            raise ValueError(f"dtl start must be in 1..{depth}, got {start}")
        for i, blk in enumerate(blocks, start=1):
            blk.peft_dtl = LowRankMap(model.embed_dim, self.config.rank, i == 1, i == depth, i >= start)
            blk._peft_dtl_context = ctx
            blk.register_forward_hook(_dtl_hook)
