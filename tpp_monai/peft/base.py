"""Base class of a PEFT method: a config dataclass, an ``inject`` that inserts the target
parameters into a backbone, and the rule that says which parameters are target parameters.

Injected modules are named with the ``peft_`` prefix and attached to the hooked module, so the
backbone's own tensor names never change and a backbone checkpoint still loads after injection.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

TARGET_PREFIX = "peft_"


@dataclasses.dataclass
class PeftConfig:
    """Hyper-parameters of a method; subclasses add fields. Stored in target-parameter checkpoints."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PeftMethod:
    """One PEFT method. Subclasses set ``name`` and ``config_cls`` and implement :meth:`inject`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PeftConfig]] = PeftConfig
    #: backbone families the method can be inserted into: "vit" (token models), "cnn" (conv nets)
    applies_to: ClassVar[frozenset[str]] = frozenset({"vit"})
    #: False where the TPP stage cannot train the target parameters (side networks, masks needing data)
    tpp_supported: ClassVar[bool] = True
    #: why not, shown when a pretext task is built on a method with ``tpp_supported = False``
    tpp_refusal: ClassVar[str] = ""
    #: non-empty: the bundles (generic backbone -> head network, AdamW over what requires grad) cannot train this
    #: method, and this says why and which route can; ``tpp_monai.bundle.build_peft_backbone`` refuses it with it
    bundle_refusal: ClassVar[str] = ""

    def __init__(self, config: PeftConfig | dict | None = None, **kwargs: Any) -> None:
        if isinstance(config, dict):
            kwargs = {**config, **kwargs}
            config = None
        if config is None:
            fields = {f.name for f in dataclasses.fields(self.config_cls)}
            unknown = sorted(set(kwargs) - fields)
            if unknown:
                raise TypeError(
                    f"PEFT method '{self.name}' has no option(s) {unknown}; its options are {sorted(fields)}"
                )
            config = self.config_cls(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config

    def inject(self, model: nn.Module) -> None:
        """Insert this method's modules/parameters into ``model`` (in place)."""
        raise NotImplementedError

    def is_target(self, name: str) -> bool:
        """True if the parameter called ``name`` is a target parameter (default: the ``peft_`` prefix)."""
        return any(part.startswith(TARGET_PREFIX) for part in name.split("."))

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the target parameters into the backbone weights for inference (LoRA, SSF, BitFit...)."""
        raise NotImplementedError(f"PEFT method '{self.name}' cannot be merged into the backbone")

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "config": self.config.to_dict()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
