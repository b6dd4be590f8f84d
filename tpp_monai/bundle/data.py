"""Datalist loading for the bundles: clear errors, relative paths resolved against the datalist's folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class BundleDataError(FileNotFoundError):
    """The datalist named by the bundle (``--dataset_dir`` / ``--datalist``) is missing or malformed."""


def load_datalist(datalist: str | os.PathLike, split: str = "training", base_dir: str | os.PathLike | None = None,
                  image_only: bool = False, limit: int | None = None, task: str | None = None) -> list[dict[str, Any]]:
    """Entries of ``split`` in a MONAI datalist JSON written by ``scripts/prepare_<dataset>.py``.

    Relative ``image``/``label`` paths are joined with ``base_dir`` (default: the datalist's folder).
    ``image_only``: entries ``{"image": path, "label": 0}`` (pretext stages use images only; the dummy
    label keeps the classification transforms usable for any task). ``limit``: first N entries.
    ``task`` ("cls" / "seg", the bundle's): every label must be a class index / a mask path, else a
    :class:`BundleDataError` naming the entry and the fix (the format: docs/DATA_FORMAT.md).
    """
    p = Path(datalist)
    if not p.is_file():
        raise BundleDataError(
            f"datalist not found: {p}. Prepare it first, e.g. `python scripts/prepare_<dataset>.py --root "
            f"<download folder> --out {p}` (see the bundle's docs/README.md), or pass --dataset_dir / --datalist."
        )
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BundleDataError(f"datalist {p} is not valid JSON ({e}); re-run the prepare script") from e
    if not isinstance(obj, dict) or split not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise BundleDataError(f"datalist {p} has no '{split}' list (found {keys}); re-run the prepare script")
    base = Path(base_dir) if base_dir else p.parent
    out = []
    for e in obj[split]:
        if not isinstance(e, dict) or "image" not in e:
            raise BundleDataError(f"datalist {p}: entry {e!r} of '{split}' has no 'image'")
        if task and not image_only:
            _check_label(p, split, e, task)
        e = dict(e)
        for k in ("image", "label"):
            v = e.get(k)
            if isinstance(v, str) and not os.path.isabs(v):
                e[k] = str(base / v)
        out.append({"image": e["image"], "label": 0} if image_only else e)
    if not out:
        raise BundleDataError(f"datalist {p}: split '{split}' is empty")
    return out[:limit] if limit else out


def _check_label(path: Path, split: str, entry: dict[str, Any], task: str) -> None:
    """A classification entry needs an integer class index, a segmentation entry a mask path."""
    label = entry.get("label")
    is_index = isinstance(label, int) and not isinstance(label, bool)
    if task == "cls" and not is_index:
        what = "a mask path (a segmentation datalist)" if isinstance(label, str) else repr(label)
        raise BundleDataError(
            f"datalist {path}: entry {entry.get('image')!r} of '{split}' has label {what}, but this bundle classifies "
            "(task 'cls') and needs an integer class index per image. Use a segmentation bundle for masks "
            "(glas_adapter_tpp / qata_adapter_tpp, `tpp-monai train --task seg`), or write class indices "
            "(`tpp-monai prepare --task cls`; format: docs/DATA_FORMAT.md).")
    if task == "seg" and not isinstance(label, str):
        raise BundleDataError(
            f"datalist {path}: entry {entry.get('image')!r} of '{split}' has label {label!r}, but this bundle segments "
            "(task 'seg') and needs the path of a mask image per entry. Use a classification bundle for class indices "
            "(mhist_adapter_tpp / oct_c8_adapter_tpp / chestxray_pa_adapter_tpp, `tpp-monai train --task cls`), or "
            "pair each image with its mask (`tpp-monai prepare --task seg`; format: docs/DATA_FORMAT.md).")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")


def inference_inputs(datalist: str | os.PathLike, split: str = "test", input_dir: str | os.PathLike | None = None,
                     ) -> list[dict[str, Any]]:
    """Images to predict: every image file in ``input_dir`` (sorted; new images, model-zoo style) when given,
    else the ``split`` of the datalist. Entries ``{"image": path, "path": path}`` (no label needed)."""
    if input_dir:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise BundleDataError(f"--input_dir {folder} is not a folder; pass a folder of images "
                                  f"({', '.join(IMAGE_SUFFIXES)}) or leave it empty to use the datalist's '{split}' split")
        files = sorted(str(f) for f in folder.iterdir()
                       if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES) and not f.name.startswith("."))
        if not files:
            raise BundleDataError(f"--input_dir {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        return [{"image": f, "path": f} for f in files]
    return [{"image": e["image"], "path": str(e["image"])} for e in load_datalist(datalist, split)]


def epochs_for_iterations(num_iterations: int, batches_per_epoch: int) -> int:
    """Epochs covering ``num_iterations`` training iterations (the paper counts iterations); refuses
    ``num_iterations < 1`` and an empty training loader with what to change."""
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, (int, float)) or num_iterations < 1:
        raise ValueError(f"--num_iterations must be a positive number of training iterations, got {num_iterations!r}")
    if batches_per_epoch < 1:
        raise BundleDataError("the training loader yields no batches: the 'training' split is empty or smaller than "
                              "--batch_size with drop_last; check the datalist or lower --batch_size")
    return max(1, math.ceil(num_iterations / batches_per_epoch))
