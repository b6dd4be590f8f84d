"""Linear probing: the backbone is entirely frozen and carries no target parameters; only the task
head (outside the backbone) trains. Nothing is inserted; merging is a no-op.

Not usable for TPP (there is nothing for the pretext stage to train).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class LinearProbeConfig(PeftConfig):
    pass


@PEFT_METHODS.register("linear")
class LinearProbe(PeftMethod):
    name = "linear"
    config_cls = LinearProbeConfig
    applies_to = frozenset({"vit", "cnn"})
    tpp_supported = False
    tpp_refusal = "a linear probe adds no target parameters to the backbone (the head is not one)"

    def inject(self, model: nn.Module) -> None:
        return None

    def is_target(self, name: str) -> bool:
        return False

    def merge(self, model: nn.Module) -> nn.Module:
        return model
