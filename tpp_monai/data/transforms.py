"""MONAI transform chains for 2D classification and segmentation (bundles reference them by ``_target_``).

Bundle use::

    "train_transforms": {"_target_": "tpp_monai.data.transforms.cls_transforms", "train": true,
                         "image_size": 224, "in_channels": 3},
    "val_transforms":   {"_target_": "tpp_monai.data.transforms.seg_transforms", "train": false,
                         "image_size": 224, "in_channels": 3, "num_classes": 2}

Chain: :func:`load_image_2d` (``LoadImaged``; PIL/ITK readers: PNG, JPEG, BMP, TIFF, NIfTI) -> ``EnsureChannelFirstd``
-> :class:`CheckSameSized` (segmentation: image and mask sizes must match) -> :class:`EnsureChannelsd`
(grayscale -> ``in_channels`` by repetition, RGBA -> RGB, RGB -> gray by averaging when the backbone
wants 1 channel) -> :class:`ScaleToUnitd` (8-bit 0..255 -> 0..1; 16-bit/float images from their own
range, or a fixed ``intensity_range`` window) -> :class:`AntiAliasResized` (image: bilinear with
PIL's anti-aliasing, as MedCoSS's ``transforms.Resize`` / ``Image.resize(BILINEAR)``; mask: nearest)
-> train-only augmentation -> ``EnsureTyped``.  Segmentation masks go through
:class:`MaskToIndexd`: first channel, and ``> 0`` -> 1 when ``num_classes == 2`` (QaTa masks are
0/255; a mask with several foreground values is refused there), class indices kept otherwise.

Images leave these pipelines in [0, 1] (``normalize="none"``, the default): the backbone maps them
into its pre-training pixel space itself (``VisionTransformer.set_input_norm``, chosen from the
checkpoint format; MedCoSS: none, MAE/DINO: ImageNet mean/std), so augmentations that assume
[0, 1] (DINO's multi-crop clamps, solarisation) stay valid and no stage can forget to normalise.

:func:`tpp_transforms` is the TPP stage's chain: the MAE / MedCoSS pre-training recipe
``RandomResizedCrop(scale 0.2-1.0, ratio 3/4-4/3, bicubic)`` + horizontal flip (:class:`RandResizedCropd`).
"""

from __future__ import annotations

import gzip
import math
import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, MapTransform, NormalizeIntensityd, RandFlipd, RandomizableTransform,
)

from tpp_monai.data.normalization import (  # noqa: F401 (IMAGENET_* re-exported)
    IMAGENET_MEAN, IMAGENET_STD, ZSCORE, resolve_input_norm,
)

#: MAE / MedCoSS pre-training crop: ``RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=3)``
#: (bicubic; torchvision's default ratio 3/4-4/3) + ``RandomHorizontalFlip()``.
MAE_CROP_SCALE = (0.2, 1.0)
MAE_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def upright_image_reader() -> PILReader:
    """MONAI's PIL reader without its default transpose: PNG/JPEG/BMP arrays come out (H, W)."""
    return PILReader(reverse_indexing=False)


def load_image_2d(keys: KeysCollection) -> LoadImaged:
    """``LoadImaged`` that keeps PNG/JPEG/BMP pixels in row-major (H, W) order.

    MONAI's PIL reader transposes to (W, H) by default (``reverse_indexing=True``, so PNGs line up
    with ITK/NIfTI x-y order). The pre-trained ViTs (MedCoSS, MAE, DINO) saw upright images read
    by PIL/torchvision, so the 2D pipelines read them upright; masks written back as PNG by
    :class:`tpp_monai.bundle.SaveMaskd` then overlay their source image. NIfTI
    slices keep MONAI's (x, y) order: do not mix PNG images with NIfTI labels in one datalist.
    """
    return CheckedLoadImaged(keys, reader=upright_image_reader(), image_only=True)


# ------------------------------------------------------------------ input checks (issue 16): name the file
class ImageFileError(ValueError):
    """An image or label file cannot be used as it is; the message names the file(s) and the fix."""


