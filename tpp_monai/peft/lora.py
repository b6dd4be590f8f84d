"""LoRA (Hu et al., ICLR 2022): ``W <- W + (alpha / r) * B A`` with ``A`` (r, in) Kaiming-uniform and
``B`` (out, r) zero-initialised, so the network is unchanged at insertion.

Two kinds of layers are supported:

* ``nn.Linear`` layers whose qualified name ends with one of ``targets`` (default ``attn.qkv``; e.g.
  ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``): a forward hook adds ``scale * B(A(x))`` to the output.
  Parameters ``<linear>.peft_lora_A`` / ``peft_lora_B``.
* every ``nn.MultiheadAttention`` (``mha=True``), in any model: LoRA on the fused ``in_proj_weight``
  (q, k and v rows). ``nn.MultiheadAttention`` reads its weights inside
  ``F.multi_head_attention_forward``, so a hook cannot reach them; instead the instance's class is
  switched to :class:`LoRAMultiheadAttention`, a module-level subclass whose ``forward`` uses
  ``in_proj_weight + scale * B A``. Tensor names do not change, the model deep-copies, pickles and
  traces, and :meth:`LoRA.merge` switches the class back. A no-op pre-hook on the adapted MHA keeps
  ``nn.TransformerEncoderLayer`` off its fused inference fast path, which would bypass LoRA. (``out_proj`` of an MHA cannot take a
  Linear LoRA for the same reason; asking for it is an error.)

:meth:`LoRA.merge` folds ``scale * B A`` into the weights and removes parameters, hooks and the
subclass, leaving a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpp_monai.peft.base import TARGET_PREFIX, PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS
from tpp_monai.peft.ssf import remove_forward_hooks


@dataclass
class LoRAConfig(PeftConfig):
    r: int = 8
    alpha: float = 8.0
    #: name suffixes of the nn.Linear layers to adapt
    targets: tuple[str, ...] = ("attn.qkv",)
    #: also adapt the in_proj_weight of every nn.MultiheadAttention
    mha: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)


def _lora_linear_hook(module: nn.Module, inputs, output):
    x = inputs[0]
    return output + F.linear(F.linear(x, module.peft_lora_A), module.peft_lora_B) * module.peft_lora_scale


def _no_fast_path_hook(module: nn.Module, args):
    """No-op pre-hook on an adapted MHA: ``nn.TransformerEncoderLayer`` skips its fused inference fast
    path (which reads ``in_proj_weight`` directly and would bypass LoRA) when a sub-module has hooks."""
    return None


class LoRAMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed in-projection is ``in_proj_weight + scale * B A``.

    Never constructed directly: :class:`LoRA` switches the ``__class__`` of existing instances.
    """

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        w = self.in_proj_weight + (self.peft_lora_B @ self.peft_lora_A) * self.peft_lora_scale
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, w, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


def _is_inserted(name: str) -> bool:
    return any(part.startswith(TARGET_PREFIX) for part in name.split("."))


def _add_lora(module: nn.Module, out_f: int, in_f: int, r: int, scale: float, like: Tensor) -> None:
    a = torch.empty(r, in_f, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=5 ** 0.5)
    module.peft_lora_A = nn.Parameter(a)
    module.peft_lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=like.dtype, device=like.device))
    module.peft_lora_scale = float(scale)


@PEFT_METHODS.register("lora")
class LoRA(PeftMethod):
    name = "lora"
    config_cls = LoRAConfig
    applies_to = frozenset({"vit"})

    def inject(self, model: nn.Module) -> None:
        cfg = self.config
        if cfg.r < 1:
            raise ValueError(f"lora r must be >= 1, got {cfg.r}")
        scale = cfg.alpha / cfg.r
        mha_names = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        linears, mhas = [], []
        for name, m in model.named_modules():
            if _is_inserted(name):
                continue
            if cfg.mha and isinstance(m, nn.MultiheadAttention):
                if not m._qkv_same_embed_dim:
                    raise TypeError(f"lora: nn.MultiheadAttention '{name}' has separate q/k/v weights (kdim/vdim); unsupported")
                mhas.append(m)
            elif isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in cfg.targets):
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                if parent in mha_names:
                    raise TypeError(
                        f"lora: '{name}' belongs to an nn.MultiheadAttention, which never calls it as a module; "
                        "LoRA on MHA adapts in_proj_weight (mha=True)"
                    )
                linears.append(m)
        if not linears and not mhas:
            raise TypeError(
                f"lora found no nn.Linear named *{list(cfg.targets)} and no nn.MultiheadAttention in "
                f"{type(model).__name__}; set targets= to suffixes of its Linear layer names"
            )
        for m in linears:
            _add_lora(m, m.out_features, m.in_features, cfg.r, scale, m.weight)
            m.register_forward_hook(_lora_linear_hook)
        for m in mhas:
            _add_lora(m, 3 * m.embed_dim, m.embed_dim, cfg.r, scale, m.in_proj_weight)
            m.__class__ = LoRAMultiheadAttention
            m.register_forward_pre_hook(_no_fast_path_hook)

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold ``scale * B A`` into the weights; remove LoRA parameters, hooks and the MHA subclass."""
        for m in list(model.modules()):
            if not hasattr(m, "peft_lora_A"):
                continue
            delta = (m.peft_lora_B @ m.peft_lora_A) * m.peft_lora_scale
            if isinstance(m, LoRAMultiheadAttention):
                m.in_proj_weight.add_(delta.to(m.in_proj_weight.dtype))
                m.__class__ = nn.MultiheadAttention
                remove_forward_hooks(m, (_no_fast_path_hook,))
            else:
                m.weight.add_(delta.to(m.weight.dtype))
                remove_forward_hooks(m, (_lora_linear_hook,))
            del m.peft_lora_A, m.peft_lora_B, m.peft_lora_scale
        return model
