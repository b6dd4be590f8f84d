"""SSF for ViTs (Scale and Shift deep Features, Lian et al., NeurIPS 2022): a per-feature ``scale``
(init 1) and ``shift`` (init 0) after every Linear and LayerNorm of the backbone and after the
patch-embedding convolution: ``y <- y * scale + shift``. Identity at insertion.

The fused attention in-projection (``attn.qkv``) gets no SSF by default (``qkv=False``): MedCoSS's
attention is ``nn.MultiheadAttention``, whose in-projection is a bare weight, not an ``nn.Linear``,
so the TPP paper's SSF on MedCoSS has none. With it off, SSF on the MedCoSS ViT-B has 150,528
parameters, which reproduces the paper's Ratio (0.172% cls / 2.17% seg; docs/PEFT_RATIOS.md);
``qkv=True`` is the SSF paper's own ViT placement (+55,296 on ViT-B).

Parameters ``<module>.peft_ssf_scale`` / ``<module>.peft_ssf_shift``. :meth:`SSF.merge` folds them
into the preceding op (Linear/Conv: ``W <- diag(s) W``, ``b <- s * b + t``; LayerNorm:
``gamma <- s * gamma``, ``beta <- s * beta + t``), then removes the parameters and the hooks, which
leaves a plain backbone with the backbone's own tensor names. (The CNN variant is ``ssf_cnn``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from tpp_monai.peft.base import TARGET_PREFIX, PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class SSFConfig(PeftConfig):
    linears: bool = True
    norms: bool = True
    patch_embed: bool = True
    #: SSF after the fused qkv Linear too (SSF paper on timm ViTs); off = MedCoSS / TPP paper
    qkv: bool = False


def _ssf_last_dim(module: nn.Module, inputs, output):
    return output * module.peft_ssf_scale + module.peft_ssf_shift


def _ssf_channel_dim(module: nn.Module, inputs, output):
    shape = (1, -1) + (1,) * (output.ndim - 2)
    return output * module.peft_ssf_scale.view(shape) + module.peft_ssf_shift.view(shape)


def remove_forward_hooks(module: nn.Module, fns: Iterable[Callable]) -> int:
    """Remove every forward hook / pre-hook of ``module`` that is one of ``fns``; returns how many.

    Works on deep copies too (no handle needed): hooks are found by identity of the function.
    """
    fns = tuple(fns)
    n = 0
    for attr in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = getattr(module, attr)
        for hid in [k for k, f in hooks.items() if f in fns]:
            del hooks[hid]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(hid, None)
            n += 1
    return n


def _is_inserted(name: str) -> bool:
    return any(part.startswith(TARGET_PREFIX) for part in name.split("."))


@PEFT_METHODS.register("ssf")
class SSF(PeftMethod):
    name = "ssf"
    config_cls = SSFConfig

    def _modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        types: tuple[type[nn.Module], ...] = ()
        if self.config.linears:
            types += (nn.Linear,)
        if self.config.norms:
            types += (nn.LayerNorm,)
        out = []
        for name, m in model.named_modules():
            if _is_inserted(name):
                continue
            if not self.config.qkv and (name == "qkv" or name.endswith(".qkv")):
                continue
            if isinstance(m, types) or (self.config.patch_embed and isinstance(m, nn.Conv2d) and name.endswith("patch_embed.proj")):
                out.append((name, m))
        return out

    def inject(self, model: nn.Module) -> None:
        mods = self._modules(model)
        if not mods:
            raise TypeError(f"{type(model).__name__} has no Linear/LayerNorm/patch-embedding layers for ssf")
        for _, m in mods:
            if isinstance(m, nn.Linear):
                c, hook = m.out_features, _ssf_last_dim
            elif isinstance(m, nn.LayerNorm):
                if len(m.normalized_shape) != 1:
                    raise TypeError("ssf supports LayerNorm over the last dimension only")
                c, hook = m.normalized_shape[0], _ssf_last_dim
            else:
                c, hook = m.out_channels, _ssf_channel_dim
            m.peft_ssf_scale = nn.Parameter(torch.ones(c))
            m.peft_ssf_shift = nn.Parameter(torch.zeros(c))
            m.register_forward_hook(hook)

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold scale/shift into the preceding op's weight/bias and remove the SSF parameters and hooks."""
        for _, m in list(model.named_modules()):
            if not hasattr(m, "peft_ssf_scale"):
                continue
            s, t = m.peft_ssf_scale.detach(), m.peft_ssf_shift.detach()
            if isinstance(m, nn.LayerNorm) and m.weight is None:
                raise TypeError("cannot merge ssf into a LayerNorm without affine parameters")
            w = m.weight
            w.mul_(s.view((-1,) + (1,) * (w.ndim - 1)).to(w.dtype))
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(s.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
            m.bias.mul_(s.to(w.dtype)).add_(t.to(w.dtype))
            del m.peft_ssf_scale, m.peft_ssf_shift
            remove_forward_hooks(m, (_ssf_last_dim, _ssf_channel_dim))
        return model
