"""Adapter (Houlsby-style serial bottleneck after each block's MLP, zero-init up-projection).

With ``m = mlp(norm2(x))`` the block's second half becomes ``x + ls2(m) + up(GELU(down(m)))``: the
adapter reads the MLP output *before* the layer scale and writes to the residual stream *after*
it. Why: MedCoSS blocks carry a pre-trained layer scale (``x += gamma_2 * mlp(norm2(x))``, gamma_2
often far below 1). Hooking the adapter inside the scaled branch would multiply its output, and
its gradient, by that frozen gamma_2; the adapter is new and learns its own scale in ``up``.
Without layer scale (timm ViTs) this is exactly Houlsby's ``m + A(m)``.

Capacity: one adapter per block, ``bottleneck`` 160 -> ``12 * (2*768*160 + 160 + 768)`` = 2.96M
parameters on ViT-B, which reproduces the TPP paper's Adapter Ratio (3.045% cls / 4.98% seg); see
docs/PEFT_RATIOS.md. The adapter lives at ``blocks.N.mlp.peft_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft._common import Bottleneck, vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_DELTA = "_peft_mlp_delta"


@dataclass
class AdapterConfig(PeftConfig):
    #: hidden width of the bottleneck; 160 reproduces the TPP paper's Ratio on ViT-B (docs/PEFT_RATIOS.md)
    bottleneck: int = 160


def add_after_layer_scale(module: nn.Module, args, output):
    """Block forward hook: add the branch output its MLP hook left (outside ``ls2``, see module doc)."""
    delta = module.mlp.__dict__.pop(_DELTA, None)
    if delta is None:
        raise RuntimeError("adapter branch output missing: the block's MLP did not run its PEFT hook")
    return output + delta


def hook_beside_layer_scale(block: nn.Module, mlp_hook) -> None:
    """Register ``mlp_hook`` (stores the branch output as ``mlp._peft_mlp_delta``) and the block hook adding it."""
    block.mlp.register_forward_hook(mlp_hook)
    block.register_forward_hook(add_after_layer_scale)


def _serial_hook(module: nn.Module, inputs, output):
    module.__dict__[_DELTA] = module.peft_adapter(output)
    return None


@PEFT_METHODS.register("adapter")
class Adapter(PeftMethod):
    name = "adapter"
    config_cls = AdapterConfig

    def inject(self, model: nn.Module) -> None:
        for blk in vit_blocks(model):
            blk.mlp.peft_adapter = Bottleneck(model.embed_dim, self.config.bottleneck)
            hook_beside_layer_scale(blk, _serial_hook)
