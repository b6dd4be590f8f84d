"""MONAI transform chains for 2D classification and segmentation (bundles reference them by ``_target_``).

Bundle use::

    "train_transforms": {"_target_": "tpp_monai.data.transforms.cls_transforms", "train": true,
                         "image_size": 224, "in_channels": 3},
    "val_transforms":   {"_target_": "tpp_monai.data.transforms.seg_transforms", "train": false,
                         "image_size": 224, "in_channels": 3, "num_classes": 2}

Chain: :func:`load_image_2d` (``LoadImaged``; PIL/ITK readers: PNG, JPEG, BMP, TIFF, NIfTI) -> ``EnsureChannelFirstd``
-> :class:`EnsureChannelsd` (grayscale -> ``in_channels`` by repetition, RGBA -> RGB, RGB ->
gray by averaging when the backbone wants 1 channel) -> ``ScaleIntensityRanged`` 0..255 -> 0..1
(8-bit images; pass ``intensity_range`` otherwise) -> ``Resized`` (bilinear image, nearest
mask) -> train-only augmentation -> ``NormalizeIntensityd`` (ImageNet mean/std for 3 channels by
default, none for 1 channel) -> ``EnsureTyped``.  Segmentation masks go through
:class:`MaskToIndexd`: first channel, and ``> 0`` -> 1 when ``num_classes == 2`` (QaTa masks are
0/255, GlaS instance ids), class indices kept otherwise.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, MapTransform, NormalizeIntensityd, RandAffined,
    RandFlipd, RandGaussianNoised, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd, Resized,
    ScaleIntensityRanged,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def upright_image_reader() -> PILReader:
    """MONAI's PIL reader without its default transpose: PNG/JPEG/BMP arrays come out (H, W)."""
    return PILReader(reverse_indexing=False)


def load_image_2d(keys: KeysCollection) -> LoadImaged:
    """``LoadImaged`` that keeps PNG/JPEG/BMP pixels in row-major (H, W) order.

    MONAI's PIL reader transposes to (W, H) by default (``reverse_indexing=True``, so PNGs line up
    with ITK/NIfTI x-y order). The pre-trained ViTs (MedCoSS, MAE, DINO) saw upright images read
    by PIL/torchvision, so the 2D pipelines read them upright; masks written back as PNG by
    :class:`tpp_monai.bundle.handlers.PredictionWriter` then overlay their source image. NIfTI
    slices keep MONAI's (x, y) order: do not mix PNG images with NIfTI labels in one datalist.
    """
    return LoadImaged(keys, reader=upright_image_reader(), image_only=True)


class EnsureChannelsd(MapTransform):
    """Make channel-first images have ``channels`` channels (1 -> repeat, 4 -> drop alpha, 3 -> 1: mean)."""

    def __init__(self, keys: KeysCollection, channels: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            c = x.shape[0]
            if c == 4:
                x, c = x[:3], 3
            if c == self.channels:
                pass
            elif c == 1:
                x = x.repeat(self.channels, *([1] * (x.ndim - 1)))
            elif self.channels == 1:
                x = x.mean(0, keepdim=True)
            else:
                raise ValueError(f"cannot turn {c} channels into {self.channels} ({key})")
            d[key] = x
        return d


class MaskToIndexd(MapTransform):
    """Mask -> (1, H, W) class indices: first channel; binary tasks (``num_classes == 2``) use ``> 0``."""

    def __init__(self, keys: KeysCollection, num_classes: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            m = d[key][:1]
            d[key] = (m > 0).to(m.dtype) if self.num_classes == 2 else m
        return d


def _norm(in_channels: int, normalize: str | Sequence) -> tuple | None:
    if normalize == "none" or (normalize == "auto" and in_channels != 3):
        return None
    if normalize in ("auto", "imagenet"):
        if in_channels != 3:
            raise ValueError("ImageNet normalisation needs 3 channels")
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = normalize  # type: ignore[misc]
    return tuple(mean), tuple(std)


def _tail(keys: list[str], train: bool, in_channels: int, normalize, seg: bool, augment: str = "medcoss",
          image_size: int | Sequence[int] = 224) -> list:
    t: list = []
    if train:  # fine-tuning augmentation: MedCoSS's downstream recipe by default (tpp_monai.data.augment)
        from tpp_monai.data.augment import cls_augmentations, seg_augmentations

        t += seg_augmentations(keys, augment, image_size) if seg else cls_augmentations(augment)
    ms = _norm(in_channels, normalize)
    if ms is not None:
        mean, std = ms
        t.append(NormalizeIntensityd("image", subtrahend=np.array(mean, np.float32)[:, None, None],
                                     divisor=np.array(std, np.float32)[:, None, None]))
    return t


def cls_transforms(
    train: bool = False,
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    normalize: str | Sequence = "auto",
    intensity_range: tuple[float, float] = (0.0, 255.0),
    augment: str = "medcoss",
) -> Compose:
    """Dict transforms for ``{"image": path, "label": int}`` entries -> float image (C, S, S), long label.

    ``augment`` (train only): "medcoss" (MedCoSS's downstream recipe), "legacy" or "none"."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    t = [
        load_image_2d("image"),
        EnsureChannelFirstd("image"),
        EnsureChannelsd("image", in_channels),
        ScaleIntensityRanged("image", a_min=intensity_range[0], a_max=intensity_range[1], b_min=0.0, b_max=1.0,
                             clip=True),
        Resized("image", spatial_size=size, mode="bilinear"),
        *_tail(["image"], train, in_channels, normalize, seg=False, augment=augment),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.long, track_meta=False),
    ]
    return Compose(t)


def seg_transforms(
    train: bool = False,
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    num_classes: int = 2,
    normalize: str | Sequence = "auto",
    intensity_range: tuple[float, float] = (0.0, 255.0),
    augment: str = "medcoss",
) -> Compose:
    """Dict transforms for ``{"image": path, "label": mask path}`` -> image (C, S, S), mask (1, S, S) long.

    ``augment`` (train only): "medcoss" (MedCoSS's downstream recipe), "legacy" or "none"."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    keys = ["image", "label"]
    t = [
        load_image_2d(keys),
        EnsureChannelFirstd(keys),
        EnsureChannelsd("image", in_channels),
        MaskToIndexd("label", num_classes),
        ScaleIntensityRanged("image", a_min=intensity_range[0], a_max=intensity_range[1], b_min=0.0, b_max=1.0,
                             clip=True),
        Resized(keys, spatial_size=size, mode=["bilinear", "nearest"]),
        *_tail(keys, train, in_channels, normalize, seg=True, augment=augment, image_size=size),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.long, track_meta=False),
    ]
    return Compose(t)
