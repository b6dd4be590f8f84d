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


# ---------------------------------------------------------------------------------------------- 2D CNN encoders
def freeze_batchnorm_statistics(module: nn.Module) -> nn.Module:
    """Put ``module``'s batch norms in eval mode, unless its PEFT method is ``full`` (every tensor trains).

    Why: with a frozen pre-trained CNN the running statistics are backbone tensors like the weights (they are in
    the fingerprint a target-parameter checkpoint is checked against) and the features the target parameters are
    trained on (TPP) and fine-tuned on must be those of the pre-trained statistics, not of each small batch.
    Call it after every ``train()`` (the networks here and the CNN DINO task do)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from tpp_monai.peft.api import PEFT_ATTR

    method = getattr(module, PEFT_ATTR, None)
    if method is not None and method.name == "full":
        return module
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    return module


class CNNClassifier(nn.Module):
    """``forward(image) -> logits``: a CNN encoder (``forward`` -> feature maps, PEFT inside), the global average
    pool of its last map, and a registered classification head.

    The pooled map is handed to the head as (B, H*W, C) tokens with ``num_patches = H*W``, so the ViT heads of
    ``tpp_monai.heads.HEADS`` (``linear_cls``: mean over the tokens, optional LayerNorm, Linear) are the global
    pool + linear head of a CNN. The encoder's batch norms keep their pre-trained statistics
    (:func:`freeze_batchnorm_statistics`); the head always trains.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        last = self.backbone(image)[-1]
        return self.head(last.flatten(2).transpose(1, 2), last.shape[-2] * last.shape[-1])

    def train(self, mode: bool = True) -> "CNNClassifier":
        super().train(mode)
        freeze_batchnorm_statistics(self.backbone)
        return self


def build_cnn_classifier(backbone: nn.Module, num_classes: int, head: str = "linear_cls", fc_norm: bool = False,
                         **head_kwargs: object) -> CNNClassifier:
    """A CNN encoder (``out_channels``) + global average pool + the registered head ``head`` (default the linear
    head, without the ViT's LayerNorm: a CNN classifier is pool -> Linear, as timm's)."""
    from tpp_monai.heads import HEADS

    module = HEADS.get(head)(int(backbone.out_channels[-1]), num_classes, pool="mean", fc_norm=fc_norm, **head_kwargs)
    return CNNClassifier(backbone, module)


def _flexible_unet():
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet


class FlexUNetSegmenter(_flexible_unet()):  # type: ignore[misc]
    """MONAI ``FlexibleUNet`` (its ``UNetDecoder`` and segmentation head, not a hand-written decoder) around a given
    encoder: the pre-trained encoder with its PEFT target parameters, registered in MONAI's ``FLEXUNET_BACKBONE``
    under ``encoder_name``. FlexibleUNet builds its own encoder from that registry; it is replaced by ``encoder``
    (same class, same channels), so the decoder is exactly FlexibleUNet's.

    ``backbone`` is the encoder (the attribute every tpp_monai network exposes for its target parameters;
    FlexibleUNet's own ``backbone`` string is kept as ``backbone_name``). ``forward_encoder`` / ``forward_decoder``
    (the output of every decoder stage) let the CNN DINO pool the decoder stages
    (:mod:`tpp_monai.pretext.dino_cnn`) when the decoder carries target parameters. The encoder's batch norms
    keep their pre-trained statistics (:func:`freeze_batchnorm_statistics`); the decoder's train.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, encoder_name: str = "tpp-efficientnet-lite0",
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16), **flexunet_kwargs: object) -> None:
        super().__init__(int(getattr(encoder, "in_chans", 3)), num_classes, backbone=encoder_name, pretrained=False,
                         decoder_channels=tuple(decoder_channels), spatial_dims=2, **flexunet_kwargs)
        self.encoder = encoder
        self.decoder_channels = tuple(int(c) for c in tuple(decoder_channels)[: len(self.decoder.blocks)])

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.encoder

    @backbone.setter
    def backbone(self, name: str) -> None:  # FlexibleUNet.__init__ stores its encoder's registry name
        self.backbone_name = name

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.encoder.out_channels)

    def forward_encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encoder(x))

    def forward_decoder(self, enc: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every decoder stage's output (deepest first); the last is what ``segmentation_head`` sees (as
        MONAI's ``UNetDecoder.forward``: skips are the encoder maps but the last, deepest first)."""
        skips, x, out = enc[:-1][::-1], enc[-1], []
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, skips[i] if i < self.skip_connect else None)
            out.append(x)
        return out

    def train(self, mode: bool = True) -> "FlexUNetSegmenter":
        super().train(mode)
        freeze_batchnorm_statistics(self.encoder)
        return self


def build_flexunet_segmenter(encoder: nn.Module, num_classes: int,
                             decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
                             encoder_name: str = "tpp-efficientnet-lite0") -> FlexUNetSegmenter:
    """:class:`FlexUNetSegmenter`: MONAI FlexibleUNet with ``encoder`` (PEFT applied to it only) and a new decoder."""
    return FlexUNetSegmenter(encoder, num_classes, encoder_name=encoder_name, decoder_channels=decoder_channels)
