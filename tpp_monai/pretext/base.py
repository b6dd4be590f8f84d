"""Base class of a pretext task used in the TPP stage.

A task wraps the backbone (with target parameters already inserted) and owns its pretext head
(MAE decoder, DINO projector). Trainable during TPP: the backbone's target parameters and the
parameters the head marks trainable; the backbone's other tensors never change.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import nn


class PretextTask(nn.Module):
    """``forward(images) -> {"loss": scalar, ...}``; ``after_step()`` runs after each optimiser step
    (EMA teacher, centre update); ``trainable_parameters()`` is what the optimiser gets."""

    name: ClassVar[str] = ""
    #: The optimiser recipe of this pretext (``lr`` or ``lr_per_256``, ``weight_decay``, ``weight_decay_end``,
    #: ``warmup_epochs``, ``betas``, ``min_lr``), owned by the task class; None: a task without one, which the
    #: TPP stage refuses unless every value is given (:func:`pretext_recipe`).
    defaults: ClassVar[Mapping[str, Any] | None] = None

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


RECIPE_KEYS = ("lr", "weight_decay", "weight_decay_end", "warmup_epochs", "betas", "min_lr")


def pretext_defaults(task: PretextTask | type[PretextTask] | str) -> dict[str, Any]:
    """The pretext's own optimiser recipe (a task, its class or its registered name); a pretext that has none is
    a ``ValueError`` naming it (never another pretext's recipe)."""
    cls = _task_class(task)
    if not cls.defaults:
        raise ValueError(f"pretext '{cls.name or cls.__name__}' ({cls.__name__}) has no default optimiser recipe: "
                         f"give lr, weight_decay, weight_decay_end, warmup_epochs and betas explicitly, or set "
                         f"{cls.__name__}.defaults (see MAEPretext.defaults)")
    return dict(cls.defaults)


def default_lr(task: PretextTask | type[PretextTask] | str, batch_size: int) -> float:
    """The pretext's learning rate for ``batch_size`` (DINO-style ``lr_per_256 * batch / 256`` or a fixed ``lr``)."""
    d = pretext_defaults(task)
    return d["lr"] if "lr" in d else d["lr_per_256"] * batch_size / 256


def pretext_recipe(task: PretextTask | type[PretextTask] | str, batch_size: int, **given: Any) -> dict[str, Any]:
    """``given`` (None: the pretext's default) completed from :func:`pretext_defaults`. A pretext without a recipe
    runs only when lr, weight_decay, warmup_epochs and betas are all given (``weight_decay_end`` None: constant)."""
    unknown = set(given) - set(RECIPE_KEYS)
    if unknown:
        raise TypeError(f"unknown TPP recipe option(s) {sorted(unknown)}; use {', '.join(RECIPE_KEYS)}")
    out = {k: given.get(k) for k in RECIPE_KEYS}
    missing = [k for k in ("lr", "weight_decay", "warmup_epochs", "betas") if out[k] is None]
    if missing or _task_class(task).defaults:
        d = pretext_defaults(task)  # raises naming the pretext when it has no recipe
        if out["lr"] is None:
            out["lr"] = default_lr(task, batch_size)
        for k in ("weight_decay", "weight_decay_end", "warmup_epochs", "betas", "min_lr"):
            if out[k] is None:
                out[k] = d.get(k)
    out["min_lr"] = 0.0 if out["min_lr"] is None else out["min_lr"]
    out["betas"] = tuple(out["betas"])
    return out


def _task_class(task: PretextTask | type[PretextTask] | str) -> type[PretextTask]:
    if isinstance(task, str):
        from tpp_monai.pretext.registry import PRETEXT_TASKS

        return PRETEXT_TASKS.get(task)
    return task if isinstance(task, type) else type(task)


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
