"""BitFit (Ben Zaken et al., 2022): every bias of the backbone is a target parameter; nothing is inserted.

The biases are found at :meth:`inject` time and remembered by qualified name; :meth:`is_target`
also accepts the same names under a wrapper prefix (``"backbone." + name``). Nothing to fold at
merge time: the tuned biases already are the backbone's biases.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class BitFitConfig(PeftConfig):
    pass


@PEFT_METHODS.register("bitfit")
class BitFit(PeftMethod):
    name = "bitfit"
    config_cls = BitFitConfig
    applies_to = frozenset({"vit", "cnn"})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._targets: frozenset[str] = frozenset()

    def inject(self, model: nn.Module) -> None:
        names = [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
        if not names:
            raise TypeError(f"{type(model).__name__} has no bias parameters; bitfit has nothing to tune")
        self._targets = frozenset(names)

    def is_target(self, name: str) -> bool:
        if name in self._targets or any(name.endswith("." + t) for t in self._targets):
            return True
        return super().is_target(name)

    def merge(self, model: nn.Module) -> nn.Module:
        return model
