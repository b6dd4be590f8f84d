"""Full fine-tuning: every backbone parameter is a target parameter. Nothing is inserted; merging is a
no-op. The "target checkpoint" of this method is the whole backbone, and its backbone fingerprint
covers buffers only.

Not usable for TPP (TPP keeps the backbone frozen by definition).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class FullConfig(PeftConfig):
    pass


@PEFT_METHODS.register("full")
class FullFineTuning(PeftMethod):
    name = "full"
    config_cls = FullConfig
    applies_to = frozenset({"vit", "cnn"})
    tpp_supported = False

    def inject(self, model: nn.Module) -> None:
        return None

    def is_target(self, name: str) -> bool:
        return True

    def merge(self, model: nn.Module) -> nn.Module:
        return model
