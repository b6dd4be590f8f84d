"""Optimiser and per-iteration schedules of the TPP stage.

AdamW over ``task.trainable_parameters()``: weight decay on weight matrices only (no decay on biases,
norms, 1-d tensors, tokens and position tables). :class:`WarmupCosineSchedule` gives the learning rate
(linear warm-up then cosine to ``min_lr``) and the weight decay (cosine ``weight_decay`` ->
``weight_decay_end``) as pure functions of the iteration, so resuming needs only the iteration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
from torch import nn

#: Paper defaults (METHOD.md section 1). DINO's lr is ``lr_per_256 * batch / 256``.
PRETEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "mae": {"lr": 1.5e-3, "weight_decay": 1.5e-2, "weight_decay_end": None, "warmup_epochs": 40,
            "betas": (0.9, 0.95), "min_lr": 0.0},
    "dino": {"lr_per_256": 1e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_epochs": 10,
             "betas": (0.9, 0.999), "min_lr": 0.0},
}

_NO_DECAY_WORDS = ("bias", "norm", "cls_token", "pos_embed", "mask_token", "prompt", "gamma", "weight_g")


def default_lr(pretext: str, batch_size: int) -> float:
    """The paper's learning rate for a pretext task and batch size."""
    d = PRETEXT_DEFAULTS[pretext.lower()]
    return d["lr"] if "lr" in d else d["lr_per_256"] * batch_size / 256


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


@dataclass
class WarmupCosineSchedule:
    """lr(i) = lr * (i + 1) / warmup for i < warmup, then cosine from lr to min_lr at ``total_steps``;
    wd(i) = cosine from ``weight_decay`` to ``weight_decay_end`` (constant if None) over ``total_steps``.

    Iterations ``i`` are 0-based. :meth:`apply` writes both into the optimiser's groups (weight decay
    only into groups with ``apply_wd_schedule``).
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float | None = None
    weight_decay_end: float | None = None

    def lr_at(self, i: int) -> float:
        if self.warmup_steps > 0 and i < self.warmup_steps:
            return self.lr * (i + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(i - self.warmup_steps, 0), span) / span
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    def wd_at(self, i: int) -> float | None:
        if self.weight_decay is None:
            return None
        if self.weight_decay_end is None:
            return self.weight_decay
        t = min(max(i, 0), max(self.total_steps, 1)) / max(self.total_steps, 1)
        return self.weight_decay_end + (self.weight_decay - self.weight_decay_end) * 0.5 * (1 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, i: int) -> float:
        lr, wd = self.lr_at(i), self.wd_at(i)
        for g in optimizer.param_groups:
            g["lr"] = lr
            if wd is not None and g.get("apply_wd_schedule", g.get("weight_decay", 0) > 0):
                g["weight_decay"] = wd
        return lr

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def build_schedule(
    lr: float, epochs: int, iters_per_epoch: int, warmup_epochs: float = 0, min_lr: float = 0.0,
    weight_decay: float | None = None, weight_decay_end: float | None = None,
) -> WarmupCosineSchedule:
    """Schedule from epoch counts; the warm-up is clipped to the run's length."""
    total = max(int(epochs * iters_per_epoch), 1)
    warm = min(int(round(warmup_epochs * iters_per_epoch)), total)
    return WarmupCosineSchedule(lr, total, warm, min_lr, weight_decay, weight_decay_end)
