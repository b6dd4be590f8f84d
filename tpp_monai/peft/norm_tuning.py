"""Normalisation-layer tuning for CNNs (BatchNorm / InstanceNorm / GroupNorm affine weight and bias as
target parameters; "BatchNorm tuning" in Dutt et al.). Nothing is inserted: the targets are backbone
tensors, listed at :meth:`inject` time. Norms without affine parameters are reported, not silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_KINDS = {"batch": (_BatchNorm,), "instance": (_InstanceNorm,), "group": (nn.GroupNorm,)}


@dataclass
class NormTuningConfig(PeftConfig):
    kinds: tuple[str, ...] = ("batch", "instance", "group")

    def to_dict(self):
        return {"kinds": list(self.kinds)}


@PEFT_METHODS.register("norm_tuning")
class NormTuning(PeftMethod):
    name = "norm_tuning"
    config_cls = NormTuningConfig
    applies_to = frozenset({"cnn"})

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.config.kinds = tuple(self.config.kinds)
        unknown = sorted(set(self.config.kinds) - set(_KINDS))
        if unknown:
            raise ValueError(f"norm_tuning kinds {unknown} unknown; choose from {sorted(_KINDS)}")
        self._names: set[str] = set()

    def inject(self, model: nn.Module) -> None:
        types = tuple(t for k in self.config.kinds for t in _KINDS[k])
        norms = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
        if not norms:
            raise TypeError(f"{type(model).__name__} has no {'/'.join(self.config.kinds)} norm layers to tune")
        no_affine = [n for n, m in norms if getattr(m, "weight", None) is None]
        if len(no_affine) == len(norms):
            raise TypeError("none of the norm layers has affine parameters (affine=False); nothing to tune")
        self._names = {f"{n}.{p}" if n else p for n, m in norms for p, _ in m.named_parameters(recurse=False)}

    def is_target(self, name: str) -> bool:
        return name in self._names or super().is_target(name)
