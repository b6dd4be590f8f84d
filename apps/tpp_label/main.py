"""MONAI Label app serving tpp-monai's 2D ViT + PEFT segmentation model, with TPP + PEFT re-training.

    monailabel start_server --app apps/tpp_label --studies <dir> --conf models tpp_seg

Infer task ``tpp_seg``: loads ``<model_dir>/tpp_seg.pt`` (a :mod:`tpp_monai.label.seg2d` model file)
and reloads it whenever its mtime changes (a finished training run replaces it atomically).
Train task ``tpp_seg``: TPP (MAE by default) on every datastore image, labelled or not, then PEFT
fine-tuning on the images with a ``final`` label; writes the new model file atomically.

``--conf`` keys (all optional; defaults in ``DEFAULTS``): models, labels, vit_size, img_size,
backbone_ckpt, allow_pickle, peft, peft_config (JSON), vit_overrides (JSON), pretext,
pretext_config (JSON), tpp, tpp_epochs, epochs, batch_size, lr, tpp_lr, model_dir, init_model.
All model building, I/O and training live in the library (``tpp_monai.label``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from typing import Any, Dict

import torch
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

from tpp_monai.label import seg2d

logger = logging.getLogger(__name__)

MODELS_2D = ("tpp_seg",)
#: names reserved for models this app does not serve yet (clear message instead of "unknown")
NOT_IMPLEMENTED = {"stunet3d": "the 3D STU-Net model is not served by this app yet (2D ViT+PEFT only)"}

DEFAULTS: Dict[str, str] = {
    "models": "tpp_seg",
    "labels": "soft_tissue,bone",
    "vit_size": "tiny",
    "img_size": "96",
    "in_chans": "3",
    "backbone_ckpt": "",
    "allow_pickle": "false",
    "peft": "adapter",
    "peft_config": "{}",
    "vit_overrides": "{}",
    "pretext": "mae",
    "pretext_config": "{}",
    "tpp": "true",
    "tpp_epochs": "5",
    "epochs": "20",
    "batch_size": "8",
    "lr": "1e-3",
    "tpp_lr": "",
    "init_model": "true",
}


def _device(requested: Any) -> str:
    if isinstance(requested, (list, tuple)):
        requested = requested[0] if requested else "cpu"
    requested = str(requested or "cpu")
    return requested if requested.startswith("cuda") and torch.cuda.is_available() else "cpu"


class TPPSegInfer(InferTask):
    """2D segmentation with the ViT + PEFT model file; reloads it when its mtime changes."""

    def __init__(self, name: str, path: str, labels: Dict[str, int], description: str):
        super().__init__(type=InferType.SEGMENTATION, labels=labels, dimension=2, description=description,
                         config={"device": ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]})
        self.name = name
        self.path = path
        self._lock = threading.Lock()
        self._cached: tuple | None = None  # (mtime_ns, device, model, cfg, meta)

    def is_valid(self) -> bool:
        return os.path.isfile(self.path)

    def get_path(self, validate=True):
        return self.path if (not validate or self.is_valid()) else None

    def _model(self, device: str):
        if not self.is_valid():
            raise MONAILabelException("INFERENCE_ERROR", f"model file {self.path} does not exist; run /train/{self.name}")
        with self._lock:
            mtime = os.stat(self.path).st_mtime_ns
            c = self._cached
            if c is None or c[0] != mtime or c[1] != device:
                model, cfg, meta = seg2d.load_model(self.path, device=device)
                logger.info(f"{self.name}: loaded {self.path} (version {meta.get('version')}, trained {meta.get('trained')})")
                self._cached = c = (mtime, device, model, cfg, meta)
            return c

    def __call__(self, request):
        device = _device(request.get("device"))
        image = request.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise seg2d.ImageReadError(f"image {image!r} is not a file on the server")
        arr, info = seg2d.read_image_2d(image)
        mtime, _, model, cfg, meta = self._model(device)
        mask = seg2d.predict(model, arr, cfg, device=device)
        suffix = ".nii.gz" if info["format"] == "nifti" else ".png"
        out = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
        seg2d.write_mask_2d(mask, out, info)
        return out, {
            "label_names": cfg.labels, "model": self.name, "model_version": meta.get("version", 0),
            "model_mtime_ns": mtime, "trained": bool(meta.get("trained", False)),
            "classes_present": sorted(int(v) for v in set(mask.flat)), "shape": list(mask.shape),
        }


class TPPSegTrain(TrainTask):
    """TPP on all datastore images, then PEFT fine-tuning on the labelled ones; atomic write of the model file."""

    def __init__(self, name: str, path: str, cfg: seg2d.Seg2DConfig, conf: Dict[str, str]):
        super().__init__(f"TPP ({conf['pretext']}) + PEFT ({cfg.peft_method}) fine-tuning of {name}")
        self.name, self.path, self.cfg, self.conf = name, path, cfg, conf

    def config(self):
        c = self.conf
        return {"tpp": strtobool(c["tpp"]), "pretext": c["pretext"], "tpp_epochs": int(c["tpp_epochs"]),
                "epochs": int(c["epochs"]), "batch_size": int(c["batch_size"]), "lr": float(c["lr"]),
                "device": ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]}

    def stats(self):
        try:
            return dict(seg2d.read_model_file(self.path).get("meta", {}))
        except Exception:  # noqa: BLE001 - no model yet
            return {}

    def __call__(self, request, datastore: Datastore):
        r = {**self.config(), **{k: v for k, v in request.items() if v is not None}}
        images = [datastore.get_image_uri(i) for i in datastore.list_images()]
        labelled = [(datastore.get_image_uri(i), datastore.get_label_uri(i, DefaultLabelTag.FINAL))
                    for i in datastore.get_labeled_images(DefaultLabelTag.FINAL)]
        prev = self.stats().get("version", 0)
        logger.info(f"{self.name}: train on {len(images)} images ({len(labelled)} labelled), request {r}")
        stats = seg2d.train_tpp_peft(
            self.cfg, images, labelled, self.path, os.path.join(os.path.dirname(self.path), f"{self.name}_work"),
            pretext=str(r["pretext"]), pretext_config=json.loads(self.conf["pretext_config"]),
            tpp=bool(strtobool(str(r["tpp"]))), tpp_epochs=int(r["tpp_epochs"]), ft_epochs=int(r["epochs"]),
            batch_size=int(r["batch_size"]), ft_lr=float(r["lr"]),
            tpp_lr=float(self.conf["tpp_lr"]) if self.conf["tpp_lr"] else None,
            device=_device(r.get("device")), version=int(prev) + 1, log=logger.info,
        )
        return stats


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.tconf = {**DEFAULTS, **{k: str(v) for k, v in (conf or {}).items()}}
        c = self.tconf
        self.model_dir = c.get("model_dir") or os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        names = [m.strip() for m in c["models"].split(",") if m.strip()]
        names = list(MODELS_2D) if names == ["all"] else names
        bad = [m for m in names if m not in MODELS_2D]
        if bad:
            why = "; ".join(NOT_IMPLEMENTED.get(m, f"unknown model '{m}'") for m in bad)
            raise MONAILabelException("APP_INIT_ERROR", f"--conf models: {why}. Available: {', '.join(MODELS_2D)}")
        self.model_names = names
        self.seg_cfg = seg2d.Seg2DConfig(
            labels=seg2d.parse_labels(c["labels"]), size=c["vit_size"], img_size=int(c["img_size"]),
            in_chans=int(c["in_chans"]), backbone_ckpt=c["backbone_ckpt"], allow_pickle=bool(strtobool(c["allow_pickle"])),
            peft_method=c["peft"], peft_config=json.loads(c["peft_config"]), vit_overrides=json.loads(c["vit_overrides"]),
        )
        for m in names:
            path = self.model_path(m)
            if not os.path.isfile(path) and strtobool(c["init_model"]):
                # untrained start (zero-init PEFT, random decoder) so clients can see the model before the first /train
                seg2d.save_model(path, seg2d.build_model(self.seg_cfg), self.seg_cfg, meta={"trained": False, "version": 0})
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="tpp_label",
                         description="tpp-monai: ViT + PEFT segmentation with Target Parameter Pre-training",
                         version="0.1.0", labels=self.seg_cfg.labels)

    def model_path(self, name: str) -> str:
        return os.path.join(self.model_dir, f"{name}.pt")

    def init_infers(self):
        return {m: TPPSegInfer(m, self.model_path(m), self.seg_cfg.labels,
                               f"ViT-{self.seg_cfg.size} + {self.seg_cfg.peft_method} 2D segmentation (tpp-monai)")
                for m in self.model_names}

    def init_trainers(self):
        return {m: TPPSegTrain(m, self.model_path(m), self.seg_cfg, self.tconf) for m in self.model_names}

    def _known(self, model) -> None:
        if model is not None and model not in self._infers and model not in self._trainers:
            hint = NOT_IMPLEMENTED.get(model, f"no model '{model}'")
            raise HTTPException(status_code=404, detail=f"{hint}; available models: {', '.join(self.model_names)}")

    def bundle_path(self, model):
        # AsyncTask.run asks this before starting a background /train: reject unknown models with a 404 there
        self._known(model)
        return super().bundle_path(model)

    def infer(self, request, datastore=None):
        self._known(request.get("model"))
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except seg2d.ImageReadError as e:
            raise HTTPException(status_code=400, detail=f"bad image: {e}") from e
        except MONAILabelException as e:
            raise HTTPException(status_code=400, detail=f"{e.error}: {e.msg}") from e
        except Exception as e:  # noqa: BLE001 - the client gets the reason, the server keeps serving
            logger.exception("infer failed")
            raise HTTPException(status_code=500, detail=f"inference failed: {type(e).__name__}: {e}") from e

    def train(self, request):
        self._known(request.get("model"))
        return super().train(request)
