"""Linear classification head on ViT tokens, as in MAE / MedCoSS fine-tuning.

``tokens`` (B, 1 + ..., D) -> pool -> ``fc_norm`` (LayerNorm, eps 1e-6) -> ``head`` (Linear) -> logits.

* ``pool="mean"`` (MAE ``global_pool`` and MedCoSS downstream classification): mean of the patch
  tokens. With ``num_patches`` given (the ViT's ``h * w``), the *last* ``num_patches`` tokens are
  averaged, so prompt tokens inserted after the class token (VPT: ``[cls, prompts, patches]``) are
  left out; without it every token but the class token is averaged.
* ``pool="cls"``: the class token (token 0).

The Linear weight is trunc-normal with std 2e-5 (MAE fine-tuning's ``head``), bias zero, so the
initial logits are almost zero and the first steps do not disturb the pre-trained features.
The head is a task head: never a target parameter, always trained.
"""

from __future__ import annotations

import torch
from torch import nn

from tpp_monai.heads.registry import HEADS


@HEADS.register("linear_cls")
class LinearClsHead(nn.Module):
    """``fc_norm`` + Linear over pooled ViT tokens.

    Args:
        embed_dim: ViT width D.
        num_classes: number of logits.
        pool: ``"mean"`` (patch-token mean) or ``"cls"`` (class token).
        fc_norm: LayerNorm before the Linear (eps 1e-6 like MAE/MedCoSS); ``False`` -> Identity.
        init_std: std of the trunc-normal Linear weight init (2e-5 like MAE).
        dropout: dropout before the Linear (0 = none).
    """

    def __init__(self, embed_dim: int, num_classes: int, pool: str = "mean", fc_norm: bool = True,
                 init_std: float = 2e-5, dropout: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.embed_dim, self.num_classes, self.pool = embed_dim, num_classes, pool
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)

    def pool_tokens(self, tokens: torch.Tensor, num_patches: int | None = None) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"expected tokens (B, N, {self.embed_dim}); got {tuple(tokens.shape)}")
        if self.pool == "cls":
            return tokens[:, 0]
        if num_patches is None:
            if tokens.shape[1] < 2:
                raise ValueError("mean pooling needs patch tokens after the class token")
            return tokens[:, 1:].mean(dim=1)
        if not 0 < num_patches < tokens.shape[1] + 1:
            raise ValueError(f"num_patches {num_patches} outside 1..{tokens.shape[1]}")
        return tokens[:, tokens.shape[1] - num_patches:].mean(dim=1)

    def forward(self, tokens: torch.Tensor, num_patches: int | None = None) -> torch.Tensor:
        """(B, N, D) tokens -> (B, num_classes) logits."""
        return self.head(self.head_drop(self.fc_norm(self.pool_tokens(tokens, num_patches))))

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"
