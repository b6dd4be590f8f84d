"""Adapter (Houlsby-style serial bottleneck after each block's MLP, residual, zero-init up-projection).

``mlp_out <- mlp_out + up(GELU(down(mlp_out)))``; the adapter lives at ``blocks.N.mlp.peft_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft._common import Bottleneck, vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class AdapterConfig(PeftConfig):
    bottleneck: int = 64


def _serial_hook(module: nn.Module, inputs, output):
    return output + module.peft_adapter(output)


@PEFT_METHODS.register("adapter")
class Adapter(PeftMethod):
    name = "adapter"
    config_cls = AdapterConfig

    def inject(self, model: nn.Module) -> None:
        for blk in vit_blocks(model):
            blk.mlp.peft_adapter = Bottleneck(model.embed_dim, self.config.bottleneck)
            blk.mlp.register_forward_hook(_serial_hook)
