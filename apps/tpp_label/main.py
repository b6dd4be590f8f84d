"""MONAI Label app serving tpp-monai's 2D ViT + PEFT segmentation model (TPP + PEFT re-training) and,
optionally, a 3D STU-Net + Conv-Adapter model trained with nnU-Net.

    python -m tpp_monai.label.serve --studies <dir> --conf models tpp_seg        # listens on 127.0.0.1
    monailabel start_server --app apps/tpp_label --host 127.0.0.1 --studies <dir>  # the same, by hand

Infer task ``tpp_seg`` (BasicInferTask): upright 2D reader, [0, 1], 4-flip TTA; loads
``<model_dir>/tpp_seg.pt`` (a :mod:`tpp_monai.label.seg2d` model file) and reloads it whenever its mtime
changes; refuses to serve an untrained model unless ``--conf allow_untrained true``.
Train task ``tpp_seg`` (BasicTrainTask): TPP (MAE by default) on every datastore image, labelled or not,
then PEFT fine-tuning on the images with a ``final`` label with a validation split; MONAI Label's
train_stats; the best epoch's model file written atomically.
Infer task ``stunet3d`` (only with ``--conf nnunet_model_folder``): nnU-Net's own predictor on a NIfTI volume.
Strategies ``first`` and ``random``.

``--conf`` keys (all optional; defaults in ``DEFAULTS``): models, labels, vit_size, img_size,
backbone_ckpt, allow_pickle, peft, peft_config (JSON), vit_overrides (JSON), pretext,
pretext_config (JSON), tpp, tpp_epochs, epochs, batch_size, lr, val_split, tpp_lr, model_dir,
allow_untrained, nnunet_model_folder, nnunet_folds, nnunet_checkpoint, nnunet_tta, nnunet_device,
expose, cors_origins, allowed_hosts, allow_model_upload, max_image_pixels, max_volume_voxels, max_upload_mb.
All model building, I/O and training live in the library (``tpp_monai.label``); the request checks
(plain-name ids and tags, datastore-only images, train parameters, size caps, temp-file sweeping,
client-safe errors, browser guard) are in :mod:`tpp_monai.label.safety` and wired here. The server refuses to
listen beyond loopback unless ``--conf expose true`` (see README: enable authentication first), answers no
other web origin unless listed (``--conf cors_origins``), checks ``Host`` (DNS rebinding), refuses model
uploads unless ``--conf allow_model_upload true`` with authentication, and stops its training with it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
from monai.engines.workflow import Events
from monai.inferers import SimpleInferer
from monai.transforms import Activationsd, AsDiscreted, SelectItemsd
from fastapi import APIRouter, BackgroundTasks, Depends, File, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.train.basic_train import BasicTrainTask
from monailabel.tasks.train.handler import prepare_stats
from monailabel.utils.others.generic import strtobool
from monailabel.utils.sessions import Sessions
from filelock import FileLock
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from tpp_monai.bundle.inferers import FlipTTAInferer
from tpp_monai.safe_io import CheckpointMismatch, atomic_write
from tpp_monai.label import nnunet3d, pipeline, safety, seg2d
from tpp_monai.pretext import PRETEXT_TASKS

logger = logging.getLogger(__name__)

MODELS_2D = ("tpp_seg",)
#: the 3D task: an nnU-Net-trained STU-Net (+ Conv-Adapter) fold, served when --conf nnunet_model_folder is set
MODEL_3D = "stunet3d"
NEEDS_FOLDER = (f"model '{MODEL_3D}' is served only with --conf nnunet_model_folder "
                "<nnUNet_results>/DatasetXXX/<Trainer>__<Plans>__3d_fullres (a trained fold)")

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
    "val_split": "0.2",
    "nnunet_model_folder": "",
    "nnunet_folds": "0",
    "nnunet_checkpoint": "checkpoint_final.pth",
    "nnunet_tta": "true",
    "nnunet_device": "cuda",
    "max_volume_voxels": str(nnunet3d.MAX_VOLUME_VOXELS),
    "allow_untrained": "false",
    "expose": "false",
    "cors_origins": "",
    "allowed_hosts": "",
    "allow_model_upload": "false",
    "max_image_pixels": str(seg2d.MAX_IMAGE_PIXELS),
    "max_upload_mb": "256",
}
#: environment variable naming the server's pid for its train subprocess (which exits when the server is gone)
SERVER_PID_ENV = "TPP_LABEL_SERVER_PID"
#: free space an upload must leave on the datastore's disk (the datastore JSON is rewritten after it)
UPLOAD_HEADROOM = 1 << 20
#: keys monailabel itself adds to a train request (not the client's)
SERVER_TRAIN_KEYS = ("model", "bundle_path", "gpus", "local_rank", "multi_gpu")
NOT_AN_UPLOADED_LABEL = ("label must be a file uploaded with the request (form field 'label'); "
                         "server paths are not accepted")
#: monailabel's own HTTP 500 answers that are the client's mistake (answered 400 with what to send)
CLIENT_ERRORS_500 = {
    "Neither Image nor File not Session ID input is provided":
        "no input: send ?image=<datastore image id>, an uploaded file (form field 'file') or ?session_id=<id>",
    "DICOM SEG format is not supported in a non-DICOM datastore":
        "output=dicom_seg needs a DICOMweb datastore; this server's datastore is a local folder (use output=image)",
}
#: the one message for any image that is not a datastore id or an upload: never says whether a path exists
NOT_A_DATASTORE_IMAGE = ("image must be the id of a datastore image (GET /datastore/?output=all lists them) "
                         "or an uploaded file; server paths are not accepted")


def _device(requested: Any) -> str:
    if isinstance(requested, (list, tuple)):
        requested = requested[0] if requested else "cpu"
    requested = str(requested or "cpu")
    return requested if requested.startswith("cuda") and torch.cuda.is_available() else "cpu"


def untrained_message(name: str) -> str:
    return (f"model '{name}' has not been trained yet: train it first (POST /train/{name}, or 3D Slicer's Train "
            "button) or start the server with --conf allow_untrained true to serve the untrained (random-init) model")


class TPPSegInfer(BasicInferTask):
    """2D segmentation with the ViT + PEFT model file on MONAI Label's BasicInferTask pipeline.

    pre: :class:`pipeline.LoadSeg2Dd` (upright PNG / Slicer 2D NIfTI, [0, 1], model size); inferer: the
    bundles' 4-flip TTA (:class:`FlipTTAInferer`); post: :class:`pipeline.RestoreSeg2Dd` (input size, argmax);
    writer: the input's format. The network is read from the model file with ``weights_only`` loading and
    the backbone fingerprint check, and reloaded whenever the file's mtime changes (training replaces it
    atomically). An untrained model is refused unless ``allow_untrained``.
    """

    def __init__(self, name: str, path: str, labels: Dict[str, int], description: str,
                 roots: Callable[[], tuple] | None = None, max_pixels: int | None = None,
                 allow_untrained: bool = False):
        super().__init__(path=path, network=None, type=InferType.SEGMENTATION, labels=labels, dimension=2,
                         description=description, config={"device": ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]})
        self.name = name
        self.roots = roots  # -> the datastore and the upload folders: the only places images are read from
        self.max_pixels = max_pixels
        self.allow_untrained = allow_untrained
        self._lock = threading.Lock()
        self._cached: tuple | None = None  # (mtime_ns, device, model, cfg, meta)

    def is_valid(self) -> bool:
        return True  # listed before the first training too: /infer then says to train first

    def _model(self, device: str):
        with self._lock:
            if not os.path.isfile(self.path[0]):
                raise safety.RequestError(untrained_message(self.name), status=409)
            mtime = os.stat(self.path[0]).st_mtime_ns
            c = self._cached
            if c is None or c[0] != mtime or c[1] != device:
                model, cfg, meta = seg2d.load_model(self.path[0], device=device)
                logger.info(f"{self.name}: loaded model version {meta.get('version')}, trained {meta.get('trained')}")
                self._cached = c = (mtime, device, model, cfg, meta)
            if not c[4].get("trained") and not self.allow_untrained:
                raise safety.RequestError(untrained_message(self.name), status=409)
            return c

    def _get_network(self, device, data):
        return self._model(_device(device))[2]

    def pre_transforms(self, data=None):
        cfg = data["model_cfg"]
        return [pipeline.LoadSeg2Dd(cfg.img_size, cfg.in_chans, cfg.num_classes, max_pixels=self.max_pixels)]

    def inferer(self, data=None):
        return FlipTTAInferer()

    def inverse_transforms(self, data=None):
        return None

    def post_transforms(self, data=None):
        return [pipeline.RestoreSeg2Dd(self.output_label_key)]

    def writer(self, data, extension=None, dtype=None):
        info = data["image_info"]
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz" if info["format"] == "nifti" else ".png", delete=False).name
        mask = data[self.output_label_key]
        seg2d.write_mask_2d(mask, out, info)
        meta = data["model_meta"]
        return out, {"model": self.name, "model_version": meta.get("version", 0), "model_mtime_ns": data["model_mtime_ns"],
                     "trained": bool(meta.get("trained", False)),
                     "classes_present": sorted(int(v) for v in set(mask.flat)), "shape": list(mask.shape)}

    def __call__(self, request, callbacks=None):
        image = request.get("image")
        if not isinstance(image, str) or (self.roots and not any(safety.inside(image, r) for r in self.roots())) \
                or not os.path.isfile(image):
            raise safety.RequestError(NOT_A_DATASTORE_IMAGE)
        mtime, _, _, cfg, meta = self._model(_device(request.get("device")))
        request = {**{k: v for k, v in request.items() if k != "label"},  # the 2D model takes no prior label
                   "device": _device(request.get("device")), "model_cfg": cfg, "model_meta": meta,
                   "model_mtime_ns": mtime}
        out, res = super().__call__(request, callbacks)
        res["label_names"] = cfg.labels
        return out, res


class TPPSegTrain(BasicTrainTask):
    """TPP on every datastore image, then PEFT fine-tuning with a validation split, on BasicTrainTask.

    MONAI Label's machinery runs unchanged: ``partition_datalist`` (``val_split``), SupervisedTrainer /
    SupervisedEvaluator with its Dice metrics, and ``PublishStatsAndModel`` writing ``train_stats.json``
    (epoch, total_epochs, total_time, best_metric, train / eval metrics: what 3D Slicer shows). Overridden:
    ``network()`` runs the TPP stage first and builds the network with its target parameters; no
    checkpoint of an earlier run is loaded (each run's fine-tuning starts from its own TPP); the model is
    published by us, atomically, in the safe model-file format, only after training finished with finite
    weights (MONAI Label copies its own full-network checkpoint into place with ``shutil.copy``).
    Single process: the TPP stage is not distributed, so ``multi_gpu`` is off.
    """

    def __init__(self, name: str, path: str, cfg: seg2d.Seg2DConfig, conf: Dict[str, str], log_dir: str = ""):
        self.name, self.path, self.cfg, self.conf = name, path, cfg, conf
        self.log_dir = log_dir or os.path.dirname(path)
        self.work_dir = os.path.join(os.path.dirname(path), f"{name}_work")
        super().__init__(
            self.work_dir, description=f"TPP ({conf['pretext']}) + PEFT ({cfg.peft_method}) fine-tuning of {name}",
            config={"name": "train", "pretrained": False, "multi_gpu": False, "dataset": "Dataset",
                    "dataloader": "DataLoader", "val_split": float(conf["val_split"]), "tracking": "None"},
            amp=False, publish_path=None, train_save_interval=0, n_saved=1, labels=list(cfg.labels),
            stats_path=os.path.join(os.path.dirname(path), f"{name}_train_stats.json"), tracking=None)
        self._keeper: pipeline.KeepBestTrainable | None = None
        self._server_pid: int | None = None  # set in the train subprocess: the server that started it

    def config(self):
        """What a client may set (3D Slicer sends these back with /train): the keys safety.validate_train_params takes."""
        c = self.conf
        return {"tpp": strtobool(c["tpp"]), "pretext": c["pretext"], "tpp_epochs": int(c["tpp_epochs"]),
                "epochs": int(c["epochs"]), "batch_size": int(c["batch_size"]), "lr": float(c["lr"]),
                "val_split": float(c["val_split"]),
                "device": ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]}

    # ---- BasicTrainTask hooks
    def tpp_epochs_run(self, request) -> int:
        """TPP epochs this run does (0 without TPP): the offset of fine-tuning's epochs in the progress report."""
        return int(request["tpp_epochs"]) if request["tpp"] and int(request["tpp_epochs"]) > 0 else 0

    def network(self, context):
        r, say = context.request, self._say
        tpp_ckpt = None
        n_tpp = self.tpp_epochs_run(r)
        if n_tpp:
            progress = pipeline.StageProgress(lambda st: atomic_write_json(self._stats_path, st), n_tpp,
                                              n_tpp + int(r["max_epochs"]), start_ts=context.start_ts)
            progress.write(progress.stats(0))  # replaces the previous run's (finished) stats at once
            tpp_ckpt = seg2d.run_tpp_stage(
                self.cfg, r["tpp_images"], os.path.join(context.output_dir, "tpp"),  # replaced by each run
                pretext=r["pretext"], pretext_config=json.loads(self.conf["pretext_config"]), epochs=n_tpp,
                batch_size=r["train_batch_size"], lr=float(self.conf["tpp_lr"]) if self.conf["tpp_lr"] else None,
                device=str(context.device), log=say, handlers=[progress])
        context.request["tpp_ckpt"] = tpp_ckpt
        torch.manual_seed(0)
        return seg2d.build_model(self.cfg, tpp_ckpt=tpp_ckpt)

    def optimizer(self, context):
        from tpp_monai.engines.optim import build_optimizer

        return build_optimizer(context.network, lr=float(context.request["lr"]))

    def loss_function(self, context):
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)

    def lr_scheduler_handler(self, context):
        return None  # constant lr, as the library's fine-tuning here

    def train_pre_transforms(self, context):
        return [pipeline.LoadSeg2Dd(self.cfg.img_size, self.cfg.in_chans, self.cfg.num_classes),
                SelectItemsd(keys=("image", "label"))]

    def train_post_transforms(self, context):
        n = self.cfg.num_classes
        return [Activationsd(keys="pred", softmax=True),
                AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(n, n))]

    def val_inferer(self, context):
        return SimpleInferer()  # validation is a plain forward pass, as in MedCoSS (TTA only at inference)

    def load_path(self, output_dir, pretrained=True):
        return None  # fine-tuning starts from this run's TPP target parameters, not an earlier checkpoint

    def partition_datalist(self, context, shuffle=False):
        train, val = super().partition_datalist(context, shuffle)
        if not train:  # one labelled image: no validation split rather than nothing to train on
            train, val = list(context.datalist), []
        self._say(f"{len(train)} labelled image(s) for training, {len(val)} for validation "
                  f"(val_split {context.request.get('val_split')})")
        context.request["num_train"], context.request["num_val"] = len(train), len(val)
        return train, val

    def finalize(self, context):
        super().finalize(context)
        self._keeper = keeper = pipeline.KeepBestTrainable(context.network)
        (context.evaluator or context.trainer).add_event_handler(Events.EPOCH_COMPLETED, keeper)
        losses = context.request["losses"] = []
        context.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(
            float(e.state.output[0]["loss"]) if isinstance(e.state.output, list) else float(e.state.output["loss"])))
        context.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: self._say(
            f"epoch {e.state.epoch}/{e.state.max_epochs}: loss {losses[-1]:.4f}" if losses else f"epoch {e.state.epoch}"))
        # after MONAI Label's publisher (registered first, same event) has written this epoch's stats
        (context.evaluator or context.trainer).add_event_handler(Events.EPOCH_COMPLETED, lambda e: atomic_write_json(
            self._stats_path, self.run_stats(prepare_stats(context.start_ts, context.trainer, context.evaluator),
                                             context.request)))

    def run_stats(self, stats: Dict[str, Any], request) -> Dict[str, Any]:
        """MONAI Label's fine-tuning stats with ``epoch`` / ``total_epochs`` counted over the whole run (TPP +
        fine-tuning, as during TPP) and the stage; fine-tuning's own count stays in ``stage_epoch(s)``."""
        n_tpp = self.tpp_epochs_run(request)
        stats = json.loads(json.dumps(stats, default=float))
        ep, total = int(stats.get("epoch", 0)), int(stats.get("total_epochs", request["max_epochs"]))
        return {**stats, "stage": "finetune", "stage_epoch": ep, "stage_epochs": total, "tpp_epochs_done": n_tpp,
                "epoch": n_tpp + ep, "total_epochs": n_tpp + total}

    def pre_process(self, request, datastore):
        images = [datastore.get_image_uri(i) for i in datastore.list_images()]
        labelled = [(datastore.get_image_uri(i), datastore.get_label_uri(i, DefaultLabelTag.FINAL))
                    for i in datastore.get_labeled_images(DefaultLabelTag.FINAL)]
        if not labelled:
            raise ValueError("no labelled images in the datastore: save at least one label before training")
        seg2d.check_labelled(labelled, self.cfg.num_classes)  # before TPP: a bad pair stops the run at once
        request["tpp_images"] = images
        self._say(f"{self.name}: train on {len(images)} images ({len(labelled)} labelled), "
                  f"{json.dumps({k: request[k] for k in safety.TRAIN_KEYS if k in request})}")
        return [{"image": i, "label": lbl} for i, lbl in labelled]

    def train(self, rank, world_size, request, datalist):
        t0 = time.time()
        stats = super().train(rank, world_size, request, datalist)
        network, keeper = self._keeper.network, self._keeper
        keeper.restore()  # the best validation epoch (the last one without a validation split)
        seg2d.check_trained(network, request["losses"], float(request["lr"]))
        ours = {  # what /info's train_stats and the model file add to MONAI Label's own stats
            "trained": True, "version": int(self._prev_version()) + 1, "tpp": bool(request["tpp_ckpt"]),
            "pretext": request["pretext"] if request["tpp_ckpt"] else "",
            "tpp_epochs": request["tpp_epochs"] if request["tpp_ckpt"] else 0, "ft_epochs": request["max_epochs"],
            "num_images": len(request["tpp_images"]), "num_labelled": len(datalist), "num_train": request["num_train"],
            "num_val": request["num_val"], "val_split": request.get("val_split", 0.0), "published_epoch": keeper.epoch,
            "published_metric": keeper.metric, "final_loss": request["losses"][-1], "total_seconds": round(time.time() - t0, 2),
        }
        network.to("cpu")
        if self._server_pid is not None and os.getppid() != self._server_pid:
            raise RuntimeError("the label server stopped during training: the model is not published")
        seg2d.save_model(self.path, network, self.cfg, meta=ours)
        stats = {**self.run_stats(stats, request), **ours, "stage": "done"}
        atomic_write_json(self._stats_path, stats)
        self._say(f"saved {os.path.basename(self.path)}: version {ours['version']}, best metric {stats.get('best_metric')}")
        return stats

    # ---- helpers
    @staticmethod
    def _say(message: str) -> None:
        logger.info(safety.CLIENT_MARK + message)

    def _prev_version(self) -> int:
        try:
            return int(seg2d.read_model_file(self.path).get("meta", {}).get("version", 0))
        except Exception:  # noqa: BLE001 - no model yet
            return 0

    def __call__(self, request, datastore: Datastore):
        """Runs in monailabel's train subprocess: clients see only our marked lines (no traceback, no paths)."""
        if "monailabel.app" not in sys.modules and self._server_pid is None and os.environ.get(SERVER_PID_ENV):
            self._server_pid = int(os.environ[SERVER_PID_ENV])  # the server that started this train subprocess
            threading.Thread(target=safety.exit_when_orphaned, args=(self._server_pid,), daemon=True,
                             name="tpp-label-server-watch").start()
        try:
            client = {k: v for k, v in request.items() if v is not None}
            ignore = (*SERVER_TRAIN_KEYS, *[k for k, v in client.items() if isinstance(v, dict)])  # POST /train/ nests
            r = {**self.config(), **safety.validate_train_params(client, PRETEXT_TASKS.names(), ignore=ignore)}
            seg2d.check_train_args(tpp_epochs=r["tpp_epochs"], ft_epochs=r["epochs"], batch_size=r["batch_size"],
                                   ft_lr=r["lr"])
            req = {"model": request.get("model", self.name), "tpp": bool(strtobool(str(r["tpp"]))), "pretext": r["pretext"],
                   "tpp_epochs": r["tpp_epochs"], "max_epochs": r["epochs"], "train_batch_size": r["batch_size"],
                   "val_batch_size": r["batch_size"], "lr": r["lr"], "val_split": r["val_split"],
                   "device": _device(r.get("device")), "multi_gpu": False}
            return super().__call__(req, datastore)
        except Exception as e:  # noqa: BLE001 - the traceback goes to a server-side file, the client gets the reason
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, "train_errors.log"), "a") as f:
                f.write(traceback.format_exc() + "\n")
            logger.error(f"{safety.CLIENT_MARK}training failed, the previous model is kept: {type(e).__name__}: "
                         f"{safety.redact(str(e), (self.log_dir, os.path.dirname(self.path), datastore_root(datastore)))}"
                         "; the traceback is in the server's logs/train_errors.log")
            if "monailabel.app" in sys.modules:  # run_sync=true: inside the server, which must keep serving
                raise safety.RequestError(f"training failed: {type(e).__name__}", status=422) from None
            raise SystemExit(1) from None


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON through a temporary file + rename: a reader (GET /info) never sees half a file."""
    atomic_write(path, json.dumps(obj, indent=2, default=str))


def _stop_training_with_server() -> None:
    """In the server: kill the train subprocess it started when it stops (SIGTERM / SIGINT, or any exit).

    monailabel's executor thread waits for the subprocess at interpreter exit, and uvicorn ends a
    signalled server by re-raising the signal after its graceful shutdown, so a stopped server left its
    training running (and publishing) until the run ended. The handlers are chained before uvicorn's
    (this runs at start-up, in the main thread); a thread covers exits without a signal; the train
    subprocess also watches the server's pid (``SERVER_PID_ENV``) for a server that was killed outright.
    """
    import signal

    from monailabel.utils.async_tasks import utils as tasks

    os.environ[SERVER_PID_ENV] = str(os.getpid())  # inherited by the train subprocess

    def kill_training() -> None:
        for procs in list(tasks.background_processes.values()):
            for proc in list(procs.values()):
                try:
                    import psutil

                    for child in psutil.Process(proc.pid).children(recursive=True):
                        child.kill()
                except Exception:  # noqa: BLE001 - already gone
                    pass
                if proc.poll() is None:
                    proc.kill()

    def on_signal(prev):
        def handler(sig, frame):
            kill_training()
            if callable(prev):
                return prev(sig, frame)
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            signal.raise_signal(sig)
        return handler

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal(signal.getsignal(sig)))

    def watch() -> None:
        threading.main_thread().join()
        kill_training()

    threading.Thread(target=watch, daemon=True, name="tpp-label-stop-training").start()


class STUNet3DInfer(InferTask):
    """3D segmentation of a NIfTI volume by an nnU-Net-trained STU-Net (+ Conv-Adapter) fold, through nnU-Net's
    own predictor (:class:`nnunet3d.NnUNetFold`); the label volume comes back on the input's grid."""

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
        except seg2d.ImageTooLarge as e:
            raise safety.RequestError(f"volume too large: {e} (server limit: --conf max_volume_voxels)", status=413) from e
        except nnunet3d.NnUNetFoldError as e:
            raise safety.RequestError(f"the 3D model cannot be loaded: {e}", status=503) from e
        return out, {"model": self.name, "label_names": self.fold.labels, "folds": list(self.fold.folds),
                     "trained": True, **summary}


