"""Base class of a pretext task used in the TPP stage.

A task wraps the backbone (with target parameters already inserted) and owns its pretext head
(MAE decoder, DINO projector). Trainable during TPP: the backbone's target parameters and the
parameters the head marks trainable; the backbone's other tensors never change.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class PretextTask(nn.Module):
    """``forward(images) -> {"loss": scalar, ...}``; ``after_step()`` runs after each optimiser step
    (EMA teacher, centre update); ``trainable_parameters()`` is what the optimiser gets."""

    name: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimiser step (default: nothing)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def head_state_dict(self) -> dict[str, Any]:
        """State of the pretext head (everything but the backbone), for resuming the TPP stage."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
