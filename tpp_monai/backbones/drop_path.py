"""Stochastic depth (drop-path) on the residual branches of a ViT, switched on for fine-tuning.

MedCoSS fine-tunes with ``drop_path_ratio=0.1`` in every block (uniform, not a linear ramp;
``Downstream/Dim_2/*/model/Unimodel.py``).  The branches are ``ls1(attn(norm1(x)))`` and
``ls2(mlp(norm2(x)))`` of :class:`~tpp_monai.backbones.vit.Block`; a forward hook on ``ls1`` /
``ls2`` (LayerScale, or Identity when the backbone has none) scales each sample's branch output by
``Bernoulli(1 - rate) / (1 - rate)`` in training mode (MONAI ``DropPath``, as timm's ``drop_path``).
Hooks keep the state dict, the backbone fingerprint and TorchScript tracing in eval mode unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

_HANDLES = "_tpp_drop_path_handles"


def _hook(rate: float):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training or rate == 0.0:
            return output
        keep = 1.0 - rate
        mask = output.new_empty((output.shape[0],) + (1,) * (output.ndim - 1)).bernoulli_(keep)
        return output * mask / keep

    return hook


def set_drop_path(vit: nn.Module, rate: float) -> nn.Module:
    """Drop-path ``rate`` on every block's two residual branches (0 removes it); returns ``vit``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path rate must be in [0, 1), got {rate}")
    for h in getattr(vit, _HANDLES, []):
        h.remove()
    handles = []
    if rate > 0:
        for blk in vit.blocks:
            handles += [blk.ls1.register_forward_hook(_hook(rate)), blk.ls2.register_forward_hook(_hook(rate))]
    setattr(vit, _HANDLES, handles)
    vit.drop_path_rate = float(rate)
    return vit
