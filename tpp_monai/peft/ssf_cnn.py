"""SSF for CNNs (scale and shift features, Lian et al. 2022; best CNN method in Dutt et al.):
a per-channel ``scale`` (init 1) and ``shift`` (init 0) after every convolution and every norm layer:
``y <- y * scale + shift``. Identity at insertion; :meth:`SSFCNN.merge` folds them into the convs.
Parameters ``<module>.peft_ssf_scale`` / ``peft_ssf_shift`` (the ViT version is ``ssf``).

A norm layer that applies its activation itself (timm's ``BatchNormAct2d``, an ``nn.BatchNorm2d`` with ``act`` /
``drop`` children, as in timm's EfficientNets) gets its scale and shift between the normalisation and the activation
(a forward pre-hook on its ``act``), where SSF sits in a network with separate BN and activation layers; a forward
hook there would scale the activated output instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (_BatchNorm, _InstanceNorm, nn.GroupNorm)


def _ssf_hook(module: nn.Module, inputs, output):
    shape = (1, -1) + (1,) * (output.ndim - 2)
    return output * module.peft_ssf_scale.view(shape) + module.peft_ssf_shift.view(shape)


def _ssf_pre_act_hook(act: nn.Module, inputs):
    # the norm owning the parameters is a plain attribute of its act (deepcopy maps it to the copied norm)
    norm = act.__dict__["_peft_ssf_norm"]
    x = inputs[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x * norm.peft_ssf_scale.view(shape) + norm.peft_ssf_shift.view(shape),)


def _norm_act(m: nn.Module) -> nn.Module | None:
    """The activation child of a norm layer that applies it itself (timm ``BatchNormAct2d``), else None."""
    act = getattr(m, "act", None)
    return act if isinstance(m, _NORM) and isinstance(act, nn.Module) else None


@dataclass
class SSFCNNConfig(PeftConfig):
    convs: bool = True
    norms: bool = True


@PEFT_METHODS.register("ssf_cnn")
class SSFCNN(PeftMethod):
    name = "ssf_cnn"
    config_cls = SSFCNNConfig
    applies_to = frozenset({"cnn"})

    def inject(self, model: nn.Module) -> None:
        types = (_CONV if self.config.convs else ()) + (_NORM if self.config.norms else ())
        mods = [m for m in model.modules() if isinstance(m, types)]
        if not mods:
            raise TypeError(f"{type(model).__name__} has no convolution/norm layers for ssf_cnn")
        for m in mods:
            c = m.out_channels if isinstance(m, _CONV) else (m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features)
            m.peft_ssf_scale = nn.Parameter(torch.ones(c))
            m.peft_ssf_shift = nn.Parameter(torch.zeros(c))
            act = _norm_act(m)
            if act is not None:
                object.__setattr__(act, "_peft_ssf_norm", m)
                act.register_forward_pre_hook(_ssf_pre_act_hook)
            else:
                m.register_forward_hook(_ssf_hook)

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold SSF into convolutions (weight * scale, bias * scale + shift); norms need the hook kept."""
        for m in model.modules():
            if isinstance(m, _CONV) and hasattr(m, "peft_ssf_scale"):
                s = m.peft_ssf_scale
                m.weight.mul_(s.view((-1,) + (1,) * (m.weight.ndim - 1)))
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros_like(s))
                m.bias.mul_(s).add_(m.peft_ssf_shift)
                s.fill_(1.0)
                m.peft_ssf_shift.zero_()
        return model
