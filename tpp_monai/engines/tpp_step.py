"""The one TPP optimiser step, shared by the API/bundles' :class:`~tpp_monai.engines.tpp_trainer.TPPTrainer` and the
nnU-Net TPP stage (:mod:`tpp_monai.nnunet.trainers`), so both do AMP, loss scaling, clipping and the pretext's
``after_step`` hook (EMA teacher, centre) the same way.

Per step: zero the gradients; for each of ``accumulation`` micro-batches, forward under autocast and backward of
``loss / accumulation`` (through the GradScaler for float16; under DDP the all-reduce runs on the last micro-batch
only); refuse a non-finite loss (averaged over ranks, so every rank stops together) before anything changes;
unscale and clip the gradients of the trainable parameters; optimiser step (through the scaler); ``after_step``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from tpp_monai.engines.amp import autocast
from tpp_monai.engines.distributed import accumulation_context, mean_over_ranks


def tpp_step(
    task: nn.Module, forward: Callable[[torch.Tensor], dict], optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor], *, step: int, total_steps: int, device: torch.device | str,
    amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None, clip_grad: float | None = None,
    accumulation: int = 1, ddp_module: nn.Module | None = None,
) -> torch.Tensor:
    """One optimiser step of the TPP stage (see the module docstring); returns the step's loss (the sum of the
    ``accumulation`` scaled micro-batch losses, averaged over ranks). ``forward``: the (DDP-wrapped, compiled) task;
    ``batches``: an iterable of image batches, of which the first ``accumulation`` are used (the nnU-Net stage
    passes its infinite loader); ``step``: the 0-based optimiser step handed to ``task.after_step``."""
    if accumulation < 1:
        raise ValueError(f"accumulation must be >= 1, got {accumulation}")
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    taken = 0
    for k, images in zip(range(accumulation), batches):
        with accumulation_context(ddp_module if ddp_module is not None else forward, last=k == accumulation - 1):
            with autocast(device, amp_dtype):
                loss = forward(images)["loss"] / accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach().float()
        taken += 1
    if taken != accumulation:
        raise ValueError(f"the TPP step needs {accumulation} micro-batches, the data gave {taken}")
    mean_loss = mean_over_ranks(total)
    if not torch.isfinite(mean_loss):
        raise FloatingPointError(f"TPP loss is {mean_loss.item()} at iteration {step + 1}; lower the lr or check inputs")
    if clip_grad:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    task.after_step(step, total_steps)
    return mean_loss
