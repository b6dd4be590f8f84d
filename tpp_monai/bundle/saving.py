"""Segmentation masks written from an inference ``postprocessing`` chain (MONAI model-zoo style).

:class:`SaveMaskd` is a MONAI ``SaveImaged`` (so tools that look for one find it) with three things the
bundles need on top: the file is named after the input image (``<stem>_seg<ext>``, from the batch key
``path_key``: the preprocessing drops MetaTensor metadata), a PNG keeps the input's upright orientation
(MONAI's PNG writer transposes (H, W) arrays, the 2D pipelines read PNGs upright), and each file is written
into a temporary folder inside ``output_dir`` and renamed into place, so a killed run never leaves half a mask.
NIfTI masks go through :class:`NiftiMaskWriter` (MONAI's nibabel writer minus a resampling step that fails on
2D masks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.transforms import SaveImaged

from tpp_monai.safe_io import atomic_file


def mask_name(path: str | os.PathLike, postfix: str = "seg", ext: str = ".png") -> str:
    """``<stem>_<postfix><ext>`` where ``stem`` is the file name up to its first dot (``a.nii.gz`` -> ``a``)."""
    return f"{Path(path).name.split('.')[0]}_{postfix}{ext}"


class NiftiMaskWriter(NibabelWriter):
    """MONAI ``NibabelWriter`` that writes the array on its own grid when no resampling is asked for.

    MONAI 1.6.1 runs a no-op resampling on every write, and it raises ``TypeError`` for a squeezed 2D array
    ((H, W): the MetaTensor it wraps it in counts one spatial dimension), so ``SaveImage`` cannot write a 2D
    mask as NIfTI at all; masks are never resampled here (``resample=False``)."""

    @classmethod
    def resample_if_needed(cls, data_array: Any, affine: Any = None, target_affine: Any = None,
                           output_spatial_shape: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        if target_affine is None and output_spatial_shape is None:
            return data_array, affine
        return super().resample_if_needed(data_array, affine, target_affine, output_spatial_shape, **kwargs)


class SaveMaskd(SaveImaged):
    """``SaveImaged`` for label maps: ``output_dir/<stem>_seg<ext>`` as uint8 class indices, written atomically.

    ``output_ext``: ``.png`` (kept upright) or ``.nii.gz``; ``path_key``: the item's source image path
    (:func:`tpp_monai.bundle.inference_inputs` puts it there).
    The path written is stored under ``<key>_saved_to`` in the returned item.
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str | os.PathLike = "./",
                 output_ext: str = ".png", path_key: str = "path", output_postfix: str = "seg",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, output_dir=output_dir, output_postfix=output_postfix, output_ext=output_ext,
                         resample=False, scale=None, output_dtype=np.uint8, separate_folder=False,
                         print_log=False, allow_missing_keys=allow_missing_keys,
                         writer=NiftiMaskWriter if output_ext in (".nii", ".nii.gz") else None)
        self.output_dir, self.output_ext = Path(output_dir), output_ext
        self.path_key, self.output_postfix = path_key, output_postfix

    def _source_path(self, d: Mapping[Hashable, Any], key: Hashable) -> str:
        path = d.get(self.path_key)
        if path is None:
            meta = getattr(d[key], "meta", None) or {}
            path = meta.get("filename_or_obj")
        if isinstance(path, (list, tuple)) and len(path) == 1:
            path = path[0]
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise KeyError(f"SaveMaskd: the item has no source image path under '{self.path_key}' to name the "
                           f"mask after; build the dataset with tpp_monai.bundle.inference_inputs (or "
                           f"an entry's 'path'), or set path_key to the key that holds it")
        return str(path)

    def save_one(self, mask: torch.Tensor, path: str) -> Path:
        """Write one (1, H, W[, D]) label map named after ``path``; returns the written file."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = mask_name(path, self.output_postfix, self.output_ext)
        mask = torch.as_tensor(mask).as_subclass(torch.Tensor).detach().cpu().to(torch.uint8)
        if self.output_ext == ".png":  # MONAI's PNG writer wants (C, W, H): keep the image upright
            mask = mask.transpose(1, 2)
        with atomic_file(self.output_dir / name, suffix=".tmp" + self.output_ext) as tmp:
            self.saver(mask, meta_data={"filename_or_obj": path}, filename=str(tmp)[: -len(self.output_ext)])
        return self.output_dir / name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_saved_to"] = str(self.save_one(d[key], self._source_path(d, key)))
        return d
