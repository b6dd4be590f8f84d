"""MONAI Label app serving and training tpp-monai bundles (TPP + PEFT), plus an nnU-Net-trained 3D model.

    python -m tpp_monai.label.serve --studies <dir> --conf bundles bundles/demo_ct_adapter_tpp   # on 127.0.0.1
    monailabel start_server --app apps/tpp_label --host 127.0.0.1 --studies <dir> --conf bundles ...

Laid out as MONAI Label's sample apps (``lib/infers``, ``lib/trainers``); each bundle folder in ``--conf bundles``
(comma-separated; relative to the current folder or to the tpp-monai checkout) is one model named after it:
infer task ``lib.infers.BundleSegInfer`` (MONAI Label's ``BundleInferTask`` on the bundle's ``inference.json``
and ``models/model.pt``, reloaded when the file changes; /infer refuses with 409 until the file exists), train
task ``lib.trainers.BundleTPPTrain`` (MONAI Label's ``BundleTrainTask``: the bundle's ``tpp_pretrain.json`` on
every datastore image, then its ``train.json`` on the labelled ones with a validation split; ``train_stats``).
Infer task ``stunet3d`` (only with ``--conf nnunet_model_folder``): nnU-Net's own predictor on a NIfTI volume.
Strategies ``first`` and ``random``. The app has no model format, preprocessing or training loop of its own.

``--conf`` keys (all optional; defaults in ``DEFAULTS``): bundles, tpp, pretext, tpp_epochs, epochs, batch_size,
lr, val_split (the train task's defaults; empty = the bundle's), allow_pickle, nnunet_model_folder,
nnunet_folds, nnunet_checkpoint, nnunet_tta, nnunet_device, expose, cors_origins, allowed_hosts,
allow_model_upload, max_image_pixels, max_volume_voxels, max_upload_mb.
The request checks (plain-name ids and tags, datastore-only images, train parameters, size caps, temp-file
sweeping, client-safe errors, browser guard) are in :mod:`tpp_monai.label.safety` and wired here. The server
refuses to listen beyond loopback unless ``--conf expose true`` (see README: enable authentication first),
answers no other web origin unless listed (``--conf cors_origins``), checks ``Host`` (DNS rebinding), refuses
model uploads unless ``--conf allow_model_upload true`` with authentication, and stops its training with it.
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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from fastapi import APIRouter, BackgroundTasks, Depends, File, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool
from monailabel.utils.sessions import Sessions
from filelock import FileLock
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from lib.infers import BundleSegInfer, STUNet3DInfer, untrained_message
from lib.infers.bundle_seg import NOT_A_DATASTORE_IMAGE, ModelFileRefused, install_model_file
from lib.trainers import BundleTPPTrain
from lib.trainers.bundle_tpp import SERVER_PID_ENV

from tpp_monai.safe_io import atomic_write
from tpp_monai.data.transforms import ImageFileError
from tpp_monai.label import images, nnunet3d, safety
from tpp_monai.pretext import PRETEXT_TASKS

logger = logging.getLogger(__name__)

#: the 3D task: an nnU-Net-trained STU-Net (+ Conv-Adapter) fold, served when --conf nnunet_model_folder is set
MODEL_3D = "stunet3d"
NEEDS_FOLDER = (f"model '{MODEL_3D}' is served only with --conf nnunet_model_folder "
                "<nnUNet_results>/DatasetXXX/<Trainer>__<Plans>__3d_fullres (a trained fold)")
#: where bundle folders named by a relative path are looked for after the current folder: the checkout
REPO = Path(__import__("tpp_monai").__file__).resolve().parents[1]

DEFAULTS: Dict[str, str] = {
    "bundles": "bundles/demo_ct_adapter_tpp",
    "tpp": "true",
    "pretext": "",
    "tpp_epochs": "",
    "epochs": "20",
    "batch_size": "",
    "lr": "",
    "val_split": "0.2",
    "allow_pickle": "false",
    "nnunet_model_folder": "",
    "nnunet_folds": "0",
    "nnunet_checkpoint": "checkpoint_final.pth",
    "nnunet_tta": "true",
    "nnunet_device": "cuda",
    "max_volume_voxels": str(nnunet3d.MAX_VOLUME_VOXELS),
    "expose": "false",
    "cors_origins": "",
    "allowed_hosts": "",
    "allow_model_upload": "false",
    "max_image_pixels": str(images.MAX_IMAGE_PIXELS),
    "max_upload_mb": "256",
}
#: free space an upload must leave on the datastore's disk (the datastore JSON is rewritten after it)
UPLOAD_HEADROOM = 1 << 20
NOT_AN_UPLOADED_LABEL = ("label must be a file uploaded with the request (form field 'label'); "
                         "server paths are not accepted")
#: monailabel's own HTTP 500 answers that are the client's mistake (answered 400 with what to send)
CLIENT_ERRORS_500 = {
    "Neither Image nor File not Session ID input is provided":
        "no input: send ?image=<datastore image id>, an uploaded file (form field 'file') or ?session_id=<id>",
    "DICOM SEG format is not supported in a non-DICOM datastore":
        "output=dicom_seg needs a DICOMweb datastore; this server's datastore is a local folder (use output=image)",
}


def _device(requested: Any) -> str:
    if isinstance(requested, (list, tuple)):
        requested = requested[0] if requested else "cpu"
    requested = str(requested or "cpu")
    return requested if requested.startswith("cuda") and torch.cuda.is_available() else "cpu"


def bundle_labels(bundle: str) -> Dict[str, int]:
    """Foreground classes of a bundle (name -> index), from its metadata's output ``channel_def`` as
    ``BundleInferTask`` reads them (lower-cased, background left out)."""
    with open(os.path.join(bundle, "configs", "metadata.json")) as f:
        meta = json.load(f)
    pred = next(iter(meta["network_data_format"]["outputs"].values()))
    return {str(v).lower(): int(k) for k, v in pred.get("channel_def", {}).items() if str(v).lower() != "background"}


def find_bundle(spec: str) -> str:
    """A bundle folder (holding configs/inference.json, train.json, tpp_pretrain.json, metadata.json) by path,
    relative to the current folder or the tpp-monai checkout; a clear error otherwise."""
    for base in (Path.cwd(), REPO):
        p = (base / spec).resolve()
        if (p / "configs" / "metadata.json").is_file():
            missing = [n for n in ("inference.json", "train.json", "tpp_pretrain.json") if not (p / "configs" / n).is_file()]
            if missing:
                raise MONAILabelException("APP_INIT_ERROR", f"--conf bundles: {p} has no configs/{', '.join(missing)}: "
                                                            "the label app serves 2D tpp-monai segmentation bundles")
            return str(p)
    raise MONAILabelException("APP_INIT_ERROR", f"--conf bundles: no bundle folder {spec!r} (looked in {Path.cwd()} and "
                                                f"{REPO}); give the folder that holds configs/metadata.json, "
                                                "e.g. bundles/demo_ct_adapter_tpp")


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
            arr, _ = images.read_image_2d(filename, max_pixels=self.max_pixels)
            if label_of is not None and self.num_classes:
                try:
                    images.check_label_classes(arr, self.num_classes)
                except images.ImageReadError as e:
                    raise safety.RequestError(f"{what} for image {label_of!r}: {e}") from None
        except images.ImageTooLarge as e:
            raise safety.RequestError(f"{what}: {e} (server limit: --conf max_image_pixels)", status=413) from e
        except images.ImageReadError as e:
            if not self.volumes:
                raise safety.RequestError(f"{what}: {e}") from e
            try:
                nnunet3d.check_volume(filename, self.max_voxels)
            except images.ImageTooLarge as e3:
                raise safety.RequestError(f"{what}: {e3} (server limit: --conf max_volume_voxels)", status=413) from e3
            except images.ImageReadError as e3:
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
        specs = [m.strip() for m in c["bundles"].split(",") if m.strip() and m.strip().lower() != "none"]
        self.bundles: Dict[str, str] = {}  # model name (the bundle folder's name) -> bundle folder
        for spec in specs:
            path = find_bundle(spec)
            self.bundles[os.path.basename(path)] = path
        if MODEL_3D in self.bundles:
            raise MONAILabelException("APP_INIT_ERROR", f"--conf bundles: '{MODEL_3D}' is the 3D task's name")
        self.model_names = list(self.bundles)  # the 2D models: each has an infer and a train task
        self.fold3d: nnunet3d.NnUNetFold | None = None
        if c["nnunet_model_folder"]:
            try:
                self.fold3d = nnunet3d.NnUNetFold(
                    c["nnunet_model_folder"], c["nnunet_folds"], checkpoint_name=c["nnunet_checkpoint"],
                    use_mirroring=bool(strtobool(c["nnunet_tta"])), device=_device(c.get("nnunet_device", "cuda")),
                    allow_pickle=bool(strtobool(c["allow_pickle"])))
            except nnunet3d.NnUNetFoldError as e:
                raise MONAILabelException("APP_INIT_ERROR", f"--conf nnunet_model_folder: {e}") from None
        self.bundle_labels = {m: bundle_labels(p) for m, p in self.bundles.items()}
        labels: Dict[str, int] = {}
        for lab in self.bundle_labels.values():
            labels.update({k: v for k, v in lab.items() if k not in labels})
        if not labels and self.fold3d is not None:
            labels = self.fold3d.labels
        self.num_classes = max([0, *[len(v) + 1 for v in self.bundle_labels.values()]]) or None
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
                         description="tpp-monai bundles: PEFT segmentation with Target Parameter Pre-training",
                         version="0.2.0", labels=labels)
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
                             num_classes=self.num_classes)

    def _load_sessions(self, load=False):
        return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY) if load else None

    def upload_roots(self) -> tuple:
        """Where client-uploaded files live: this process's upload folder and the session store (3D Slicer
        uploads a local volume as a session)."""
        sessions = getattr(self, "_sessions", None)
        return tuple(r for r in (self.uploads and self.uploads.path, sessions and sessions.store_path) if r)

    def roots(self) -> tuple:
        """Server folders that must not appear in a client message."""
        return tuple(r for r in (self.app_dir, self.studies, *self.bundles.values(), self.uploads and self.uploads.path,
                                 self.sys_tmp, os.path.expanduser("~")) if r)

    def client_message(self, text: str) -> str:
        return safety.redact(text, self.roots())

    def model_path(self, name: str) -> str:
        """The bundle's ``models/model.pt``: what its train.json writes and its inference.json loads."""
        return os.path.join(self.bundles[name], "models", "model.pt")

    def _infer_roots(self) -> tuple:
        return (self.studies, *self.upload_roots())  # sessions load after the infer tasks

    def _bundle_infer(self, name: str) -> BundleSegInfer | None:
        """MONAI Label's BundleInferTask needs the bundle's model file: built once it exists (after the first
        training, or a ``monai.bundle run`` elsewhere), without a restart."""
        task = self._infers.get(name) if hasattr(self, "_infers") else None
        if task is None and os.path.isfile(self.model_path(name)):
            task = BundleSegInfer(name, self.bundles[name], self.tconf, roots=self._infer_roots,
                                  max_pixels=self.max_pixels)
            if task.is_valid():
                self._infers[name] = task
        return task

    def init_infers(self):
        infers: Dict[str, Any] = {}
        for m in self.model_names:
            if os.path.isfile(self.model_path(m)):
                infers[m] = BundleSegInfer(m, self.bundles[m], self.tconf, roots=self._infer_roots,
                                           max_pixels=self.max_pixels)
        if self.fold3d is not None:
            infers[MODEL_3D] = STUNet3DInfer(MODEL_3D, self.fold3d, roots=self._infer_roots,
                                             max_voxels=int(self.tconf["max_volume_voxels"]))
        return infers

    def init_trainers(self):
        return {m: BundleTPPTrain(m, p, self.tconf, log_dir=self.log_dir) for m, p in self.bundles.items()}

    def info(self):
        for m in self.model_names:
            self._bundle_infer(m)  # a model trained since the last call is listed now
        return super().info()

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
            model = request.get("model")
            if model in self.bundles and self._bundle_infer(model) is None:
                raise safety.RequestError(untrained_message(model), status=409)
            self._label_for_infer(request.get("label"))
            request = {**request, "image": self._image_for_infer(request.get("image"), datastore or self.datastore())}
            return super().infer_wsi(request, datastore) if wsi else super().infer(request, datastore)
        except HTTPException:
            raise
        except safety.RequestError as e:
            raise HTTPException(status_code=e.status, detail=self.client_message(str(e))) from e
        except images.ImageTooLarge as e:
            raise HTTPException(status_code=413, detail=self.client_message(
                f"image too large: {e} (server limit: --conf max_image_pixels)")) from e
        except (images.ImageReadError, ImageFileError) as e:
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
            mtime = install_model_file(tmp, a.bundles[model])
        except ModelFileRefused as e:
            raise safety.RequestError(f"model upload refused, the model is unchanged: {e}", status=422) from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return {"model": model, "model_mtime_ns": mtime, "trained": True}

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
