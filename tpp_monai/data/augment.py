"""Fine-tuning (stage 3) augmentations of MedCoSS's downstream 2D code, which the TPP paper follows.

The TPP paper names no fine-tuning augmentation; MedCoSS's downstream scripts use two recipes:

* classification (``Downstream/Dim_2/{Chest_XR,NCT_CRC_HE}/dataloader.py``, torchvision on PIL):
  ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``, ``RandomGrayscale(p=0.2)``,
  ``RandomApply([GaussianBlur(sigma 0.1-2.0)], p=0.5)``, ``RandomHorizontalFlip()``
  -> :func:`cls_augmentations` (torchvision's tensor ops on the [0, 1] image; the blur uses a
  Gaussian kernel of standard deviation sigma as PIL's ``GaussianBlur(radius=sigma)`` does).
* segmentation (``Downstream/Dim_2/{Glas,QaTa_CoV19}/DSDataset.py``, nnU-Net's batchgenerators):
  spatial transform with rotation +-15 deg (p 0.1), scaling 0.75-1.25 (p 0.1), elastic deformation
  (p 0.1); mirroring on both axes; multiplicative brightness 0.7-1.5 (p 0.15); gamma 0.5-2 on the
  inverted image (p 0.15); Gaussian noise (p 0.15); Gaussian blur sigma 0.5-1.5 (p 0.15)
  -> :func:`seg_augmentations` with MONAI's equivalents.  MedCoSS z-scores each segmentation image
  before augmenting, so its noise variance (0-0.05) is in units of the image's std; here images are
  in [0, 1] (std ~0.2), hence noise std up to ``0.05``  (~ sqrt(0.05) x 0.2).  Elastic deformation
  is MONAI's ``Rand2DElasticd`` (not batchgenerators' exact field).

``recipe="legacy"`` gives the former tpp-monai augmentation (flips, rot90, affine, intensity), not MedCoSS's.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import torch
from monai.transforms import (
    MapTransform, Rand2DElasticd, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
    RandGaussianSmoothd, RandomizableTransform, RandRotate90d, RandRotated, RandScaleIntensityd,
    RandShiftIntensityd, RandZoomd,
)

RECIPES = ("medcoss", "legacy", "none")


class RandColorAugd(RandomizableTransform, MapTransform):
    """MedCoSS's classification colour chain on a (C, H, W) image in [0, 1]: colour jitter (p 0.8),
    grayscale (p 0.2), Gaussian blur (p 0.5), in that order, with torchvision's tensor functions.

    Random numbers come from MONAI's state (``set_determinism`` / ``set_random_state``).  Saturation,
    hue and grayscale need 3 channels and are skipped for 1-channel images.
    """

    def __init__(self, keys: Sequence[Hashable] | str = "image", jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                 p_jitter: float = 0.8, p_gray: float = 0.2, blur_sigma: Sequence[float] = (0.1, 2.0),
                 p_blur: float = 0.5, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.jitter, self.p_jitter, self.p_gray = tuple(jitter), p_jitter, p_gray
        self.blur_sigma, self.p_blur = tuple(blur_sigma), p_blur

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        R, rgb = self.R, x.shape[0] == 3
        if R.rand() < self.p_jitter:
            b, c, s, h = self.jitter
            ops = [lambda t, f=R.uniform(1 - b, 1 + b): TF.adjust_brightness(t, f),
                   lambda t, f=R.uniform(1 - c, 1 + c): TF.adjust_contrast(t, f) if rgb else _contrast_1ch(t, f)]
            if rgb:
                ops += [lambda t, f=R.uniform(1 - s, 1 + s): TF.adjust_saturation(t, f),
                        lambda t, f=R.uniform(-h, h): TF.adjust_hue(t, f)]
            for i in R.permutation(len(ops)):  # torchvision applies the four in random order
                x = ops[i](x)
        if rgb and R.rand() < self.p_gray:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if R.rand() < self.p_blur:
            sigma = float(R.uniform(*self.blur_sigma))
            k = 2 * math.ceil(3 * sigma) + 1
            x = TF.gaussian_blur(x[None], [k, k], [sigma, sigma])[0]
        return x.clamp(0.0, 1.0)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key]).float()
            d[key] = self._apply(x)
        return d


def _contrast_1ch(t: torch.Tensor, f: float) -> torch.Tensor:
    return (f * t + (1 - f) * t.mean()).clamp(0.0, 1.0)


def cls_augmentations(recipe: str = "medcoss") -> list:
    """Train-time transforms for ``{"image"}`` (C, H, W) in [0, 1] after resizing."""
    _check(recipe)
    if recipe == "none":
        return []
    if recipe == "legacy":
        return _legacy(["image"], ["bilinear"])
    return [RandColorAugd("image"), RandFlipd("image", prob=0.5, spatial_axis=1)]  # axis 1 of (H, W) = width


def seg_augmentations(keys: Sequence[str] = ("image", "label"), recipe: str = "medcoss",
                      image_size: int | Sequence[int] = 224) -> list:
    """Train-time transforms for ``{"image", "label"}`` after resizing (label resampled nearest)."""
    _check(recipe)
    keys = list(keys)
    modes = ["bilinear", "nearest"]
    if recipe == "none":
        return []
    if recipe == "legacy":
        return _legacy(keys, modes)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    deg15 = 15 / 180 * math.pi
    return [
        RandRotated(keys, range_x=deg15, prob=0.1, mode=modes, padding_mode="zeros", keep_size=True),
        RandZoomd(keys, prob=0.1, min_zoom=0.75, max_zoom=1.25, mode=["bilinear", "nearest"], padding_mode="constant",
                  keep_size=True),
        Rand2DElasticd(keys, spacing=tuple(max(4, s // 8) for s in size), magnitude_range=(0.0, 2.0), prob=0.1,
                       mode=modes, padding_mode="zeros"),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandScaleIntensityd("image", factors=(-0.3, 0.5), prob=0.15, channel_wise=True),  # x (0.7 .. 1.5)
        RandAdjustContrastd("image", prob=0.15, gamma=(0.5, 2.0), invert_image=True, retain_stats=True),
        RandGaussianNoised("image", prob=0.15, mean=0.0, std=0.05, sample_std=True),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), prob=0.15),
    ]


def _legacy(keys: list[str], modes: list[str]) -> list:
    return [
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5, max_k=3),
        RandAffined(keys, prob=0.3, rotate_range=0.26, scale_range=0.1, mode=modes, padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
        RandGaussianNoised("image", prob=0.2, std=0.02),
    ]


def _check(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; choose from {RECIPES} "
                         "('medcoss' = MedCoSS's downstream recipe, the paper's default)")
