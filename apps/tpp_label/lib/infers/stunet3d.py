"""3D segmentation of a NIfTI volume by an nnU-Net-trained STU-Net (+ Conv-Adapter) fold, through nnU-Net's own
predictor (:class:`tpp_monai.label.nnunet3d.NnUNetFold`); the label volume comes back on the input's grid."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from tpp_monai.label import images, nnunet3d, safety

from .bundle_seg import NOT_A_DATASTORE_IMAGE


class STUNet3DInfer(InferTask):
    """The 3D task ``stunet3d`` (``--conf nnunet_model_folder``): trained with nnU-Net, never by this server."""

    def __init__(self, name: str, fold: nnunet3d.NnUNetFold, roots: Callable[[], tuple] | None = None,
                 max_voxels: int | None = nnunet3d.MAX_VOLUME_VOXELS):
        super().__init__(type=InferType.SEGMENTATION, labels=fold.labels, dimension=3,
                         description=f"STU-Net 3D segmentation, nnU-Net fold(s) {', '.join(map(str, fold.folds))} "
                                     f"of {fold.folder.name} (tpp-monai)", config={"device": [fold.device]})
        self.name, self.fold, self.roots, self.max_voxels = name, fold, roots, max_voxels

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        image = request.get("image")
        if not isinstance(image, str) or (self.roots and not any(safety.inside(image, r) for r in self.roots())) \
                or not os.path.isfile(image):
            raise safety.RequestError(NOT_A_DATASTORE_IMAGE)
        out = tempfile.NamedTemporaryFile(suffix=self.fold.file_ending, delete=False).name
        try:
            summary = self.fold.predict_file(image, out, max_voxels=self.max_voxels)
        except images.ImageTooLarge as e:
            raise safety.RequestError(f"volume too large: {e} (server limit: --conf max_volume_voxels)", status=413) from e
        except nnunet3d.NnUNetFoldError as e:
            raise safety.RequestError(f"the 3D model cannot be loaded: {e}", status=503) from e
        return out, {"model": self.name, "label_names": self.fold.labels, "folds": list(self.fold.folds),
                     "trained": True, **summary}
