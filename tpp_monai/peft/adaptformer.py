"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck *parallel* to each block's MLP, scaled by ``s``.

``mlp_out <- mlp(x) + s * up(ReLU(down(x)))`` where ``x`` is the MLP's input (the output of
``norm2``). ``up`` is zero-initialised, so the network is unchanged at insertion. The branch lives at
``blocks.N.mlp.peft_adaptformer``; the scale ``s`` is a fixed hyper-parameter (not trained).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft._common import Bottleneck, vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class AdaptFormerConfig(PeftConfig):
    bottleneck: int = 64
    scale: float = 0.1


class ScaledBottleneck(Bottleneck):
    """A zero-init bottleneck whose output is multiplied by a constant ``scale``."""

    def __init__(self, dim: int, hidden: int, scale: float) -> None:
        super().__init__(dim, hidden, act=nn.ReLU)
        self.scale = float(scale)

    def forward(self, x):
        return super().forward(x) * self.scale


def _parallel_hook(module: nn.Module, inputs, output):
    return output + module.peft_adaptformer(inputs[0])


@PEFT_METHODS.register("adaptformer")
class AdaptFormer(PeftMethod):
    name = "adaptformer"
    config_cls = AdaptFormerConfig

    def inject(self, model: nn.Module) -> None:
        for blk in vit_blocks(model):
            blk.mlp.peft_adaptformer = ScaledBottleneck(model.embed_dim, self.config.bottleneck, self.config.scale)
            blk.mlp.register_forward_hook(_parallel_hook)