class SafeSessions(Sessions):
    """monailabel's session store with plain-name session ids (they are joined into paths, removed with rmtree)."""

    def get_session(self, session_id, *args, **kwargs):
        return super().get_session(safety.check_name(session_id, "session id"), *args, **kwargs)

    def remove_session(self, session_id):
        return super().remove_session(safety.check_name(session_id, "session id"))


#: a datastore file moved aside while an upload replaces it (SafeDatastore._copy_in)
PREVIOUS_SUFFIX = ".tpp-previous"


def restore_previous(folder: str) -> None:
    """Put back files an interrupted upload moved aside. The upload never got its answer (the previous file is
    removed before the server answers), so its copy may be partial: the previous file wins."""
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(PREVIOUS_SUFFIX):
                prev = os.path.join(root, name)
                os.replace(prev, prev[: -len(PREVIOUS_SUFFIX)])
                logger.warning(f"restored {prev[: -len(PREVIOUS_SUFFIX)]} (an upload replacing it was interrupted)")


def datastore_root(datastore: Datastore) -> str:
    return str(getattr(datastore, "_datastore_path", "") or "")


class SafeDatastore(LocalDatastore):
    """LocalDatastore that takes only plain-name image ids, label ids and tags, and only images the app can read.

    monailabel joins these client-given names into paths (``tag=../../x`` wrote outside the datastore).
    """

    def __init__(self, *args, max_pixels: int | None = None, max_voxels: int | None = None, volumes: bool = False,
                 num_classes: int | None = None, **kwargs):
        self.max_pixels, self.max_voxels, self.volumes, self.num_classes = max_pixels, max_voxels, volumes, num_classes
        restore_previous(args[0] if args else kwargs["datastore_path"])
        super().__init__(*args, **kwargs)

    def _upload(self, filename: str, what: str, label_of: str | None = None) -> None:
        """A readable 2D image, or (when the 3D task is served) a 3D volume; size limits from the header.

        ``label_of``: the image id a label upload belongs to; its classes must be the model's (a 0/255 PNG
        was accepted here and only the next training failed, naming no file)."""
        safety.check_upload_ext(filename, what)
        try:
            arr, _ = seg2d.read_image_2d(filename, max_pixels=self.max_pixels)
            if label_of is not None and self.num_classes:
                try:
                    seg2d.check_label_classes(arr, self.num_classes)
                except seg2d.ImageReadError as e:
                    raise safety.RequestError(f"{what} for image {label_of!r}: {e}") from None
        except seg2d.ImageTooLarge as e:
            raise safety.RequestError(f"{what}: {e} (server limit: --conf max_image_pixels)", status=413) from e
        except seg2d.ImageReadError as e:
            if not self.volumes:
                raise safety.RequestError(f"{what}: {e}") from e
            try:
                nnunet3d.check_volume(filename, self.max_voxels)
            except seg2d.ImageTooLarge as e3:
                raise safety.RequestError(f"{what}: {e3} (server limit: --conf max_volume_voxels)", status=413) from e3
            except seg2d.ImageReadError as e3:
                raise safety.RequestError(f"{what}: {e}; nor a 3D volume: {e3}") from e3

    def add_image(self, image_id, image_filename, image_info):
        if image_id:
            safety.check_name(image_id, "image id")
        self._upload(image_filename, "image upload")
        image_id_, ext = self._to_id(os.path.basename(image_filename))
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), self._filename(image_id or image_id_, ext)))
        return self._copy_in(image_filename, dest, "image upload",
                             lambda: super(SafeDatastore, self).add_image(image_id, image_filename, image_info))

    def save_label(self, image_id, label_filename, label_tag, label_info):
        safety.check_name(image_id, "image id")
        safety.check_name(label_tag, "label tag")
        self._upload(label_filename, "label upload", label_of=image_id)
        _, ext = self._to_id(os.path.basename(label_filename))
        dest = os.path.join(self._datastore.label_path(label_tag), self._filename(image_id, ext))
        return self._copy_in(label_filename, dest, "label upload",
                             lambda: super(SafeDatastore, self).save_label(image_id, label_filename, label_tag, label_info))

    @staticmethod
    def _copy_in(src: str, dest: str, what: str, store: Callable[[], Any]) -> Any:
        """Run monailabel's store (it copies ``src`` over ``dest`` in place) so that a full disk loses nothing.

        Refused with 507 before writing when the disk lacks room for the file; if the copy still fails, the
        previous file (moved aside by a rename, which costs no space; a copy writes a new file) is put back,
        or the partial file removed: a truncated image or label never stays in the datastore (every later
        /train would fail on it). A server killed mid-copy puts the previous file back at the next start.
        """
        folder = os.path.dirname(dest)
        os.makedirs(folder, exist_ok=True)
        if shutil.disk_usage(folder).free < os.path.getsize(src) + UPLOAD_HEADROOM:
            raise safety.RequestError(safety.disk_full_message(what), status=507)
        backup = None
        if os.path.isfile(dest):
            backup = dest + PREVIOUS_SUFFIX
            os.replace(dest, backup)
        try:
            return store()
        except OSError as e:
            try:
                if backup is not None:
                    os.replace(backup, dest)
                    backup = None
                elif os.path.exists(dest):
                    os.unlink(dest)
            except OSError:
                logger.exception(f"could not restore {dest} after a failed {what}")
            if safety.is_disk_full(e):
                raise safety.RequestError(safety.disk_full_message(what), status=507) from e
            raise
        finally:
            if backup is not None and os.path.exists(backup):
                os.unlink(backup)

    def _update_datastore_file(self, lock=True):
        """monailabel rewrites datastore_v2.json in place: a full disk truncated it and broke every later start."""
        def write():
            self._ignore_event_config = True
            atomic_write(self._datastore_config_path,
                         json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def remove_image(self, image_id):
        return super().remove_image(safety.check_name(image_id, "image id"))

    def remove_label(self, label_id, label_tag):
        return super().remove_label(safety.check_name(label_id, "label id"), safety.check_name(label_tag, "label tag"))

    def get_image_uri(self, image_id):
        return super().get_image_uri(safety.check_name(image_id, "image id"))

    def get_label_uri(self, label_id, label_tag):
        return super().get_label_uri(safety.check_name(label_id, "label id"), safety.check_name(label_tag, "label tag"))

    def get_image_info(self, image_id):
        info = super().get_image_info(safety.check_name(image_id, "image id"))
        info.pop("path", None)  # clients get ids, not server paths
        return info

    def get_label_info(self, label_id, label_tag):
        return super().get_label_info(safety.check_name(label_id, "label id"), safety.check_name(label_tag, "label tag"))

    def update_image_info(self, image_id, info):
        return super().update_image_info(safety.check_name(image_id, "image id"), info)

    def update_label_info(self, label_id, label_tag, info):
        return super().update_label_info(safety.check_name(label_id, "label id"),
                                         safety.check_name(label_tag, "label tag"), info)


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.tconf = {**DEFAULTS, **{k: str(v) for k, v in (conf or {}).items()}}
        c = self.tconf
        self.serving = sys.modules.get("monailabel.app")  # None in the train subprocess and the CLI
        self.expose = bool(strtobool(c["expose"]))
        self.cors_origins = safety.check_origins(
            [*safety.parse_list(c["cors_origins"]), *[str(o) for o in settings.MONAI_LABEL_CORS_ORIGINS or []]])
        self.allowed_hosts = safety.parse_list(c["allowed_hosts"])
        self.allow_model_upload = bool(strtobool(c["allow_model_upload"]))
        if self.allow_model_upload and not settings.MONAI_LABEL_AUTH_ENABLE:
            raise MONAILabelException("APP_INIT_ERROR", "--conf allow_model_upload true needs authentication "
                                      "(MONAI_LABEL_AUTH_ENABLE=true): without it anyone who reaches the port could "
                                      "replace the model")
        if self.serving is not None:
            # the address monailabel's own argparse gives uvicorn (the last --host / -i); other launchers: the
            # BrowserGuard middleware refuses connections that do not arrive on loopback
            host = safety.bound_host(sys.argv)
            warning = safety.check_bind(host, self.expose, settings.MONAI_LABEL_AUTH_ENABLE) if host else None
            if warning:
                logger.warning(warning)
        self.max_pixels = int(c["max_image_pixels"])
        self.uploads: safety.UploadFolder | None = None
        self.model_dir = c.get("model_dir") or os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        names = [m.strip() for m in c["models"].split(",") if m.strip()]
        names = list(MODELS_2D) if names == ["all"] else names
        if MODEL_3D in names and not c["nnunet_model_folder"]:
            raise MONAILabelException("APP_INIT_ERROR", f"--conf models: {NEEDS_FOLDER}")
        names = [m for m in names if m != MODEL_3D]
        bad = [m for m in names if m not in MODELS_2D]
        if bad:
            raise MONAILabelException("APP_INIT_ERROR", f"--conf models: unknown model(s) {', '.join(bad)}. Available: "
                                                        f"{', '.join(MODELS_2D)}, and {MODEL_3D} ({NEEDS_FOLDER})")
        self.model_names = names  # the 2D models: each has an infer and a train task
        self.fold3d: nnunet3d.NnUNetFold | None = None
        if c["nnunet_model_folder"]:
            try:
                self.fold3d = nnunet3d.NnUNetFold(
                    c["nnunet_model_folder"], c["nnunet_folds"], checkpoint_name=c["nnunet_checkpoint"],
                    use_mirroring=bool(strtobool(c["nnunet_tta"])), device=_device(c.get("nnunet_device", "cuda")),
                    allow_pickle=bool(strtobool(c["allow_pickle"])))
            except nnunet3d.NnUNetFoldError as e:
                raise MONAILabelException("APP_INIT_ERROR", f"--conf nnunet_model_folder: {e}") from None
        self.seg_cfg = seg2d.Seg2DConfig(
            labels=seg2d.parse_labels(c["labels"]), size=c["vit_size"], img_size=int(c["img_size"]),
            in_chans=int(c["in_chans"]), backbone_ckpt=c["backbone_ckpt"], allow_pickle=bool(strtobool(c["allow_pickle"])),
            peft_method=c["peft"], peft_config=json.loads(c["peft_config"]), vit_overrides=json.loads(c["vit_overrides"]),
        )
        self.allow_untrained = bool(strtobool(c["allow_untrained"]))
        for m in names:
            path = self.model_path(m)
            if not os.path.isfile(path) and self.allow_untrained:
                # asked for: an untrained start (zero-init PEFT, random decoder) served before the first /train
                seg2d.save_model(path, seg2d.build_model(self.seg_cfg), self.seg_cfg, meta={"trained": False, "version": 0})
        state = self.serving.app.state if self.serving is not None else None
        self.sys_tmp = getattr(state, "tpp_label_sys_tmp", None) or tempfile.gettempdir()
        if state is not None:  # one upload folder per server process, also across POST /reload
            self.uploads = getattr(state, "tpp_label_uploads", None)
            if self.uploads is None:
                self.uploads = state.tpp_label_uploads = safety.UploadFolder()
                state.tpp_label_sys_tmp = self.sys_tmp
                tempfile.tempdir = self.uploads.path  # monailabel's uploads and results land in the swept folder
                atexit.register(self.uploads.remove)
        self.log_dir = os.path.join(app_dir, "logs")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="tpp_label",
                         description="tpp-monai: ViT + PEFT segmentation with Target Parameter Pre-training",
                         version="0.1.0",
                         labels=self.seg_cfg.labels if names or self.fold3d is None else self.fold3d.labels)
        if state is not None and not getattr(state, "tpp_label_hardened", False):
            _harden(self.serving.app, self.uploads, float(c["max_upload_mb"]), self)
            _stop_training_with_server()
            state.tpp_label_hardened = True

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return SafeDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                             auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                             read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY, max_pixels=self.max_pixels,
                             max_voxels=int(self.tconf["max_volume_voxels"]), volumes=self.fold3d is not None,
                             num_classes=self.seg_cfg.num_classes if self.model_names else None)

    def _load_sessions(self, load=False):
        return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY) if load else None

    def upload_roots(self) -> tuple:
        """Where client-uploaded files live: this process's upload folder and the session store (3D Slicer
        uploads a local volume as a session)."""
        sessions = getattr(self, "_sessions", None)
        return tuple(r for r in (self.uploads and self.uploads.path, sessions and sessions.store_path) if r)

    def roots(self) -> tuple:
        """Server folders that must not appear in a client message."""
        return tuple(r for r in (self.app_dir, self.studies, self.model_dir, self.uploads and self.uploads.path,
                                 self.sys_tmp, os.path.expanduser("~")) if r)

    def client_message(self, text: str) -> str:
        return safety.redact(text, self.roots())

    def model_path(self, name: str) -> str:
        return os.path.join(self.model_dir, f"{name}.pt")

    def init_infers(self):
        roots = lambda: (self.studies, *self.upload_roots())  # noqa: E731 - sessions load after the infer tasks
        infers: Dict[str, Any] = {m: TPPSegInfer(m, self.model_path(m), self.seg_cfg.labels,
                               f"ViT-{self.seg_cfg.size} + {self.seg_cfg.peft_method} 2D segmentation (tpp-monai)",
                               roots=roots, max_pixels=self.max_pixels, allow_untrained=self.allow_untrained)
                for m in self.model_names}
        if self.fold3d is not None:
            infers[MODEL_3D] = STUNet3DInfer(MODEL_3D, self.fold3d, roots=roots,
                                             max_voxels=int(self.tconf["max_volume_voxels"]))
        return infers

    def init_trainers(self):
        return {m: TPPSegTrain(m, self.model_path(m), self.seg_cfg, self.tconf, log_dir=self.log_dir)
                for m in self.model_names}

    def init_strategies(self):
        return {"first": First(), "random": Random()}

    def next_sample(self, request):
        strategy = request.get("strategy")
        if strategy not in self._strategies:
            raise safety.RequestError(f"no active-learning strategy {str(strategy)[:80]!r}; available: "
                                      f"{', '.join(self._strategies)}", status=404)
        res = super().next_sample(request)
        res.pop("path", None)  # clients get the id (GET /datastore/image?image=<id>), not a server path
        return res

    def _known(self, model) -> None:
        if model is not None and model not in self._infers and model not in self._trainers:
            hint = NEEDS_FOLDER if model == MODEL_3D else f"no model '{model}'"
            raise HTTPException(status_code=404, detail=f"{hint}; available models: {', '.join(self._infers)}")

    def _known_trainer(self, model) -> None:
        self._known(model)
        if model is not None and model not in self._trainers:
            raise HTTPException(status_code=404, detail=f"model '{model}' has no train task here (the 3D model is "
                                                        f"trained with nnU-Net); trainers: {', '.join(self._trainers)}")

    def bundle_path(self, model):
        # AsyncTask.run asks this before starting a background /train: reject unknown models with a 404 there
        self._known_trainer(model)
        return super().bundle_path(model)

    def _image_for_infer(self, image: Any, datastore: Datastore) -> str:
        """An uploaded file in this server's upload folder, or a datastore id: never a path the client names."""
        if isinstance(image, str) and any(safety.inside(image, r) for r in self.upload_roots()) \
                and os.path.isfile(image):
            return image
        try:
            uri = datastore.get_image_uri(safety.check_name(image, "image id"))
        except safety.RequestError:
            raise safety.RequestError(NOT_A_DATASTORE_IMAGE) from None
        if not uri:
            raise safety.RequestError(NOT_A_DATASTORE_IMAGE, status=404)
        return image

    def infer_wsi(self, request, datastore=None):
        # monailabel's /infer/wsi probes the named path (exists? a slide?) before calling infer: check it first
        return self.infer(request, datastore, wsi=True)

    def _label_for_infer(self, label: Any) -> None:
        """A ``label`` (scribbles, a prior mask) must be the file uploaded with this request: a path given in
        ``params`` would be opened by the pre-transforms (and the answer would say whether it exists)."""
        if label is None:
            return
        if not (isinstance(label, str) and any(safety.inside(label, r) for r in self.upload_roots())
                and os.path.isfile(label)):
            raise safety.RequestError(NOT_AN_UPLOADED_LABEL)

    def infer(self, request, datastore=None, wsi: bool = False):
        self._known(request.get("model"))
        try:
            self._label_for_infer(request.get("label"))
            request = {**request, "image": self._image_for_infer(request.get("image"), datastore or self.datastore())}
            return super().infer_wsi(request, datastore) if wsi else super().infer(request, datastore)
        except HTTPException:
            raise
        except safety.RequestError as e:
            raise HTTPException(status_code=e.status, detail=self.client_message(str(e))) from e
        except seg2d.ImageTooLarge as e:
            raise HTTPException(status_code=413, detail=self.client_message(
                f"image too large: {e} (server limit: --conf max_image_pixels)")) from e
        except seg2d.ImageReadError as e:
            raise HTTPException(status_code=400, detail=self.client_message(f"bad image: {e}")) from e
        except MONAILabelException as e:
            raise HTTPException(status_code=400, detail=self.client_message(f"{e.error}: {e.msg}")) from e
        except Exception as e:  # noqa: BLE001 - the traceback stays in the log, the server keeps serving
            logger.exception("infer failed")
            raise HTTPException(status_code=500, detail=f"inference failed ({type(e).__name__}); "
                                                         "the traceback is in the server log") from e

    def train(self, request):
        self._known_trainer(request.get("model"))
        return super().train(request)


