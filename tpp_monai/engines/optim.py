"""The optimiser of the TPP stage and of fine-tuning.

AdamW over what trains: weight decay on weight matrices only (no decay on biases,
norms, 1-d tensors, tokens and position tables). The learning-rate / weight-decay schedule lives in
:mod:`tpp_monai.engines.schedules` (re-exported here: :class:`WarmupCosineSchedule`, :func:`build_schedule`);
each pretext's own recipe is its class's ``defaults`` (:func:`tpp_monai.pretext.pretext_recipe`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tpp_monai.engines.schedules import WarmupCosineSchedule, build_schedule  # noqa: F401  (re-exported)

_NO_DECAY_WORDS = ("bias", "norm", "cls_token", "pos_embed", "mask_token", "prompt", "gamma", "weight_g")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """1-d tensors (biases, norm scales, SSF scale/shift), tokens, position tables, prompts: no decay."""
    last = name.rsplit(".", 1)[-1]
    return p.ndim <= 1 or any(w in last.lower() for w in _NO_DECAY_WORDS) or "norm" in name.lower()


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for n, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if no_weight_decay(n, p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "apply_wd_schedule": True})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "apply_wd_schedule": False})
    return groups


def build_optimizer(
    network: nn.Module, lr: float, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, decay_1d: bool = False,
) -> torch.optim.AdamW:
    """The one optimiser builder (TPP stage, fine-tuning, label app): AdamW over what trains, i.e. a pretext task's
    ``trainable_parameters()`` (target parameters + trainable pretext head) or, for any other module, the parameters
    that require grad (target parameters + task head).

    ``decay_1d=False``: no decay on norms/biases/tokens (timm convention); ``True``: decay on every trainable
    tensor, as MedCoSS's ``AdamW(model.parameters(), lr, weight_decay=1e-4)`` (the bundles' fine-tuning choice).
    Each pretext's lr / weight decay / betas are its class's ``defaults`` (:func:`tpp_monai.pretext.pretext_recipe`).
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"The learning rate must be > 0, got {lr!r} (a bundle's --lr: the paper's per-method values "
                         "are in the bundle's lr_per_method; TPP: leave it unset for the pretext's default)")
    if hasattr(network, "trainable_parameters"):
        trainable = {id(p) for p in network.trainable_parameters()}  # type: ignore[operator]
        named = [(n, p) for n, p in network.named_parameters() if id(p) in trainable]
    else:
        named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"The {type(network).__name__} has no trainable parameters: apply a PEFT method to the "
                         "backbone first (or PEFT froze everything and there is no head)")
    if decay_1d:
        params = list({id(p): p for _, p in named}.values())
        return torch.optim.AdamW([{"params": params, "weight_decay": weight_decay}], lr=lr, betas=tuple(betas), eps=eps)
    return torch.optim.AdamW(param_groups(named, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
