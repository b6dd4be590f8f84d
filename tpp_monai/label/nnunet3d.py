"""3D segmentation of one NIfTI volume with an nnU-Net-trained fold (STU-Net + Conv-Adapter), for the label server.

Uses nnU-Net's own predictor (``nnUNetPredictor.initialize_from_trained_model_folder``: the plans'
preprocessing, sliding window with Gaussian weighting, mirroring TTA, resampling back), so a volume
gets the same labels as ``nnUNetv2_predict`` / ``tpp-monai nnunet-predict`` with the same settings.
The volume is read and the mask written with the plans' own reader/writer class (SimpleITK for NIfTI):
the mask has the input's geometry (size, spacing, origin, direction).

Before nnU-Net unpickles a checkpoint (it loads with ``weights_only=False``), every fold's file must
pass a weights-only load (:func:`tpp_monai.cli.check_checkpoints_weights_only`) unless
``allow_pickle``. Our trainers are found through ``nnUNet_extTrainer`` (set around the loading only).
Nothing here imports ``monailabel``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

from tpp_monai.label.images import ImageReadError, ImageTooLarge

#: default voxel cap of the label server's 3D task (``--conf max_volume_voxels``): 512 x 512 x 1024
MAX_VOLUME_VOXELS = 512 * 512 * 1024


def check_volume(path: str | os.PathLike, max_voxels: int | None = MAX_VOLUME_VOXELS) -> tuple[int, ...]:
    """The volume's size from its header (nothing decoded); too many voxels or not 3D is refused."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(f"cannot read {Path(path).name} as a volume (send a NIfTI file): "
                             f"{str(e).strip().splitlines()[-1][:200]}") from e
    size = tuple(int(s) for s in r.GetSize())
    if r.GetDimension() != 3 or r.GetNumberOfComponents() != 1:
        raise ImageReadError(f"{Path(path).name}: a single-channel 3D volume is expected, got size {size} with "
                             f"{r.GetNumberOfComponents()} component(s)")
    n = size[0] * size[1] * size[2]
    if max_voxels is not None and n > max_voxels:
        raise ImageTooLarge(f"{Path(path).name}: {' x '.join(map(str, size))} = {n} voxels is more than the limit "
                            f"of {max_voxels} voxels; send a smaller volume")
    return size


class NnUNetFoldError(ValueError):
    """The nnU-Net model folder cannot be served (message names the folder / file and the fix)."""


