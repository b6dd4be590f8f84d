"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck *parallel* to each block's MLP, scaled by ``s``.

AdaptFormer's equation: ``x <- x + MLP(LN(x)) + s * up(ReLU(down(LN(x))))``. The branch reads the
MLP's input (the output of ``norm2``); its output joins the residual stream *outside* the block's
layer scale (``x + ls2(MLP(LN(x))) + s * A(LN(x))``) for the reason given in
:mod:`tpp_monai.peft.adapter`: a frozen pre-trained gamma_2 must not shrink a new branch.
``up`` is zero-initialised, so the network is unchanged at insertion. The branch lives at
``blocks.N.mlp.peft_adaptformer``; ``s`` is a fixed hyper-parameter (0.1, AdaptFormer's default).

Capacity: ``bottleneck`` 200 -> ``12 * (2*768*200 + 200 + 768)`` = 3.70M parameters on ViT-B, which
reproduces the TPP paper's AdaptFormer Ratio (3.831% cls / 5.75% seg); see docs/PEFT_RATIOS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft._common import Bottleneck, vit_blocks
from tpp_monai.peft.adapter import _DELTA, hook_beside_layer_scale
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class AdaptFormerConfig(PeftConfig):
    #: hidden width; 200 reproduces the TPP paper's Ratio on ViT-B (docs/PEFT_RATIOS.md)
    bottleneck: int = 200
    scale: float = 0.1


class ScaledBottleneck(Bottleneck):
    """A zero-init bottleneck whose output is multiplied by a constant ``scale``."""

    def __init__(self, dim: int, hidden: int, scale: float) -> None:
        super().__init__(dim, hidden, act=nn.ReLU)
        self.scale = float(scale)

    def forward(self, x):
        return super().forward(x) * self.scale


def _parallel_hook(module: nn.Module, inputs, output):
    module.__dict__[_DELTA] = module.peft_adaptformer(inputs[0])
    return None


@PEFT_METHODS.register("adaptformer")
class AdaptFormer(PeftMethod):
    name = "adaptformer"
    config_cls = AdaptFormerConfig

    def inject(self, model: nn.Module) -> None:
        for blk in vit_blocks(model):
            blk.mlp.peft_adaptformer = ScaledBottleneck(model.embed_dim, self.config.bottleneck, self.config.scale)
            hook_beside_layer_scale(blk, _parallel_hook)
