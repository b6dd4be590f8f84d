"""LayerNorm tuning (Dutt et al. baseline): the weights and biases of every LayerNorm of the backbone are
the target parameters; nothing is inserted.

The LayerNorms are found by module type at :meth:`inject` time and remembered by qualified name;
:meth:`is_target` also accepts the same names under a wrapper prefix (``"backbone." + name``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class LNTuningConfig(PeftConfig):
    #: also tune the final norm (``norm``) and the embedding norm, not only the blocks' norm1/norm2
    include_outer_norms: bool = True


def _match(name: str, targets: frozenset[str]) -> bool:
    if name in targets:
        return True
    return any(name.endswith("." + t) for t in targets)


@PEFT_METHODS.register("ln_tuning")
class LNTuning(PeftMethod):
    name = "ln_tuning"
    config_cls = LNTuningConfig
    norm_types: tuple[type[nn.Module], ...] = (nn.LayerNorm,)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._targets: frozenset[str] = frozenset()

    def inject(self, model: nn.Module) -> None:
        names = []
        for mod_name, mod in model.named_modules():
            if not isinstance(mod, self.norm_types):
                continue
            if not self.config.include_outer_norms and not mod_name.startswith("blocks."):
                continue
            names += [f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
        if not names:
            raise TypeError(f"{type(model).__name__} has no LayerNorm with parameters; ln_tuning has nothing to tune")
        self._targets = frozenset(names)

    def is_target(self, name: str) -> bool:
        return _match(name, self._targets) or super().is_target(name)
