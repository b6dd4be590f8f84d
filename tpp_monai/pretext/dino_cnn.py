"""DINO for CNNs in the TPP stage, 2D and 3D in one code path (``spatial_dims``): EfficientNet encoders and
MONAI FlexibleUNets in 2D, STU-Net in 3D.

Views (``spatial_dims``):

- 2D: DINO's own multi-crop (:class:`tpp_monai.pretext.dino.MultiCropAugment`, the same class the ViT DINO
  uses): 2 global ``RandomResizedCrop`` views of scale (0.4, 1) and ``n_local_crops`` local views of scale
  (0.05, 0.4) of the image as loaded, flips, colour jitter, grayscale, blur, solarisation. Defaults are
  ``main_dino.py``'s (8 local crops, 224 / 96 px, head 65536 / 2048 / 256); the bundles give the crop sizes of
  their images. (DINO's README trains ResNet-50 with scales (0.14, 1) / (0.05, 0.14); the defaults here are its
  code's, as for the ViT, so both 2D tasks see the same views.)
- 3D: :class:`MultiCrop3D`, random 3D crops (side a random fraction of the patch) resized to ``global_size`` /
  ``local_size`` voxels, flips and MONAI intensity augmentations (:class:`DINO3DPretext`'s defaults).

Representation (``features``), decided by the network handed to the task:

- ``"decoder"``: the network has a decoder (``forward_decoder``: STU-Net, :class:`tpp_monai.networks.
  FlexUNetSegmenter`); the feature is the concatenation of the global average pools of the bottleneck and of
  **every decoder stage output**. Why: when target parameters sit in the decoder (STU-Net's Conv-Adapters are
  in every residual block, about 60% of them in the decoder; a FlexibleUNet with PEFT applied to the whole
  network), TPP must pre-train them, and an encoder-only feature leaves them at their init. Pooling every
  stage keeps each stage's parameters under a direct signal rather than only through the last one.
- ``"encoder"``: the pooled last feature map (the bottleneck). For an encoder-only network (the EfficientNet
  encoder, what the 2D CNN bundles hand over: their PEFT method sits in the encoder only and their FlexibleUNet
  decoder / linear head train in fine-tuning) every target parameter is on the path to the last map, and a
  decoder that TPP cannot train (it is not a target) would only shape the encoder's parameters to a random
  decoder's response.
- ``"auto"`` (the 2D default): ``"decoder"`` when the network has ``forward_decoder``, else ``"encoder"``.

Student: backbone with target parameters -> pooled features -> DINO projection head. Teacher: EMA copy (no
grads, cosine momentum 0.996 -> 1) sharing the frozen backbone tensors with the student; centring +
sharpening and the loss (:func:`tpp_monai.pretext.dino.dino_loss`), EMA and centre are
:class:`~tpp_monai.pretext.dino.DINOPretext`'s. Hand-over: the teacher's target parameters. Gradient
accumulation: the centre update averages the teacher outputs of every micro-batch since the last optimiser
step (weighted by their size), so a batch of 64 built from several micro-batches centres like one batch of 64.
Batch norms of the frozen network run in eval mode in TPP (:meth:`CNNDINOPretext.train`): their running
statistics are frozen backbone tensors (part of the fingerprint the hand-over checks), and the pre-trained
statistics are what fine-tuning and inference normalise with. Trainable: target parameters + projection head.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tpp_monai.pretext.base import PretextTask
from tpp_monai.pretext.dino import DINOPretext, MultiCropAugment
from tpp_monai.pretext.registry import PRETEXT_TASKS

FEATURES = ("auto", "decoder", "encoder")


class MultiCrop3D(nn.Module):
    """Global/local random crops of (B, C, *spatial) volumes plus flips and MONAI intensity augmentations."""

    def __init__(
        self, global_size: Sequence[int], local_size: Sequence[int], n_local: int = 4,
        global_scale: Sequence[float] = (0.5, 1.0), local_scale: Sequence[float] = (0.2, 0.5), intensity_prob: float = 0.5,
    ) -> None:
        super().__init__()
        from monai.transforms import (
            Compose, RandAdjustContrast, RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity, RandShiftIntensity,
        )

        p = intensity_prob
        self.intensity = Compose([
            RandScaleIntensity(factors=0.25, prob=0.8),
            RandShiftIntensity(offsets=0.25, prob=0.8),
            RandAdjustContrast(gamma=(0.7, 1.5), prob=p),
            RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=p),
            RandGaussianNoise(std=0.1, prob=p),
        ])
        self.global_size, self.local_size = tuple(global_size), tuple(local_size)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.n_local = n_local

    def _crop(self, vol: torch.Tensor, size: tuple[int, ...], scale: tuple[float, float]) -> torch.Tensor:
        spatial = vol.shape[1:]
        frac = float(torch.empty(()).uniform_(*scale)) ** (1.0 / len(spatial))  # volume fraction -> side fraction
        sides = [max(2, min(s, int(round(s * frac)))) for s in spatial]
        starts = [int(torch.randint(0, s - c + 1, ())) for s, c in zip(spatial, sides)]
        sl = (slice(None),) + tuple(slice(a, a + c) for a, c in zip(starts, sides))
        crop = vol[sl].unsqueeze(0)
        mode = "trilinear" if len(spatial) == 3 else "bilinear"
        crop = F.interpolate(crop, size=size, mode=mode, align_corners=False)[0]
        for d in range(1, crop.ndim):
            if torch.rand(()) < 0.5:
                crop = crop.flip(d)
        out = self.intensity(crop)
        return torch.as_tensor(out).as_subclass(torch.Tensor) if not isinstance(out, torch.Tensor) else out.as_subclass(torch.Tensor)

    @torch.no_grad()
    def forward(self, volumes: torch.Tensor) -> list[torch.Tensor]:
        views: list[list[torch.Tensor]] = [[] for _ in range(2 + self.n_local)]
        for vol in volumes:
            vol = vol.float()
            views[0].append(self._crop(vol, self.global_size, self.global_scale))
            views[1].append(self._crop(vol, self.global_size, self.global_scale))
            for j in range(self.n_local):
                views[2 + j].append(self._crop(vol, self.local_size, self.local_scale))
        return [torch.stack(v).to(volumes.device) for v in views]


def feature_channels(backbone: nn.Module) -> tuple[list[int], list[int]]:
    """(encoder stage channels, decoder stage channels) of a CNN: STU-Net's ``cfg.dims`` (its decoder mirrors the
    encoder), else ``out_channels`` and ``decoder_channels`` (EfficientNet encoder, FlexUNetSegmenter)."""
    cfg = getattr(backbone, "cfg", None)
    if cfg is not None and hasattr(cfg, "dims"):
        dims = list(cfg.dims)
        return dims, dims[:-1]
    if not hasattr(backbone, "out_channels"):
        raise TypeError(f"{type(backbone).__name__} names no feature channels (cfg.dims or out_channels)")
    return list(backbone.out_channels), list(getattr(backbone, "decoder_channels", ()))


@PRETEXT_TASKS.register("dino_cnn")
class CNNDINOPretext(DINOPretext):
    """DINO self-distillation on pooled features of a 2D or 3D CNN (encoder, or encoder + decoder).

    The backbone needs ``forward_encoder(x) -> list of stage outputs`` (or a ``forward(x)`` returning that list,
    as MONAI FlexibleUNet encoders do) and, for ``features="decoder"``, ``forward_decoder(encoder outputs) ->
    list of decoder stage outputs``. ``forward(images)`` takes a batch (B, C, *spatial); ``loss_from_views``
    skips augmentation. ``spatial_dims`` None: the network's (``cfg.spatial_dims`` / ``spatial_dims``), else 2.
    2D defaults are DINO's (see the module). ``multicrop``: ``"dino"`` (DINO's 2D multi-crop,
    images in [0, 1] that the backbone normalises itself; the 2D default), ``"volume"`` (:class:`MultiCrop3D`,
    any intensity range: the nnU-Net stages in 3D *and* 2D, whose patches are z-scored).
    """

    name = "dino_cnn"

    def __init__(
        self, backbone: nn.Module, spatial_dims: int | None = None, global_size: Sequence[int] | int = 224,
        local_size: Sequence[int] | int | None = None, n_local_crops: int = 8, out_dim: int = 65536,
        hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = True,
        global_scale: Sequence[float] = (0.4, 1.0), local_scale: Sequence[float] = (0.05, 0.4),
        student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float | None = 30, teacher_temp_warmup_frac: float | None = None,
        freeze_last_layer: float = 1, center_momentum: float = 0.9, momentum_teacher: float = 0.996,
        features: str = "auto", multicrop: str = "auto",
    ) -> None:
        PretextTask.__init__(self, backbone)  # not DINOPretext.__init__ (ViT-specific); reuse its methods
        if spatial_dims is None:  # the network's own (STU-Net cfg, FlexibleUNet), else 2D
            spatial_dims = int(getattr(getattr(backbone, "cfg", None), "spatial_dims", 0)
                               or getattr(backbone, "spatial_dims", 2))
        if spatial_dims not in (2, 3):
            raise ValueError(f"CNN DINO supports spatial_dims 2 or 3, got {spatial_dims}")
        if not (hasattr(backbone, "forward_encoder") or hasattr(backbone, "out_channels")):
            raise TypeError(f"{self.name} needs a CNN backbone with forward_encoder(x) or a feature-list forward "
                            f"(tpp_monai STUNet, the EfficientNet encoder, FlexUNetSegmenter)")
        if features not in FEATURES:
            raise ValueError(f"{self.name} features must be one of {FEATURES}, got {features!r}")
        if features == "auto":
            features = "decoder" if hasattr(backbone, "forward_decoder") else "encoder"
        if features == "decoder" and not hasattr(backbone, "forward_decoder"):
            raise TypeError(f"{self.name} features='decoder' needs a backbone with forward_decoder (STUNet, "
                            "FlexUNetSegmenter); use features='encoder' for encoder-only CNNs")
        self.features, self.spatial_dims = features, spatial_dims
        enc, dec = feature_channels(backbone)
        dim = enc[-1] + (sum(dec) if features == "decoder" else 0)
        gs = _sizes(global_size, spatial_dims)
        ls = _sizes(local_size if local_size is not None else
                    [max(1, int(round(g * 96 / 224))) for g in gs], spatial_dims)  # DINO's 96 / 224
        stride = getattr(backbone, "total_stride", None)
        if features == "decoder" and stride is not None:
            for what, size in (("global_size", gs), ("local_size", ls)):
                if any(c % t for c, t in zip(size, stride)) or math.prod(c // t for c, t in zip(size, stride)) < 2:
                    raise ValueError(f"{self.name} {what} {list(size)} must be a multiple of the network's total "
                                     f"stride {list(stride)} per axis (and leave more than one bottleneck voxel for "
                                     f"the instance norms) to pass through the decoder; choose crop sizes accordingly")
        if multicrop not in ("auto", "dino", "volume"):
            raise ValueError(f"multicrop must be 'auto', 'dino' or 'volume', got {multicrop!r}")
        if multicrop == "dino" or (multicrop == "auto" and spatial_dims == 2):
            if spatial_dims != 2 or gs[0] != gs[1] or ls[0] != ls[1]:
                raise ValueError(f"DINO's 2D multi-crop makes square crops of 2D images; got {list(gs)}, {list(ls)}")
            augment: nn.Module = MultiCropAugment(gs[0], ls[0], n_local_crops, global_scale, local_scale)
        else:
            augment = MultiCrop3D(gs, ls, n_local_crops, global_scale, local_scale)
        self._setup_distillation(
            dim, augment, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer, student_temp, teacher_temp,
            warmup_teacher_temp, teacher_temp_warmup_frac, center_momentum, momentum_teacher,
        )
        self.warmup_teacher_temp_epochs = None if warmup_teacher_temp_epochs is None else float(warmup_teacher_temp_epochs)
        self.freeze_last_layer = float(freeze_last_layer)
        if self.freeze_last_layer > 0:
            for p in self.head.last_layer.parameters():
                if p.requires_grad:
                    p.register_hook(self._cancel_last_layer_grad)
        self._pending_n = 0

    def _cls(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        enc = backbone.forward_encoder(x) if hasattr(backbone, "forward_encoder") else backbone(x)
        maps = [enc[-1]] + (list(backbone.forward_decoder(enc)) if self.features == "decoder" else [])
        return torch.cat([m.flatten(2).mean(-1) for m in maps], dim=1)

    def train(self, mode: bool = True) -> "CNNDINOPretext":
        """Train mode for the task, but the networks' batch norms stay in eval mode (frozen statistics)."""
        super().train(mode)
        for net in (self.backbone, self.teacher_backbone):
            for m in net.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def loss_from_views(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """DINO loss; the pending centre averages the teacher outputs of all micro-batches since the last step."""
        prev, n_prev = self._pending_center, self._pending_n
        out = super().loss_from_views(views)
        if self.training and self._pending_center is not None:
            n = 2 * views[0].shape[0]
            if prev is not None and n_prev:
                self._pending_center = (prev * n_prev + self._pending_center * n) / (n_prev + n)
            self._pending_n = n_prev + n
        return out

    @torch.no_grad()
    def update_center(self) -> None:
        super().update_center()
        self._pending_n = 0

    def config(self) -> dict:
        return {**super().config(), "spatial_dims": self.spatial_dims, "features": self.features}


@PRETEXT_TASKS.register("dino3d")
class DINO3DPretext(CNNDINOPretext):
    """:class:`CNNDINOPretext` with the 3D defaults of the nnU-Net TPP stage (STU-Net), under the registered name and
    checkpoint key ``dino3d``: 32^3 / 16^3 crops of scale (0.5, 1) / (0.1, 0.4), 4 local crops, a smaller head
    (1024 / 512 / 128), the teacher-temperature warm-up over 30% of the steps, no frozen last layer, and the
    decoder representation; :class:`MultiCrop3D` views in any ``spatial_dims`` (nnU-Net's 2D configurations feed it
    z-scored 2D patches)."""

    name = "dino3d"

    def __init__(
        self, backbone: nn.Module, global_size: Sequence[int] | int = 32, local_size: Sequence[int] | int = 16,
        n_local_crops: int = 4, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
        nlayers: int = 3, norm_last_layer: bool = True, global_scale: Sequence[float] = (0.5, 1.0),
        local_scale: Sequence[float] = (0.1, 0.4), student_temp: float = 0.1, teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04, teacher_temp_warmup_frac: float = 0.3, center_momentum: float = 0.9,
        momentum_teacher: float = 0.996, spatial_dims: int = 3, features: str = "decoder",
    ) -> None:
        super().__init__(
            backbone, spatial_dims=spatial_dims, global_size=global_size, local_size=local_size,
            n_local_crops=n_local_crops, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
            nlayers=nlayers, norm_last_layer=norm_last_layer, global_scale=global_scale, local_scale=local_scale,
            student_temp=student_temp, teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
            warmup_teacher_temp_epochs=None, teacher_temp_warmup_frac=teacher_temp_warmup_frac, freeze_last_layer=0,
            center_momentum=center_momentum, momentum_teacher=momentum_teacher, features=features,
            multicrop="volume",
        )


def _sizes(size: Sequence[int] | int, spatial_dims: int) -> tuple[int, ...]:
    out = (int(size),) * spatial_dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(out) != spatial_dims:
        raise ValueError(f"crop size {list(out)} does not have {spatial_dims} axes")
    return out


def pretext_name_for(pretext: str, backbone: nn.Module) -> str:
    """The registered task for ``pretext`` on ``backbone``: ``dino`` on a CNN (no ViT patch embedding) is
    ``dino_cnn``, so ``--pretext dino`` means DINO whatever the backbone; every other name is itself."""
    is_vit = hasattr(getattr(backbone, "cfg", None), "patch_size")
    return "dino_cnn" if str(pretext).lower() == "dino" and not is_vit else str(pretext)
