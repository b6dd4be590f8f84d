"""Optimiser of the TPP stage.

AdamW over ``task.trainable_parameters()``: weight decay on weight matrices only (no decay on biases,
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
    task: nn.Module, lr: float = 1.5e-3, weight_decay: float = 1.5e-2, betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the task's trainable parameters (target parameters + trainable pretext head)."""
    trainable = {id(p) for p in task.trainable_parameters()}  # type: ignore[operator]
    named = [(n, p) for n, p in task.named_parameters() if id(p) in trainable]
    if not named:
        raise ValueError("The task has no trainable parameters: apply a PEFT method to the backbone first")
    return torch.optim.AdamW(param_groups(named, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
