"""Whole networks used by bundles and TorchScript export: backbone (+ target parameters) + task head."""

from __future__ import annotations

import torch
from torch import nn


class ViTClassifier(nn.Module):
    """``forward(image) -> logits``: ViT tokens (B, 1 + ..., D) pooled by a :class:`LinearClsHead`.

    The patch count ``h * w`` is passed to the head so mean pooling skips the class token and any
    prompt tokens (VPT). The backbone keeps its PEFT target parameters; the head always trains.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(image)
        h, w = out.grid
        return self.head(out.tokens, h * w)


def build_vit_classifier(backbone: nn.Module, num_classes: int, pool: str = "mean", fc_norm: bool = True,
                         head: str = "linear_cls", **head_kwargs: object) -> ViTClassifier:
    """Wrap a :class:`~tpp_monai.backbones.vit.VisionTransformer` with the registered classification head ``head``
    (``tpp_monai.heads.HEADS``; default the linear head), built as ``HEADS.get(head)(embed_dim, num_classes,
    pool=, fc_norm=, **head_kwargs)`` from the backbone's config."""
    from tpp_monai.heads import HEADS

    module = HEADS.get(head)(backbone.cfg.embed_dim, num_classes, pool=pool, fc_norm=fc_norm, **head_kwargs)
    return ViTClassifier(backbone, module)
