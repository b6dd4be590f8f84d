"""TSA, task-specific adapters (Li et al., CVPR 2022; "parallel adapters" in Dutt et al.):
a 1x1 convolution parallel to every k x k convolution (k > 1) of a CNN, with the conv's stride,
zero-initialised: ``conv(x) + alpha(x)``. Lives at ``<conv>.peft_tsa``.

Grouped and depth-wise k x k convolutions (MobileNet / EfficientNet, whose only groups-1 k x k conv is the stem)
get a parallel 1x1 convolution with the *same* ``groups``: a depth-wise conv gets a per-channel 1x1 (one weight per
channel, at the conv's stride). TSA's adapter is a linear map of the same family as the convolution it runs beside
(for a ResNet 3 x 3 conv, a dense ``in x out`` 1x1); for a depth-wise conv the family is diagonal in channels, and a
dense ``C x C`` 1x1 beside it would hold ``C / k^2`` times more parameters than the frozen conv itself (18x for a
3 x 3 on 160 channels) and mix channels the backbone never mixes there. Groups-1 convolutions are handled exactly as
before (STU-Net / ResNets are unchanged).

The 1x1 needs no padding: with the conv's stride it gives the conv's output size for any "same"-style padding
(PyTorch ``k // 2`` or TensorFlow "SAME", timm ``Conv2dSame``), on even and odd inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _tsa_hook(module: nn.Module, inputs, output):
    return output + module.peft_tsa(inputs[0])


def tsa_convs(model: nn.Module, min_kernel: int = 2) -> list[nn.Module]:
    """Every k x k convolution (largest kernel side >= ``min_kernel``), groups 1 or grouped / depth-wise.
    Subclasses of the torch convolutions count (timm's ``Conv2dSame``)."""
    convs = [m for m in model.modules() if isinstance(m, _CONV) and max(m.kernel_size) >= min_kernel]
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
            alpha = _CONV_BY_DIMS[len(conv.kernel_size)](conv.in_channels, conv.out_channels, 1, stride=conv.stride,
                                                         groups=conv.groups, bias=False)
            nn.init.zeros_(alpha.weight)
            conv.peft_tsa = alpha
            conv.register_forward_hook(_tsa_hook)