# ------------------------------------------------------------------------ server hardening (issue 16)
def _json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _app() -> MyApp:
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()  # the current instance (POST /reload replaces it)


def _session_view(info: Any) -> Any:
    """A session record without server paths (``path`` / ``image`` name files in the server's session store)."""
    if not isinstance(info, dict):
        return info
    out = {k: v for k, v in info.items() if k not in ("path", "image")}
    if info.get("image"):
        out["image"] = os.path.basename(str(info["image"]))
    return out


def _cors(fastapi_app, origins: list) -> None:
    """monailabel allows every origin with credentials (``*`` reflected): keep CORS only for the listed ones."""
    mw = [m for m in fastapi_app.user_middleware if m.cls is not CORSMiddleware]
    if origins:
        mw.append(Middleware(CORSMiddleware, allow_origins=list(origins), allow_credentials=True,
                             allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["*"]))
    fastapi_app.user_middleware[:] = mw


def _harden(fastapi_app, uploads: safety.UploadFolder, max_upload_mb: float, app: "MyApp") -> None:
    """Wire the request checks into monailabel's FastAPI app: error handlers, body cap + temp sweep, browser
    guard (Origin / Host / loopback), CORS allow-list, and our train / model / session / logs / proxy routes.

    monailabel builds its app before ours exists; the handlers and middleware are added here and the
    middleware stack is rebuilt on the next request (nothing has been served yet: this runs at start-up).
    """
    from monailabel.endpoints import logs as logs_ep
    from monailabel.endpoints import session as session_ep
    from monailabel.endpoints import train as train_ep

    def msg(text: str) -> str:
        return _app().client_message(text)

    def http_error(request, e):
        status, detail = e.status_code, e.detail
        if status == 500 and str(detail) in CLIENT_ERRORS_500:
            status, detail = 400, CLIENT_ERRORS_500[str(detail)]
        return JSONResponse({"detail": msg(str(detail)) if isinstance(detail, str) else detail}, status_code=status,
                            headers=getattr(e, "headers", None))

    def unexpected(request, e):
        if safety.is_disk_full(e):
            return _json_error(507, safety.disk_full_message(f"{request.method} {request.url.path}"))
        return _json_error(500, f"internal server error ({type(e).__name__}); the traceback is in the server log")

    fastapi_app.add_exception_handler(safety.RequestError, lambda r, e: _json_error(e.status, msg(str(e))))
    fastapi_app.add_exception_handler(json.JSONDecodeError, lambda r, e: _json_error(
        400, f"a JSON form field (params / info) is not valid JSON: {e.msg} at character {e.pos}"))
    for exc in (ImageNotFoundException, LabelNotFoundException):
        fastapi_app.add_exception_handler(exc, lambda r, e: _json_error(404, msg(str(e.msg))))
    fastapi_app.add_exception_handler(StarletteHTTPException, http_error)
    fastapi_app.add_exception_handler(MONAILabelException, lambda r, e: _json_error(400, msg(f"{getattr(e.error, 'value', e.error)}: {e.msg}")))
    fastapi_app.add_exception_handler(Exception, unexpected)
    _cors(fastapi_app, app.cors_origins)
    fastapi_app.user_middleware.insert(0, Middleware(safety.RequestGuard, folder=uploads,
                                                     max_body_bytes=int(max_upload_mb * 2**20)))
    fastapi_app.user_middleware.insert(0, Middleware(safety.BrowserGuard, allowed_origins=app.cors_origins,
                                                     allowed_hosts=app.allowed_hosts, expose=app.expose))
    fastapi_app.middleware_stack = None

    router = APIRouter()
    pretexts = PRETEXT_TASKS.names()

    @router.post("/train/{model}", summary="Run Training Task for specific model (parameters checked first)")
    async def train_model(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                          enqueue: Optional[bool] = False,
                          user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        _app()._known_trainer(model)
        safety.validate_train_params(params, pretexts)
        res = train_ep.run_model(model, params, run_sync, enqueue)
        return res if run_sync else safety.client_task_view(res, _app().roots())

    @router.post("/train/", include_in_schema=False)
    async def train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        for m in _app().model_names:
            safety.validate_train_params((params or {}).get(m), pretexts)
        return train_ep.run(params, run_sync)

    @router.get("/train/", summary="Status of the training task (no tracebacks or server paths)")
    async def train_status(all: bool = False, check_if_running: bool = False,
                           user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        res = train_ep.status(all, check_if_running)
        roots = _app().roots()
        return [safety.client_task_view(t, roots) for t in res] if isinstance(res, list) else \
            safety.client_task_view(res, roots)

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        @router.get("/logs/", include_in_schema=False)
        async def no_logs():  # the server log holds tracebacks and paths: only for authenticated admins
            raise safety.RequestError("the server log is not served without authentication "
                                      "(MONAI_LABEL_AUTH_ENABLE=true, admin role); read <app>/logs/app.log on the server",
                                      status=403)

    @router.get("/logs/gpu", include_in_schema=False)
    async def gpu_info(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        if not settings.MONAI_LABEL_AUTH_ENABLE:
            raise safety.RequestError("GPU details are not served without authentication "
                                      "(MONAI_LABEL_AUTH_ENABLE=true, admin role); run nvidia-smi on the server", status=403)
        if shutil.which("nvidia-smi") is None:
            raise safety.RequestError("nvidia-smi is not installed on the server (no NVIDIA driver): no GPU details",
                                      status=404)
        return await logs_ep.gpu_info(user)

    if not str(settings.MONAI_LABEL_STUDIES).startswith(("http://", "https://")):
        @router.api_route("/proxy/dicom/{path:path}", methods=["GET", "POST"], include_in_schema=False)
        async def no_dicomweb(path: str):  # monailabel would send the request to the local folder's path
            raise safety.RequestError("this server's datastore is a local folder: there is no DICOMweb server to "
                                      "proxy (start the server with --studies http(s)://<dicomweb-server>)", status=404)

    @router.put("/model/{model}", summary="Upload a model file (off by default; needs authentication)")
    async def upload_model(model: str, file: UploadFile,
                           user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        a = _app()
        a._known_trainer(model)
        if not a.allow_model_upload:
            raise safety.RequestError("model upload is off: the model is replaced only by training here (POST /train/"
                                      f"{model}); to allow uploads, enable authentication and start the server with "
                                      "--conf allow_model_upload true", status=403)
        tmp = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name  # in the swept upload folder
        try:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(file.file, f)
            meta = seg2d.install_model_file(tmp, a.model_path(model), a.seg_cfg)
        except CheckpointMismatch as e:
            raise safety.RequestError(f"model upload refused, the model is unchanged: {e}", status=422) from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return {"model": model, "version": meta.get("version"), "trained": bool(meta.get("trained"))}

    @router.delete("/model/{model}", summary="Delete the model file (off by default; needs authentication)")
    async def delete_model(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        a = _app()
        a._known_trainer(model)
        if not a.allow_model_upload:
            raise safety.RequestError("model deletion is off (it goes with --conf allow_model_upload true and "
                                      "authentication)", status=403)
        from monailabel.endpoints import model as model_ep

        return model_ep.delete_model(model)

    @router.put("/session/", summary="Create a session with an image (answer without server paths)")
    async def create_session(background_tasks: BackgroundTasks, uncompress: bool = False, expiry: int = 0,
                             files: List[UploadFile] = File(...),
                             user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        res = session_ep.create_session(background_tasks, uncompress, expiry, files)
        return {**res, "session_info": _session_view(res.get("session_info"))}

    @router.get("/session/{session_id}", summary="Session details (without server paths)")
    async def get_session(session_id: str, update_ts: bool = False, image: bool = False,
                          user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        res = session_ep.get_session(safety.check_name(session_id, "session id"), update_ts, image)
        return res if image else _session_view(res)

    @router.delete("/session/{session_id}", summary="Delete a session (answer without server paths)")
    async def remove_session(session_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        return _session_view(session_ep.remove_session(safety.check_name(session_id, "session id")))

    n = len(fastapi_app.router.routes)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    ours = fastapi_app.router.routes[n:]
    del fastapi_app.router.routes[n:]
    fastapi_app.router.routes[:0] = ours  # matched before monailabel's own /train routes
