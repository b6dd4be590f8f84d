"""3D DINO for CNN segmentation networks (STU-Net) in the TPP stage.

Views: 2 global and ``n_local_crops`` local random 3D crops of each volume patch (crop side a random
fraction of the patch, resized to ``global_size`` / ``local_size`` voxels), random flips, and MONAI
intensity augmentations (scale/shift intensity, Gaussian noise, Gaussian smoothing, contrast).

Representation (``features``):

- ``"decoder"`` (default): the whole segmentation network except ``seg_outputs`` runs; the DINO feature is
  the concatenation of the global average pools of the bottleneck and of **every decoder stage output**
  (the maps the deep-supervision heads ``seg_outputs`` see in fine-tuning). Why: Conv-Adapters sit in every
  residual block, encoder *and* decoder, and TPP must pre-train every target parameter that fine-tuning
  trains. An encoder-only DINO leaves the decoder adapters (about 60% of the adapter parameters of
  STU-Net-B with the original Conv-Adapter) at their initial values; through the decoder, every adapter is
  on the path to the loss (encoder adapters through the bottleneck and the skips). DINO stays the pretext,
  as in the paper for STU-Net (Table 10), and pooling every decoder stage keeps each stage's adapters
  under a direct signal rather than only through the last one. Crop sizes must be multiples of the
  network's total stride (checked).
- ``"encoder"``: the earlier behaviour, the pooled bottleneck only (decoder adapters get no signal).

Student: backbone with target parameters -> pooled features -> DINO projection head. Teacher: EMA copy (no
grads, cosine momentum 0.996 -> 1) sharing the frozen backbone tensors with the student. Centring +
sharpening as in 2D DINO (:class:`tpp_monai.pretext.dino.DINOPretext`, whose loss, EMA and centre code this
class reuses). Gradient accumulation: the centre update averages the teacher outputs of every
micro-batch since the last optimiser step (weighted by their size), so a batch of 64 built from several
micro-batches centres like one batch of 64. Trainable: target parameters + projection head.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.pretext.base import PretextTask
from tpp_monai.pretext.dino import DINOPretext
from tpp_monai.pretext.registry import PRETEXT_TASKS


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


FEATURES = ("decoder", "encoder")


@PRETEXT_TASKS.register("dino3d")
class DINO3DPretext(DINOPretext):
    """DINO self-distillation on pooled features of a 3D (or 2D) CNN segmentation network.

    The backbone needs ``forward_encoder(x) -> list of stage outputs`` and, for ``features="decoder"``,
    ``forward_decoder(encoder outputs) -> list of decoder stage outputs`` (STU-Net has both).
    ``forward(volumes)`` takes a batch (B, C, *spatial); ``loss_from_views`` skips augmentation.
    """

    name = "dino3d"

    def __init__(
        self, backbone: nn.Module, global_size: Sequence[int] | int = 32, local_size: Sequence[int] | int = 16,
        n_local_crops: int = 4, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
        nlayers: int = 3, norm_last_layer: bool = True, global_scale: Sequence[float] = (0.5, 1.0),
        local_scale: Sequence[float] = (0.1, 0.4), student_temp: float = 0.1, teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04, teacher_temp_warmup_frac: float = 0.3, center_momentum: float = 0.9,
        momentum_teacher: float = 0.996, spatial_dims: int = 3, features: str = "decoder",
    ) -> None:
        PretextTask.__init__(self, backbone)  # not DINOPretext.__init__ (ViT-specific); reuse its methods
        if not hasattr(backbone, "forward_encoder"):
            raise TypeError("dino3d needs a CNN backbone with forward_encoder(x) (e.g. tpp_monai STUNet)")
        if features not in FEATURES:
            raise ValueError(f"dino3d features must be one of {FEATURES}, got {features!r}")
        if features == "decoder" and not hasattr(backbone, "forward_decoder"):
            raise TypeError("dino3d features='decoder' needs a backbone with forward_decoder (e.g. tpp_monai STUNet); "
                            "use features='encoder' for encoder-only CNNs")
        self.features = features
        dims = list(backbone.cfg.dims)
        dim = dims[-1] + (sum(dims[:-1]) if features == "decoder" else 0)
        gs = (global_size,) * spatial_dims if isinstance(global_size, int) else tuple(global_size)
        ls = (local_size,) * spatial_dims if isinstance(local_size, int) else tuple(local_size)
        stride = getattr(backbone, "total_stride", None)
        if features == "decoder" and stride is not None:
            for what, size in (("global_size", gs), ("local_size", ls)):
                if any(c % t for c, t in zip(size, stride)) or math.prod(c // t for c, t in zip(size, stride)) < 2:
                    raise ValueError(f"dino3d {what} {list(size)} must be a multiple of the network's total stride "
                                     f"{list(stride)} per axis (and leave more than one bottleneck voxel for the "
                                     f"instance norms) to pass through the decoder; choose crop sizes accordingly")
        self._setup_distillation(
            dim, MultiCrop3D(gs, ls, n_local_crops, global_scale, local_scale), out_dim, hidden_dim, bottleneck_dim,
            nlayers, norm_last_layer, student_temp, teacher_temp, warmup_teacher_temp, teacher_temp_warmup_frac,
            center_momentum, momentum_teacher,
        )
        self._pending_n = 0

    def _cls(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        enc = backbone.forward_encoder(x)
        maps = [enc[-1]] + (backbone.forward_decoder(enc) if self.features == "decoder" else [])
        return torch.cat([m.flatten(2).mean(-1) for m in maps], dim=1)

    def _student(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        groups: list[list[torch.Tensor]] = []
        for v in views:
            if groups and groups[-1][0].shape[2:] == v.shape[2:]:
                groups[-1].append(v)
            else:
                groups.append([v])
        for g in groups:
            out.extend(self.head(self._cls(self.backbone, torch.cat(g))).chunk(len(g)))
        return out

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