def _filename(x: object) -> str:
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", "?"))


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` whose read errors (truncated PNG/NIfTI, not an image) name the file and the fix."""

    def __call__(self, data, reader=None):  # type: ignore[override]
        for k in self.keys:
            if isinstance(data, Mapping) and isinstance(data.get(k), (str, os.PathLike)):
                _check_readable_2d(k, data[k])
        try:
            for k in self.keys:
                if isinstance(data, Mapping) and isinstance(data.get(k), (str, os.PathLike)):
                    _check_complete(data[k])
            return super().__call__(data, reader)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            paths = {k: data.get(k) for k in self.keys if isinstance(data, Mapping) and k in data}
            nrrd = [v for v in paths.values() if str(v).lower().endswith((".nrrd", ".nhdr"))]
            if isinstance(e, KeyError) and "space directions" in str(e) and nrrd:
                raise ImageFileError(
                    f"cannot read NRRD file {nrrd[0]}: its header has no 'space directions' field, which MONAI's "
                    "NrrdReader needs. Re-save it with its geometry (3D Slicer: Save; pynrrd: set "
                    "header['space directions']), or convert it to PNG.") from e
            raise ImageFileError(
                f"cannot read {', '.join(f'{k} file {v}' for k, v in paths.items())}: {type(e).__name__}: {e}. "
                "The file is truncated, corrupt or not an image: re-export or re-download it, or remove its entry "
                "from the datalist.") from e


def _is_dicom(path: str | os.PathLike) -> bool:
    if str(path).lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _check_readable_2d(key: str, path: str | os.PathLike) -> None:
    """A missing file or a DICOM is named with the fix before MONAI answers "cannot find a suitable reader" (a
    missing file) or reads the DICOM as a (H, W, 1) volume in ITK order that fails later in a resize."""
    if not os.path.exists(path):
        raise ImageFileError(f"{key} file {path} does not exist. Fix its path in the datalist (relative paths are "
                             "resolved against the datalist's folder or --dataset_dir), or remove the entry.")
    if os.path.isfile(path) and _is_dicom(path):
        raise ImageFileError(f"{key} file {path} is a DICOM file; the 2D pipelines read PNG/JPEG/BMP/TIFF (and 2-D "
                             "NIfTI slices). Convert it to PNG with its display window (e.g. pydicom's pixel_array "
                             "+ apply_voi_lut), and list the PNG in the datalist.")


class Check2Dd(MapTransform):
    """Refuse a 3-D / 4-D volume given to a 2D pipeline (after ``EnsureChannelFirstd``), naming the file; a
    2-D slice stored with a trailing singleton axis (X, Y, 1) is squeezed to (X, Y)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            while x.ndim > 3 and x.shape[-1] == 1:
                x = x[..., 0]
            if x.ndim > 3:
                raise ImageFileError(
                    f"{key} file {_filename(d[key])} is a {x.ndim - 1}-D volume (channel-first shape "
                    f"{tuple(x.shape)}), but this is a 2D pipeline. Export 2-D slices (PNG or 2-D NIfTI) and list "
                    "them in the datalist, or use a 3D bundle (lits_convadapter_tpp / kits_convadapter_tpp).")
            d[key] = x
        return d


class CheckFinited(MapTransform):
    """Refuse an image holding NaN/Inf pixels (a float TIFF/NIfTI export gone wrong), naming the file: otherwise
    training stops later at a NaN loss that cannot say which image caused it."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            if x.is_floating_point():
                bad = int((~torch.isfinite(x)).sum())
                if bad:
                    raise ImageFileError(
                        f"{key} file {_filename(d[key])} holds {bad} NaN/Inf value(s) of {x.numel()}; training on it "
                        "would stop at a NaN loss. Re-export the image with finite values, or remove its entry.")
        return d


class CheckClassLabeld(MapTransform):
    """Classification labels must be class indices ``0..num_classes-1`` (a name such as ``"cat"`` or an index out
    of range would fail later inside the loss, or worse, train silently on a wrong class)."""

    def __init__(self, keys: KeysCollection = "label", num_classes: int | None = None, image_key: str = "image",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes, self.image_key = num_classes, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            v = d[key]
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
                v = int(v)
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            n = self.num_classes
            if not ok or (n is not None and not 0 <= int(v) < n):
                where = _filename(d.get(self.image_key)) if not isinstance(d.get(self.image_key), (str, os.PathLike)) \
                    else str(d[self.image_key])
                rng = f"0..{n - 1} (num_classes {n})" if n is not None else "0..num_classes-1"
                raise ImageFileError(
                    f"classification label {v!r} of image {where} is not a class index {rng}. Write class indices "
                    "in the datalist (the prepare scripts map class names to indices), or set num_classes.")
        return d


def _check_complete(path: str | os.PathLike) -> None:
    """Raise on a truncated NIfTI: ITK reads one silently (the missing voxels come back as zeros)."""
    name = str(path).lower()
    if name.endswith((".nii.gz", ".nii")) and os.path.isfile(path):
        import nibabel as nib

        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:  # EOFError when the stream ends early
                while f.read(1 << 20):
                    pass
        else:
            hdr = nib.load(str(path)).header
            need = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
            have = os.path.getsize(path)
            if have < need:
                raise EOFError(f"the file has {have} bytes, its header needs {need}")


class CheckSameSized(MapTransform):
    """Refuse an image/label pair whose spatial sizes differ (resizing both would silently misalign them)."""

    def __init__(self, keys: KeysCollection = ("image", "label"), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        items = [(k, d[k]) for k in self.key_iterator(d)]
        shapes = {k: tuple(v.shape[1:]) for k, v in items}
        if len(set(shapes.values())) > 1:
            desc = " vs ".join(f"{k} {_filename(v)} {shapes[k]}" for k, v in items)
            raise ImageFileError(f"image and label sizes differ: {desc}. The label must be drawn on this image at "
                                 "its size: fix or re-export the pair, or remove it from the datalist.")
        return d


class ScaleToUnitd(MapTransform):
    """Intensities -> [0, 1] from the image's real range instead of assuming 8 bits.

    ``intensity_range="auto"``: images whose values fit in 0..255 (8-bit) are divided by 255 as
    before; any other image (16-bit PNG/TIFF, float) is scaled from its own min..max, so a 16-bit
    X-ray is not saturated. ``(a_min, a_max)``: a fixed window for the whole dataset, clipped
    (e.g. ``[0, 4095]`` for 12-bit data, a CT window).
    """

    def __init__(self, keys: KeysCollection, intensity_range: str | Sequence[float] = "auto",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(intensity_range, str):
            if intensity_range != "auto":
                raise ValueError(f"intensity_range must be 'auto' or [min, max]; got {intensity_range!r}")
            self.window = None
        else:
            lo, hi = (float(v) for v in intensity_range)
            if not hi > lo:
                raise ValueError(f"intensity_range [min, max] needs max > min; got {list(intensity_range)}")
            self.window = (lo, hi)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            xf = x.float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, np.float32))
            if self.window is not None:
                lo, hi = self.window
            else:
                lo, hi = float(xf.min()), float(xf.max())
                if lo >= 0 and hi <= 255:
                    lo, hi = 0.0, 255.0
                elif hi <= lo:
                    hi = lo + 1.0
            d[key] = ((xf - lo) / (hi - lo)).clamp_(0.0, 1.0)
        return d


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
    """Mask -> (1, H, W) class indices: first channel; binary tasks (``num_classes == 2``) use ``> 0`` and refuse a
    mask with more than one foreground value (a multi-class mask would be merged silently)."""

    def __init__(self, keys: KeysCollection, num_classes: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            m = d[key][:1]
            if self.num_classes != 2:
                bad = torch.unique(m[(m < 0) | (m >= self.num_classes) | (m != torch.round(m))])
                if bad.numel():
                    raise ImageFileError(
                        f"label file {_filename(d[key])} holds value(s) {bad[:8].tolist()} outside the class indices "
                        f"0..{self.num_classes - 1} of this {self.num_classes}-class task. Store class indices in the "
                        "mask (not 0/255 or colours), or set num_classes to match.")
            else:
                fg = torch.unique(m[m != 0])
                if fg.numel() > 1:  # 0/1 and 0/255 are binary; several foreground values are several classes
                    values = [int(v) for v in fg[:8].tolist()]
                    raise ImageFileError(
                        f"label file {_filename(d[key])} holds {fg.numel()} foreground values {values}, but "
                        "this task is binary (num_classes 2): they would be merged into one class. For a multi-class "
                        f"task set num_classes (e.g. --num_classes {int(fg.max()) + 1}) and class_names; if they are "
                        "instance ids of one class, binarise the masks first (`tpp-monai prepare --binarize`).")
            d[key] = (m > 0).to(m.dtype) if self.num_classes == 2 else m
        return d


def _norm(in_channels: int, normalize: str | Sequence | None) -> tuple | None:
    return resolve_input_norm(normalize, in_channels)


def resize_image(x: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) -> (C, *size). ``bilinear``/``bicubic`` are anti-aliased when shrinking (the filter support
    widens with the scale factor, as PIL's ``Image.resize`` does; torch's ``antialias=True`` is PIL's
    algorithm), ``nearest`` copies the nearest pixel (MONAI ``Resized``'s nearest, for label maps).

    Why: MedCoSS resizes PIL images (``transforms.Resize``, bilinear), and an un-filtered bilinear
    shrink (MONAI ``Resized``'s default) aliases: an X-ray shrunk 9x keeps mostly noise of its texture.
    """
    size = tuple(int(s) for s in size)
    t = torch.as_tensor(x)
    if tuple(t.shape[1:]) == size:
        return x
    src = t.unsqueeze(0) if t.is_floating_point() else t.float().unsqueeze(0)
    if mode == "nearest":
        out = F.interpolate(src, size=size, mode="nearest")
    elif mode in ("bilinear", "bicubic"):
        out = F.interpolate(src, size=size, mode=mode, align_corners=False, antialias=True)
    else:
        raise ValueError(f"resize mode must be 'bilinear', 'bicubic' or 'nearest'; got {mode!r}")
    out = out.squeeze(0)
    return out if t.is_floating_point() else out.to(t.dtype)


class AntiAliasResized(MapTransform):
    """Resize channel-first 2D ``keys`` to ``spatial_size`` with :func:`resize_image` (one ``mode`` per key).

    Replaces MONAI ``Resized`` (whose ``anti_aliasing`` is off by default and, when on, is a Gaussian
    pre-blur rather than PIL's filter) in every 2D chain: fine-tuning, evaluation, inference and the
    TPP stage's plain resize, so all see the pixel statistics of MedCoSS's PIL resize.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], mode: str | Sequence[str] = "bilinear",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mode = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.mode) != len(self.keys):
            raise ValueError(f"AntiAliasResized: {len(self.mode)} modes for {len(self.keys)} keys")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, mode in zip(self.keys, self.mode):
            if key in d:
                d[key] = resize_image(d[key], self.spatial_size, mode)
            elif not self.allow_missing_keys:
                raise KeyError(f"AntiAliasResized: key {key!r} not in the data")
        return d


class RandResizedCropd(RandomizableTransform, MapTransform):
    """torchvision's ``RandomResizedCrop`` for channel-first tensors, drawn from MONAI's random state.

    A box of area ``scale`` x image area and aspect ratio (w/h) log-uniform in ``ratio`` is drawn
    (10 tries, then the centre crop at the nearest allowed ratio), cropped and resized to ``size``
    with ``mode`` (bicubic with anti-aliasing, as PIL's bicubic in MAE; values clipped to ``clip``,
    [0, 1], as PIL's 8-bit output is). The same box is applied to every key (image and mask;
    pass ``mode`` per key, e.g. ``["bicubic", "nearest"]``).
    """

    def __init__(self, keys: KeysCollection, size: int | Sequence[int], scale: Sequence[float] = MAE_CROP_SCALE,
                 ratio: Sequence[float] = MAE_CROP_RATIO, mode: str | Sequence[str] = "bicubic", prob: float = 1.0,
                 clip: Sequence[float] | None = (0.0, 1.0), allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        self.scale, self.ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
        if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"RandResizedCropd needs 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]; "
                             f"got scale={self.scale}, ratio={self.ratio}")
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"RandResizedCropd: {len(modes)} modes for {len(self.keys)} keys")
        self.mode = modes
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.box: tuple[int, int, int, int] | None = None

    def sample_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) as torchvision's ``RandomResizedCrop.get_params``, from ``self.R``."""
        area = height * width
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.R.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(self.R.uniform(log_r[0], log_r[1]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(self.R.randint(0, height - h + 1)), int(self.R.randint(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def randomize(self, shape: Sequence[int]) -> None:  # type: ignore[override]
        super().randomize(None)
        self.box = self.sample_box(int(shape[-2]), int(shape[-1])) if self._do_transform else None

    @staticmethod
    def crop_resize(x: torch.Tensor, box: tuple[int, int, int, int], size: Sequence[int], mode: str,
                    clip: Sequence[float] | None = None) -> torch.Tensor:
        """Crop (C, H, W) ``x`` to ``box`` = (top, left, h, w) and resize to ``size`` (clipped to ``clip``)."""
        top, left, h, w = box
        t = torch.as_tensor(x)
        crop = t[..., top:top + h, left:left + w]
        src = crop.float()[None]
        if mode == "nearest":
            out = F.interpolate(src, size=tuple(size), mode="nearest-exact")
        else:
            out = F.interpolate(src, size=tuple(size), mode=mode, align_corners=False,
                                antialias=mode in ("bilinear", "bicubic"))
            out = out.clamp(*clip) if clip is not None else out
        return out[0].to(t.dtype) if not t.is_floating_point() else out[0]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        if first is None:
            return d
        self.randomize(d[first].shape)
        for key, mode in zip(self.keys, self.mode):
            if key not in d:
                continue
            x = d[key]
            if self.box is None:  # not applied this time: plain resize
                box = (0, 0, int(x.shape[-2]), int(x.shape[-1]))
            else:
                box = self.box
            d[key] = self.crop_resize(x, box, self.size, mode, self.clip)
        return d


def _tail(keys: list[str], train: bool, in_channels: int, normalize, seg: bool, augment: str = "medcoss",
          image_size: int | Sequence[int] = 224) -> list:
    t: list = []
    if train:  # fine-tuning augmentation: MedCoSS's downstream recipe by default (tpp_monai.data.augment)
        from tpp_monai.data.augment import cls_augmentations, seg_augmentations

        t += seg_augmentations(keys, augment, image_size) if seg else cls_augmentations(augment)
    ms = _norm(in_channels, normalize)
    if ms == ZSCORE:
        t.append(NormalizeIntensityd("image", channel_wise=True))
    elif ms is not None:
        mean, std = ms
        t.append(NormalizeIntensityd("image", subtrahend=np.array(mean, np.float32)[:, None, None],
                                     divisor=np.array(std, np.float32)[:, None, None]))
    return t


def cls_transforms(
    train: bool = False,
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    normalize: str | Sequence | None = "none",
    intensity_range: str | Sequence[float] = "auto",
    augment: str = "medcoss",
    num_classes: int | None = None,
) -> Compose:
    """Dict transforms for ``{"image": path, "label": int}`` entries -> float image (C, S, S), long label.

    ``num_classes``: labels must be integers ``0..num_classes-1`` (checked first, naming the image).
    ``augment`` (train only): "medcoss" (MedCoSS's downstream recipe), "legacy" or "none".
    ``normalize``: ``"none"`` (default: [0, 1]; the backbone normalises itself), or a pixel space
    (``"imagenet"``, ``"path_dino"``, ``[mean, std]``) for a backbone that does not.
    ``intensity_range``: see :class:`ScaleToUnitd` ("auto": 8-bit /255, else the image's own range).
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    t = [
        CheckClassLabeld("label", num_classes),
        *_image_head(in_channels, intensity_range),
        AntiAliasResized("image", spatial_size=size, mode="bilinear"),
        *_tail(["image"], train, in_channels, normalize, seg=False, augment=augment),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.long, track_meta=False),
    ]
    return Compose(t)


def _image_head(in_channels: int, intensity_range: str | Sequence[float]) -> list:
    """Read an image upright, channel first, ``in_channels`` channels, intensities in [0, 1]."""
    return [load_image_2d("image"), EnsureChannelFirstd("image"), Check2Dd("image"), CheckFinited("image"),
            EnsureChannelsd("image", in_channels),
            ScaleToUnitd("image", intensity_range)]


class RecordSpatialSized(MapTransform):
    """Store the image's spatial size (before resizing) under ``out_key``, so masks can be written at it."""

    def __init__(self, keys: KeysCollection = "image", out_key: str = "orig_size") -> None:
        super().__init__(keys)
        self.out_key = out_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d[self.out_key] = torch.as_tensor(list(d[self.keys[0]].shape[1:]), dtype=torch.long)
        return d


class RestoreSpatialSized(MapTransform):
    """Resize ``keys`` (label maps) back to the size :class:`RecordSpatialSized` stored under ``size_key``
    (nearest: class indices stay class indices), so a predicted mask overlays its input image.

    Inference ``postprocessing`` runs on each decollated item merged with its batch entry, so ``size_key``
    is there; an item without it, or already at that size, is left as it is."""

    def __init__(self, keys: KeysCollection = "pred", size_key: str = "orig_size") -> None:
        super().__init__(keys)
        self.size_key = size_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        size = d.get(self.size_key)
        if size is None:
            return d
        size = [int(s) for s in torch.as_tensor(size).flatten().tolist()]
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            if list(x.shape[1:]) != size:
                d[key] = F.interpolate(x[None].float(), size=size, mode="nearest")[0].to(x.dtype)
        return d


def infer_transforms(image_size: int | Sequence[int] = 224, in_channels: int = 3,
                     intensity_range: str | Sequence[float] = "auto") -> Compose:
    """Image-only evaluation transforms for ``{"image": path}`` entries (new images have no label):
    the same image pipeline as :func:`cls_transforms`/:func:`seg_transforms` with ``train=False``, plus the
    input's size under ``orig_size``."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return Compose([
        *_image_head(in_channels, intensity_range),
        RecordSpatialSized("image", "orig_size"),
        AntiAliasResized("image", spatial_size=size, mode="bilinear"),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
    ])


def seg_transforms(
    train: bool = False,
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    num_classes: int = 2,
    normalize: str | Sequence | None = "none",
    intensity_range: str | Sequence[float] = "auto",
    augment: str = "medcoss",
) -> Compose:
    """Dict transforms for ``{"image": path, "label": mask path}`` -> image (C, S, S), mask (1, S, S) long.

    ``augment`` (train only): "medcoss" (MedCoSS's downstream recipe), "legacy" or "none".
    Image and mask must have the same size (else :class:`ImageFileError` naming both files)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    keys = ["image", "label"]
    t = [
        load_image_2d(keys),
        EnsureChannelFirstd(keys),
        Check2Dd(keys),
        CheckFinited(keys),
        CheckSameSized(keys),
        EnsureChannelsd("image", in_channels),
        MaskToIndexd("label", num_classes),
        ScaleToUnitd("image", intensity_range),
        AntiAliasResized(keys, spatial_size=size, mode=["bilinear", "nearest"]),
        *_tail(keys, train, in_channels, normalize, seg=True, augment=augment, image_size=size),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.long, track_meta=False),
    ]
    return Compose(t)


def tpp_transforms(
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    augment: bool = True,
    crop_scale: Sequence[float] = MAE_CROP_SCALE,
    crop_ratio: Sequence[float] = MAE_CROP_RATIO,
    hflip_prob: float = 0.5,
    normalize: str | Sequence | None = "none",
    intensity_range: str | Sequence[float] = "auto",
    pretext: str = "mae",
) -> Compose:
    """TPP-stage chain for image-only entries: load, [0, 1] (:class:`ScaleToUnitd`), then the pretext's
    data augmentation.

    ``pretext`` other than DINO (MAE) with ``augment``: ``RandResizedCropd(image_size, scale=crop_scale, ratio=crop_ratio,
    bicubic)`` + horizontal flip (``hflip_prob``), as MAE's and MedCoSS's pre-training
    (``RandomResizedCrop(scale=(0.2, 1.0), interpolation=3)`` + ``RandomHorizontalFlip()``); without it a
    plain (anti-aliased) resize.

    ``pretext="dino"``: always the plain resize, no crop or flip: DINO's multi-crop
    (:class:`tpp_monai.pretext.dino.MultiCropAugment`, run by the task on the batch) *is* its augmentation
    and, as DINO's ``DataAugmentationDINO``, crops the image as loaded (resized to ``image_size`` so a batch
    can be stacked). An MAE crop before it would shrink DINO's global views from 0.70 of the image on
    average (minimum 0.40) to 0.42 (minimum 0.08). Keep ``normalize="none"`` (the multi-crop needs [0, 1]).
    """
    augment = bool(augment) and not str(pretext).lower().startswith("dino")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    t: list = [
        load_image_2d("image"),
        EnsureChannelFirstd("image"),
        Check2Dd("image"),
        CheckFinited("image"),
        EnsureChannelsd("image", in_channels),
        ScaleToUnitd("image", intensity_range),
    ]
    if augment:
        t += [RandResizedCropd("image", size, scale=crop_scale, ratio=crop_ratio, mode="bicubic"),
              RandFlipd("image", prob=hflip_prob, spatial_axis=1)]  # (C, H, W) read upright: axis 1 is W
    else:
        t.append(AntiAliasResized("image", spatial_size=size, mode="bilinear"))
    t += _tail(["image"], False, in_channels, normalize, seg=False)
    t += [EnsureTyped("image", dtype=torch.float32, track_meta=False),
          EnsureTyped("label", dtype=torch.long, track_meta=False, allow_missing_keys=True)]
    return Compose(t)
