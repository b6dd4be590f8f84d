"""The library's one warm-up + cosine schedule (learning rate, weight decay, DINO teacher momentum).

Every pretext stage uses these functions: the bundle / Python TPP trainer (2D MAE and DINO, through
:class:`WarmupCosineSchedule`), the nnU-Net TPP stage (3D DINO) and DINO's teacher momentum. The maths is
DINO's ``utils.cosine_scheduler`` (and MAE's ``lr_sched``) written per iteration, so resuming needs only the
iteration number:

- ``cosine_value(i, T, start, end) = end + (start - end) * (1 + cos(pi * min(i, T) / T)) / 2``;
- ``warmup_cosine_value(i, T, peak, W, final)`` = ``peak * (i + 1) / W`` for ``i < W`` (linear warm-up that
  reaches ``peak`` on the last warm-up iteration and never takes a zero-lr step), then
  ``cosine_value(i - W, T - W, peak, final)``.

Iterations ``i`` are 0-based. Paper values (METHOD.md section 1): DINO lr ``1e-4 x batch / 256``, warm-up
10 epochs, weight decay cosine 0.04 -> 0.4, teacher momentum cosine 0.996 -> 1; MAE lr 1.5e-3, warm-up 40
epochs, constant weight decay 1.5e-2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def cosine_value(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and later)."""
    total = max(int(total_steps), 1)
    t = min(max(int(step), 0), total) / total
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine_value(step: int, total_steps: int, peak: float, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps`` iterations, then cosine to ``final`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine_value(step - warmup_steps, max(total_steps - warmup_steps, 1), peak, final)


@dataclass
class WarmupCosineSchedule:
    """lr(i) = :func:`warmup_cosine_value` (``lr``, ``warmup_steps``, ``min_lr``); wd(i) = :func:`cosine_value`
    from ``weight_decay`` to ``weight_decay_end`` over ``total_steps`` (constant if ``weight_decay_end`` is None,
    untouched if ``weight_decay`` is None). :meth:`apply` writes both into the optimiser's groups (weight decay
    only into groups with ``apply_wd_schedule``, see :func:`tpp_monai.engines.optim.param_groups`)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float | None = None
    weight_decay_end: float | None = None

    def lr_at(self, i: int) -> float:
        return warmup_cosine_value(i, self.total_steps, self.lr, self.warmup_steps, self.min_lr)

    def wd_at(self, i: int) -> float | None:
        if self.weight_decay is None or self.weight_decay_end is None:
            return self.weight_decay
        return cosine_value(i, self.total_steps, self.weight_decay, self.weight_decay_end)

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


__all__ = ["WarmupCosineSchedule", "build_schedule", "cosine_value", "warmup_cosine_value"]
