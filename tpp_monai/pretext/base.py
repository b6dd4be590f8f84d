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
        _refuse_non_tpp_method(backbone)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimiser step (default: nothing)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def handover_backbone(self) -> nn.Module:
        """The backbone whose target parameters are handed over to fine-tuning (default: the trained one)."""
        return self.backbone

    def head_state_dict(self) -> dict[str, Any]:
        """State of the pretext head (everything but the backbone), for resuming the TPP stage."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_head_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`head_state_dict` (resuming the TPP stage); names every missing/extra key."""
        expected = set(self.head_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"Pretext head state does not fit this {type(self).__name__}: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]}. Resume with the same pretext task and options."
            )
        self.load_state_dict(state, strict=False)


def _refuse_non_tpp_method(backbone: nn.Module) -> None:
    """A pretext task trains target parameters; methods whose parameters TPP cannot train are refused.

    ``full`` passes: a pretext task over the whole backbone is ordinary (upstream) pre-training.
    """
    from tpp_monai.peft.api import PEFT_ATTR
    from tpp_monai.peft.registry import methods_for

    method = getattr(backbone, PEFT_ATTR, None)
    if method is None or method.tpp_supported or method.name == "full":
        return
    family = "vit" if isinstance(getattr(backbone, "blocks", None), nn.ModuleList) else "cnn"
    raise ValueError(
        f"PEFT method '{method.name}' cannot be pre-trained by a pretext task (TPP): "
        f"{method.tpp_refusal or 'it has no target parameters of its own to pre-train'}. "
        f"Use it without the TPP stage, or pick a TPP-capable method: {', '.join(methods_for(family, tpp=True))}."
    )