def parse_folds(spec: str | Sequence[Any]) -> tuple:
    """``"0"`` / ``"0,1"`` / ``"all"`` / ``[0, 1]`` -> (0,) / (0, 1) / ("all",) / (0, 1)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    items = [s for s in items if s]
    if not items or any(not (s == "all" or s.isdigit()) for s in items):
        raise NnUNetFoldError(f"folds must be fold numbers or 'all', comma-separated (e.g. 0 or 0,1,2), got {spec!r}")
    return tuple(s if s == "all" else int(s) for s in items)


class NnUNetFold:
    """A trained ``<results>/DatasetXXX/<Trainer>__<Plans>__<configuration>`` folder, ready to segment volumes.

    Checked at construction (clear errors, nothing loaded yet): ``dataset.json`` / ``plans.json`` and each
    fold's checkpoint exist, the model takes one input channel. On first use the checkpoints must pass
    a weights-only load, then the predictor is built and kept.
    """

    def __init__(self, model_folder: str | os.PathLike, folds: str | Sequence[Any] = "0",
                 checkpoint_name: str = "checkpoint_final.pth", use_mirroring: bool = True,
                 device: str = "cpu", allow_pickle: bool = False) -> None:
        self.folder = Path(model_folder)
        self.folds = parse_folds(folds)
        self.checkpoint_name = checkpoint_name
        self.use_mirroring, self.device, self.allow_pickle = bool(use_mirroring), str(device), bool(allow_pickle)
        fix = ("point --conf nnunet_model_folder at <nnUNet_results>/DatasetXXX/<Trainer>__<Plans>__<configuration> "
               "of a trained fold")
        for name in ("dataset.json", "plans.json"):
            if not (self.folder / name).is_file():
                raise NnUNetFoldError(f"{self.folder / name} not found: {fix}")
        self.dataset_json = json.loads((self.folder / "dataset.json").read_text())
        channels = self.dataset_json.get("channel_names") or self.dataset_json.get("modality") or {}
        if len(channels) != 1:
            raise NnUNetFoldError(f"{self.folder / 'dataset.json'}: the model takes {len(channels)} input channels; "
                                  "the label server's 3D task sends one volume, so only single-channel models are served")
        self.file_ending = str(self.dataset_json.get("file_ending", ".nii.gz"))
        self.checkpoints = [self.folder / f"fold_{f}" / checkpoint_name for f in self.folds]
        missing = [str(p) for p in self.checkpoints if not p.is_file()]
        if missing:
            raise NnUNetFoldError(f"{', '.join(missing)} not found: train these folds first, or set --conf nnunet_folds "
                                  "to folds that are trained")
        self._predictor = None
        self._lock = threading.Lock()

    @property
    def labels(self) -> dict[str, int]:
        """Foreground labels of ``dataset.json`` (name -> index; region-based labels are not supported)."""
        out = {}
        for name, v in self.dataset_json.get("labels", {}).items():
            if isinstance(v, (list, tuple)):
                raise NnUNetFoldError(f"{self.folder / 'dataset.json'}: region-based label {name!r} is not supported")
            if int(v) != 0:
                out[str(name)] = int(v)
        return out

    def check_checkpoints(self) -> None:
        """Every fold's checkpoint must load weights-only (nnU-Net itself unpickles it) unless ``allow_pickle``."""
        if self.allow_pickle:
            return
        from tpp_monai.cli import check_checkpoints_weights_only

        err = check_checkpoints_weights_only([str(p) for p in self.checkpoints],
                                             pickle_hint="start the server with --conf allow_pickle true")
        if err:
            raise NnUNetFoldError(err)

    def predictor(self):
        """nnU-Net's predictor for the folds (built once; our trainer classes found via ``nnUNet_extTrainer``)."""
        with self._lock:
            if self._predictor is None:
                self.check_checkpoints()
                import torch
                from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

                from tpp_monai.nnunet.runner import _environ
                from tpp_monai.nnunet import trainer_path

                device = torch.device(self.device)
                p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=self.use_mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
                env = {"nnUNet_extTrainer": os.pathsep.join(
                    [trainer_path(), *[q for q in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if q]])}
                if self.allow_pickle:
                    env["TPP_NNUNET_ALLOW_PICKLE"] = "1"
                with _environ(env):
                    p.initialize_from_trained_model_folder(str(self.folder), use_folds=self.folds,
                                                           checkpoint_name=self.checkpoint_name)
                self._predictor = p
            return self._predictor

    def predict_file(self, image: str | os.PathLike, output: str | os.PathLike,
                     max_voxels: int | None = MAX_VOLUME_VOXELS) -> dict[str, Any]:
        """Segment ``image`` and write the label volume to ``output`` (same geometry); returns a summary."""
        import numpy as np

        check_volume(image, max_voxels)
        p = self.predictor()
        rw = p.plans_manager.image_reader_writer_class()
        try:
            data, props = rw.read_images([str(image)])
        except Exception as e:  # noqa: BLE001 - re-raised with the file and the reason
            raise ImageReadError(f"cannot read {Path(image).name} as a volume ({type(e).__name__}: {e})") from e
        with self._lock:  # one prediction at a time per model (nnU-Net's predictor keeps state)
            seg = p.predict_single_npy_array(data, props, None, None, False)
        rw.write_seg(np.asarray(seg), str(output), props)
        return {"shape": [int(s) for s in np.asarray(seg).shape],
                "classes_present": sorted(int(v) for v in np.unique(seg))}
