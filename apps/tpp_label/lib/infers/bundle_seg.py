"""2D segmentation by a tpp-monai bundle, served with MONAI Label's own ``BundleInferTask``.

The bundle's ``inference.json`` gives everything: ``network_def``, ``preprocessing`` (the bundle's reader and
[0, 1] scaling), ``inferer`` (4-flip TTA) and ``postprocessing`` up to the mask at the input's size; the weights
are the bundle's ``models/model.pt`` (what ``train.json`` writes, or a ``python -m monai.bundle run`` elsewhere),
loaded by ``BasicInferTask`` (``torch.load``, weights-only in torch >= 2.6) and reloaded when its mtime changes.
Overridden only where MONAI Label's defaults do not fit a 2D bundle: the mask is written by the bundle's own
``SaveMaskd`` (PNG upright, as ``inference.json`` writes it; MONAI Label's ITK writer would transpose it), and
MONAI Label's ``Restored`` is off (the bundle's postprocessing restores the input size itself).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

from monai.transforms import SaveImaged
from monailabel.tasks.infer.bundle import BundleInferTask

from tpp_monai.safe_io import check_checkpoint_file
from tpp_monai.label import images, safety

#: the one message for any image that is not a datastore id or an upload: never says whether a path exists
NOT_A_DATASTORE_IMAGE = ("image must be the id of a datastore image (GET /datastore/?output=all lists them) "
                         "or an uploaded file; server paths are not accepted")


def untrained_message(name: str) -> str:
    """Why /infer/<name> is refused before the bundle has a model (409)."""
    return (f"model '{name}' has not been trained yet (its bundle has no models/model.pt): train it first "
            f"(POST /train/{name}, or 3D Slicer's Train button), or train the bundle with "
            "python -m monai.bundle run --config_file \"['configs/train.json']\" and restart nothing: the file is "
            "picked up when it appears")


class BundleSegInfer(BundleInferTask):
    """``BundleInferTask`` on the bundle folder ``bundle_path`` (valid once ``models/model.pt`` exists).

    ``roots``: the datastore and upload folders, the only places an image is read from; ``max_pixels``: the
    server's pixel cap, checked from the header before the bundle's reader decodes the image.
    """

    def __init__(self, name: str, bundle_path: str, conf: dict, roots: Callable[[], tuple] | None = None,
                 max_pixels: int | None = None) -> None:
        super().__init__(bundle_path, conf, post_filter=[SaveImaged], add_post_restore=False, load_strict=True)
        self.name, self.roots, self.max_pixels = name, roots, max_pixels

    @property
    def model_file(self) -> str:
        return os.path.join(self.bundle_path, "models", self.const.model_pytorch())

    def _get_network(self, device, data):
        check_checkpoint_file(self.model_file, "model checkpoint")  # a clear message, not a zip error
        return super()._get_network(device, data)

    def writer(self, data, extension=None, dtype=None):
        """The bundle's ``SaveMaskd`` (from ``tpp_monai.bundle``): PNG for a PNG input, else NIfTI."""
        from tpp_monai.bundle import SaveMaskd

        src = str(data["image_path"])
        ext = ".nii.gz" if src.lower().endswith((".nii", ".nii.gz")) else ".png"
        out_dir = tempfile.mkdtemp()  # in the server's swept upload folder
        try:
            saved = SaveMaskd(self.output_label_key, output_dir=out_dir, output_ext=ext, path_key="image_path")(data)
            out = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
            os.replace(saved[f"{self.output_label_key}_saved_to"], out)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        mask = data[self.output_label_key]
        return out, {"model": self.name, "model_mtime_ns": data["model_mtime_ns"], "trained": True,
                     "bundle": os.path.basename(os.path.normpath(self.bundle_path)),
                     "classes_present": sorted(int(v) for v in mask.unique().tolist()),
                     "shape": [int(s) for s in mask.shape[1:]]}

    def __call__(self, request, callbacks=None):
        image = request.get("image")
        if not isinstance(image, str) or (self.roots and not any(safety.inside(image, r) for r in self.roots())) \
                or not os.path.isfile(image):
            raise safety.RequestError(NOT_A_DATASTORE_IMAGE)
        images.read_image_2d(image, max_pixels=self.max_pixels)  # size cap from the header; unreadable -> 400
        request = {**{k: v for k, v in request.items() if k != "label"},  # the bundle takes no prior label
                   "model_mtime_ns": os.stat(self.model_file).st_mtime_ns}
        return super().__call__(request, callbacks)


class ModelFileRefused(ValueError):
    """An uploaded model file does not fit the bundle (the message says why); the served model is unchanged."""


def install_model_file(upload: str, bundle_path: str) -> int:
    """Check an uploaded ``model.pt`` against the bundle, then put it in place of ``models/model.pt`` atomically.

    It must be a complete ``torch.save`` file that loads weights-only and whose tensors fit the bundle's
    ``network_def`` (from ``inference.json``) exactly, so the infer task never meets a file it cannot serve.
    Returns the new file's mtime (ns).
    """
    import torch
    from monai.bundle import ConfigParser

    try:
        check_checkpoint_file(upload, "uploaded model")
        obj = torch.load(upload, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable / pickled file is refused with the reason
        raise ModelFileRefused(f"not a weights-only torch.save file ({type(e).__name__}: {str(e)[:200]})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ModelFileRefused("the file holds no state_dict (expected {'model': state_dict} or a state_dict)")
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_path, "configs", "inference.json"))
    parser["bundle_root"] = bundle_path
    network = parser.get_parsed_content("network_def")
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelFileRefused(f"its tensors do not fit the bundle's network_def: {str(e).splitlines()[0][:300]}") from None
    dest = os.path.join(bundle_path, "models", "model.pt")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".pt", dir=os.path.dirname(dest))
    os.close(fd)
    try:
        shutil.copyfile(upload, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return os.stat(dest).st_mtime_ns
