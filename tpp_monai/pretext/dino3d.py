"""3D DINO for CNN encoders (STU-Net) in the TPP stage.

Views: 2 global and ``n_local_crops`` local random 3D crops of each volume patch (crop side a random
fraction of the patch, resized to ``global_size`` / ``local_size`` voxels), random flips, and MONAI
intensity augmentations (scale/shift intensity, Gaussian noise, Gaussian smoothing, contrast).
Student: backbone encoder (``forward_encoder``, context path) with target parameters -> global
average pool of the last stage -> DINO projection head. Teacher: EMA copy (no grads, cosine momentum
0.996 -> 1) sharing the frozen backbone tensors with the student. Centring + sharpening as in 2D DINO
(:class:`tpp_monai.pretext.dino.DINOPretext`, whose loss, EMA and centre code this class reuses).
Trainable: target parameters + projection head.
"""

from __future__ import annotations

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


@PRETEXT_TASKS.register("dino3d")
class DINO3DPretext(DINOPretext):
    """DINO self-distillation on the globally pooled context-path features of a 3D (or 2D) CNN.

    The backbone needs ``forward_encoder(x) -> list of stage outputs`` and ``encoder_dim`` (STU-Net has both).
    ``forward(volumes)`` takes a batch (B, C, *spatial); ``loss_from_views`` skips augmentation.
    """

    name = "dino3d"

    def __init__(
        self, backbone: nn.Module, global_size: Sequence[int] | int = 32, local_size: Sequence[int] | int = 16,
        n_local_crops: int = 4, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
        nlayers: int = 3, norm_last_layer: bool = True, global_scale: Sequence[float] = (0.5, 1.0),
        local_scale: Sequence[float] = (0.1, 0.4), student_temp: float = 0.1, teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04, teacher_temp_warmup_frac: float = 0.3, center_momentum: float = 0.9,
        momentum_teacher: float = 0.996, spatial_dims: int = 3,
    ) -> None:
        PretextTask.__init__(self, backbone)  # not DINOPretext.__init__ (ViT-specific); reuse its methods
        if not hasattr(backbone, "forward_encoder"):
            raise TypeError("dino3d needs a CNN backbone with forward_encoder(x) (e.g. tpp_monai STUNet)")
        dim = getattr(backbone, "encoder_dim", None) or backbone.cfg.dims[-1]
        gs = (global_size,) * spatial_dims if isinstance(global_size, int) else tuple(global_size)
        ls = (local_size,) * spatial_dims if isinstance(local_size, int) else tuple(local_size)
        self._setup_distillation(
            dim, MultiCrop3D(gs, ls, n_local_crops, global_scale, local_scale), out_dim, hidden_dim, bottleneck_dim,
            nlayers, norm_last_layer, student_temp, teacher_temp, warmup_teacher_temp, teacher_temp_warmup_frac,
            center_momentum, momentum_teacher,
        )

    def _cls(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        feat = backbone.forward_encoder(x)[-1]
        return feat.flatten(2).mean(-1)

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
