"""Attention tuning (Dutt et al. baseline): the self-attention weights of every block, the fused ``qkv``
projection and the output ``proj`` (weights and biases), are the target parameters; nothing is inserted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpp_monai.peft._common import vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class AttnTuningConfig(PeftConfig):
    tune_qkv: bool = True
    tune_proj: bool = True
    tune_bias: bool = True


@PEFT_METHODS.register("attn_tuning")
class AttnTuning(PeftMethod):
    name = "attn_tuning"
    config_cls = AttnTuningConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._targets: frozenset[str] = frozenset()

    def inject(self, model: nn.Module) -> None:
        vit_blocks(model)
        wanted = [m for m, on in (("qkv", self.config.tune_qkv), ("proj", self.config.tune_proj)) if on]
        kinds = ["weight"] + (["bias"] if self.config.tune_bias else [])
        names = []
        for i, blk in enumerate(model.blocks):
            for m in wanted:
                lin = getattr(blk.attn, m)
                names += [f"blocks.{i}.attn.{m}.{k}" for k in kinds if getattr(lin, k, None) is not None]
        self._targets = frozenset(names)

    def is_target(self, name: str) -> bool:
        if name in self._targets or any(name.endswith("." + t) for t in self._targets):
            return True
        return super().is_target(name)
