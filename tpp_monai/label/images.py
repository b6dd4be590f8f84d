"""Upload and datastore checks of the label server's 2D images and labels (no model input is made here).

The model's reading, scaling and resizing are the bundle's own transforms (``inference.json`` /
``train.json``): this module only refuses, before anything is stored or trained, what the bundle could not
use, naming the file and the fix: an unreadable file, too many pixels (judged from the header, before
decoding), NaN / Inf pixels, a label whose size differs from its image, a label class the bundle lacks
(a 0/255 mask). PNG pixels are read upright (as the bundles' ``load_image_2d``); 2D NIfTI / NRRD slices are
transposed to the same row/column order, so a PNG image and the label 3D Slicer saves for it compare.
Nothing here imports ``monailabel``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

PNG_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_EXT = (".nii", ".nii.gz")


class ImageReadError(ValueError):
    """An image or label file could not be read as a 2D image (message names the file and why)."""


class ImageTooLarge(ImageReadError):
    """An image has more pixels than the caller allows (checked from the header, before decoding)."""


#: default pixel cap of the label server (``--conf max_image_pixels``): 8192 x 8192
MAX_IMAGE_PIXELS = 8192 * 8192


def _check_pixels(shape: Sequence[int], path, max_pixels: int | None) -> None:
    n = int(np.prod([int(s) for s in shape])) if len(shape) else 0
    if max_pixels is not None and n > max_pixels:
        raise ImageTooLarge(f"{Path(path).name}: {' x '.join(str(int(s)) for s in shape)} = {n} pixels is more than "
                            f"the limit of {max_pixels} pixels; send a smaller image")


# ----------------------------------------------------------------------------------------------- io
def _ext(path: str | os.PathLike) -> str:
    p = str(path).lower()
    return ".nii.gz" if p.endswith(".nii.gz") else os.path.splitext(p)[1]


def _squeeze_2d(arr: np.ndarray, path) -> np.ndarray:
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: a 2D slice is expected, got shape {arr.shape}")
    return arr


def read_image_2d(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, dict]:
    """(H, W) or (H, W, C) array in row/column order, plus the format ("png" / "nifti" / "nrrd").

    ``max_pixels``: refuse (:class:`ImageTooLarge`) an image with more pixels, judged from the file's
    header before any pixel is decoded (a 160 KB PNG can hold 13000 x 13000 pixels, 5 GB decoded).

    NIfTI and NRRD store a slice as ``data[x, y(, 1)]`` (x along a row): they are transposed to
    ``(y, x)`` here, the order of PNG pixels and of ITK / 3D Slicer's view of a PNG, so images and
    labels in different formats (PNG image + NIfTI label saved by Slicer) line up.
    """
    arr, info = _read_2d(path, max_pixels)
    _check_finite(arr, path)
    return arr, info


def _check_finite(arr: np.ndarray, path) -> None:
    """NaN / Inf pixels have no intensity: min-max scaling would turn the whole image black (and train on it)."""
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ImageReadError(f"{Path(path).name}: {bad} of {np.size(arr)} pixels are NaN or Inf; fix or remove "
                                 "this image (replace the non-finite pixels, e.g. with numpy.nan_to_num) and send it again")


def _read_2d(path: str | os.PathLike, max_pixels: int | None) -> tuple[np.ndarray, dict]:
    ext = _ext(path)
    try:
        if ext in NIFTI_EXT:
            import nibabel as nib

            img = nib.load(str(path))
            _check_pixels(img.shape[:2], path, max_pixels)
            arr = _squeeze_2d(np.asarray(img.dataobj), path).T
            return arr, {"format": "nifti", "affine": np.asarray(img.affine)}
        if ext == ".nrrd":
            import nrrd

            _check_pixels(nrrd.read_header(str(path)).get("sizes", [])[:2], path, max_pixels)
            data, _ = nrrd.read(str(path))
            return _squeeze_2d(np.asarray(data), path).T, {"format": "nrrd"}
        from PIL import Image

        with Image.open(str(path)) as im:
            _check_pixels(im.size[::-1], path, max_pixels)
            im.load()
            if im.mode in ("P", "CMYK", "LA", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3):
            raise ImageReadError(f"{path}: a 2D image is expected, got shape {arr.shape}")
        return arr, {"format": "png"}
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file and the reason
        if type(e).__name__ == "DecompressionBombError":  # PIL's own cap (2 x Image.MAX_IMAGE_PIXELS)
            raise ImageTooLarge(f"{Path(path).name}: {e}") from e
        raise ImageReadError(f"cannot read {Path(path).name} as a 2D image ({type(e).__name__}: {e})") from e


def check_label_classes(arr: np.ndarray, num_classes: int, path: str | os.PathLike | None = None) -> None:
    """A label holds class indices 0..num_classes-1; anything else is refused, naming the file and the fix.

    A 0/255 mask (what many tools save for a binary mask) is the common case: it is refused rather than
    guessed at (255 could be a class of its own); the message says to save 0/1 (divide by 255).
    """
    a = np.asarray(arr)
    a = a[..., 0] if a.ndim == 3 else a
    if a.size == 0:
        return
    classes = np.unique(a)
    bad = [v for v in classes.tolist() if not float(v).is_integer() or not 0 <= v < num_classes]
    if bad:
        name = f"label {Path(path).name}" if path is not None else "label"
        hint = (" It looks like a 0/255 mask: save class indices instead (0 background, 1 foreground; "
                "divide the mask by 255)." if 255 in bad else "")
        raise ImageReadError(f"{name} has class value(s) {[int(v) if float(v).is_integer() else v for v in bad][:8]} "
                             f"but the model has {num_classes} classes (0..{num_classes - 1}, --conf labels).{hint}")


def read_labelled_pairs(labelled: Sequence[tuple[str | os.PathLike, str | os.PathLike]]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read every (image, label) pair; a label whose size differs from its image is refused, never stretched."""
    pairs = []
    for img_path, lbl_path in labelled:
        img, lbl = read_image_2d(img_path)[0], read_image_2d(lbl_path)[0]
        if img.shape[:2] != lbl.shape[:2]:
            raise ValueError(f"label {lbl_path} is {lbl.shape[0]} x {lbl.shape[1]} pixels but its image {img_path} is "
                             f"{img.shape[0]} x {img.shape[1]}: save the label on the image it belongs to (same size)")
        pairs.append((img, lbl))
    return pairs


def check_labelled(labelled: Sequence[tuple[str | os.PathLike, str | os.PathLike]], num_classes: int) -> None:
    """Read every labelled pair once before training: a size mismatch or an unknown class stops the run at once."""
    for (_, lbl_path), (_, lbl) in zip(labelled, read_labelled_pairs(labelled)):
        check_label_classes(lbl, num_classes, lbl_path)


