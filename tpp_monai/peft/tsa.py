"""TSA, task-specific adapters (Li et al., CVPR 2022; "parallel adapters" in Dutt et al.):
a 1x1 convolution parallel to every k x k convolution (k > 1, groups 1) of a CNN, with the
conv's stride, zero-initialised: ``conv(x) + alpha(x)``. Lives at ``<conv>.peft_tsa``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _tsa_hook(module: nn.Module, inputs, output):
    return output + module.peft_tsa(inputs[0])


def tsa_convs(model: nn.Module, min_kernel: int = 2) -> list[nn.Module]:
    convs = [m for m in model.modules() if type(m) in _CONV and m.groups == 1 and max(m.kernel_size) >= min_kernel]
    if not convs:
        raise TypeError(f"{type(model).__name__} has no k x k convolutions for TSA")
    return convs


@dataclass
class TSAConfig(PeftConfig):
    min_kernel: int = 2  # adapt convolutions whose largest kernel side is at least this


@PEFT_METHODS.register("tsa")
class TSA(PeftMethod):
    name = "tsa"
    config_cls = TSAConfig
    applies_to = frozenset({"cnn"})

    def inject(self, model: nn.Module) -> None:
        for conv in tsa_convs(model, self.config.min_kernel):
            alpha = type(conv)(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False)
            nn.init.zeros_(alpha.weight)
            conv.peft_tsa = alpha
            conv.register_forward_hook(_tsa_hook)
