"""TPP + fine-tuning of a tpp-monai bundle, run by MONAI Label's own ``BundleTrainTask``.

One /train run is two ``monai.bundle.run`` calls on the bundle folder, as a user would type them:
``tpp_pretrain.json`` (merged over ``train.json``) on **every** datastore image, labelled or not, then
``train.json`` on the images with a ``final`` label, split by ``val_split`` into training and validation
(MONAI Label's ``_partition_datalist``). The bundle's own recipe runs unchanged: its transforms, network,
optimiser, schedule, checks and its key-metric saver, which writes ``models/model.pt`` atomically at each
best validation epoch (what the infer task serves). Overrides are only the run's data and lengths (the
datastore lists, ``tpp_epochs``, ``train#max_epochs``, ``batch_size``, ``lr``, ``pretext``), validation every
epoch, a fresh run (``resume`` false: new labels are new data) and progress handlers writing ``train_stats``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Dict

import monai.bundle
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask
from monailabel.tasks.train.handler import prepare_stats

from tpp_monai.safe_io import atomic_write
from tpp_monai.label import images, safety
from tpp_monai.label.progress import FineTuneStats, StageProgress
from tpp_monai.pretext import PRETEXT_TASKS

logger = logging.getLogger(__name__)

#: environment variable naming the server's pid for its train subprocess (which exits when the server is gone)
SERVER_PID_ENV = "TPP_LABEL_SERVER_PID"
#: keys monailabel itself adds to a train request (not the client's)
SERVER_TRAIN_KEYS = ("model", "bundle_path", "gpus", "local_rank", "multi_gpu")
TPP_CONFIG = "tpp_pretrain.json"


class TPPBundleConstants(BundleConstants):
    """The bundles' epoch count is ``train#max_epochs`` (the lr schedule's length reads it too)."""

    def key_train_trainer_max_epochs(self) -> str:
        return "train#max_epochs"


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON through a temporary file + rename: a reader (GET /info) never sees half a file."""
    atomic_write(path, json.dumps(obj, indent=2, default=str))


def _device(requested: Any) -> str:
    import torch

    if isinstance(requested, (list, tuple)):
        requested = requested[0] if requested else "cpu"
    requested = str(requested or "cpu")
    return requested if requested.startswith("cuda") and torch.cuda.is_available() else "cpu"


class BundleTPPTrain(BundleTrainTask):
    """``BundleTrainTask`` on ``bundle_path`` with the bundle's TPP stage first; ``defaults``: the app's
    ``--conf`` values for ``tpp`` / ``tpp_epochs`` / ``epochs`` / ``val_split`` (else the bundle's own)."""

    def __init__(self, name: str, bundle_path: str, conf: Dict[str, str], log_dir: str = "") -> None:
        super().__init__(bundle_path, conf, const=TPPBundleConstants())
        self.name, self.log_dir = name, log_dir or os.path.join(bundle_path, "logs")
        self.stats_path = os.path.join(bundle_path, "logs", "train_stats.json")
        with open(os.path.join(bundle_path, "configs", TPP_CONFIG)) as f:
            self.tpp_config = json.load(f)
        self.num_classes = int(self.bundle_config.get_parsed_content("num_classes"))
        self._server_pid: int | None = None  # set in the train subprocess: the server that started it
        self._run: Dict[str, Any] = {}

    # ---------------------------------------------------------------- what a client sees and may set
    def config(self) -> Dict[str, Any]:
        """The keys safety.validate_train_params takes (3D Slicer sends these back with /train)."""
        import torch

        c, b = self.conf, self.bundle_config
        return {"tpp": str(c.get("tpp", "true")).lower() in ("1", "true", "yes", "on"),
                "pretext": c.get("pretext") or self.tpp_config.get("pretext", "mae"),
                "tpp_epochs": int(c.get("tpp_epochs") or self.tpp_config.get("tpp_epochs", 1)),
                "epochs": int(c.get("epochs") or 20), "batch_size": int(c.get("batch_size") or b["batch_size"]),
                "lr": float(c.get("lr") or b["lr"]), "val_split": float(c.get("val_split") or 0.2),
                "device": ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]}

    def stats(self) -> Dict[str, Any]:
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    # ---------------------------------------------------------------- BundleTrainTask hooks
    def _fetch_datalist(self, request, datastore: Datastore):
        ds = super()._fetch_datalist(request, datastore)
        if not ds:
            raise ValueError("no labelled images in the datastore: save at least one label before training")
        images.check_labelled([(d["image"], d["label"]) for d in ds], self.num_classes)  # before TPP
        return ds

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle)
        if not train:  # one labelled image: train on it rather than on nothing
            train, val = list(datalist), []
        self._run.update(num_train=len(train), num_val=len(val or []))
        self._say(f"{len(train)} labelled image(s) for training, {len(val or [])} for validation "
                  f"(val_split {request.get('val_split')})")
        # the bundle publishes models/model.pt at its best validation epoch: without a held-out image the
        # training images are validated (the best epoch on them is published)
        return train, (val or list(train))

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        """No earlier model.pt is loaded: fine-tuning starts from this run's TPP target parameters
        (monailabel 0.8.5's own version also fails on ``pretrained`` false: ``os.path.exists(None)``)."""

    def _update_overrides(self, overrides):
        r = self._run
        overrides.update({
            "lr": r["lr"], "batch_size": r["batch_size"], "val_interval": 1, "resume": False,
            "train_cache": "memory",  # a disk cache keyed by path would keep a relabelled image's old mask
            "train#handlers": [*overrides.get("train#handlers", []),
                               {"_target_": f"{FineTuneStats.__module__}.FineTuneStats", "write": self._ft_stats,
                                "evaluator": "@validate#evaluator"}],
        })
        if not r["tpp"]:
            overrides["tpp_ckpt"] = ""  # fine-tuning without TPP (the target parameters' own init)
        return overrides

    def run_single_gpu(self, request, overrides):
        r = self._run
        if r["tpp"]:
            progress = StageProgress(lambda st: atomic_write_json(self.stats_path, st), r["tpp_epochs"],
                                     r["tpp_epochs"] + r["max_epochs"], start_ts=r["start_ts"])
            progress.write(progress.stats(0))  # replaces the previous run's (finished) stats at once
            handlers = self.tpp_config.get("tpp", {}).get("handlers", [])
            self._say(f"TPP ({r['pretext']}) on {len(r['tpp_images'])} images, {r['tpp_epochs']} epoch(s)")
            monai.bundle.run(
                run_id="run", meta_file=self.bundle_metadata_path,
                config_file=[self.bundle_config_path, os.path.join(self.bundle_path, "configs", TPP_CONFIG)],
                **{k: overrides[k] for k in ("bundle_root", "device")},
                **{"tpp#dataset#data": [{"image": p, "label": 0} for p in r["tpp_images"]],
                   "tpp_epochs": r["tpp_epochs"], "pretext": r["pretext"], "resume": False, "tpp_cache": "memory",
                   "tpp#handlers": [*handlers, progress]})
        self._say(f"fine-tuning: {r['max_epochs']} epoch(s), lr {r['lr']}, batch {r['batch_size']}")
        super().run_single_gpu(request, overrides)

    # ---------------------------------------------------------------- train_stats
    def _ft_stats(self, trainer, evaluator) -> None:
        """MONAI Label's fine-tuning stats (``prepare_stats``) with ``epoch`` / ``total_epochs`` counted over the
        whole run (TPP + fine-tuning, as during TPP); fine-tuning's own count in ``stage_epoch(s)``."""
        r = self._run
        n_tpp = r["tpp_epochs"] if r["tpp"] else 0
        stats = json.loads(json.dumps(prepare_stats(r["start_ts"], trainer, evaluator), default=float))
        ep, total = int(stats.get("epoch", 0)), int(trainer.state.max_epochs)
        atomic_write_json(self.stats_path, {**stats, "stage": "finetune", "stage_epoch": ep, "stage_epochs": total,
                                            "tpp_epochs_done": n_tpp, "epoch": n_tpp + ep, "total_epochs": n_tpp + total})

    # ---------------------------------------------------------------- the run
    @staticmethod
    def _say(message: str) -> None:
        logger.info(safety.CLIENT_MARK + message)

    def _request(self, request) -> Dict[str, Any]:
        client = {k: v for k, v in request.items() if v is not None}
        ignore = (*SERVER_TRAIN_KEYS, *[k for k, v in client.items() if isinstance(v, dict)])  # POST /train/ nests
        r = {**self.config(), **safety.validate_train_params(client, PRETEXT_TASKS.names(), ignore=ignore)}
        return {"tpp": bool(r["tpp"]) and int(r["tpp_epochs"]) > 0, "pretext": r["pretext"],
                "tpp_epochs": int(r["tpp_epochs"]), "max_epochs": int(r["epochs"]), "batch_size": int(r["batch_size"]),
                "lr": float(r["lr"]), "val_split": float(r["val_split"]), "device": _device(r.get("device"))}

    def __call__(self, request, datastore: Datastore):
        """Runs in monailabel's train subprocess: clients see only our marked lines (no traceback, no paths)."""
        if "monailabel.app" not in sys.modules and self._server_pid is None and os.environ.get(SERVER_PID_ENV):
            self._server_pid = int(os.environ[SERVER_PID_ENV])  # the server that started this train subprocess
            threading.Thread(target=safety.exit_when_orphaned, args=(self._server_pid,), daemon=True,
                             name="tpp-label-server-watch").start()
        try:
            self._run = r = {**self._request(request), "start_ts": time.time()}
            r["tpp_images"] = [datastore.get_image_uri(i) for i in datastore.list_images()]
            self._say(f"{self.name}: train on {len(r['tpp_images'])} images "
                      f"({len(datastore.get_labeled_images())} labelled), "
                      f"{json.dumps({k: r[k] for k in ('tpp', 'pretext', 'tpp_epochs', 'max_epochs', 'batch_size', 'lr', 'val_split')})}")
            model = os.path.join(self.bundle_path, "models", self.const.model_pytorch())
            super().__call__({"model": self.name, "max_epochs": r["max_epochs"], "val_split": r["val_split"],
                              "device": r["device"], "multi_gpu": False, "pretrained": False,
                              "tracking": "None"}, datastore)
            if not os.path.isfile(model) or os.stat(model).st_mtime < r["start_ts"]:
                raise FloatingPointError("fine-tuning published no model (no finite validation metric): check the "
                                         "images and labels, or lower lr")
            stats = {**self.stats(), "stage": "done", "tpp": r["tpp"], "pretext": r["pretext"] if r["tpp"] else "",
                     "tpp_epochs": r["tpp_epochs"] if r["tpp"] else 0, "ft_epochs": r["max_epochs"],
                     "num_images": len(r["tpp_images"]), "num_labelled": r["num_train"] + r["num_val"],
                     "num_train": r["num_train"], "num_val": r["num_val"], "val_split": r["val_split"],
                     "model_mtime_ns": os.stat(model).st_mtime_ns, "total_seconds": round(time.time() - r["start_ts"], 2)}
            atomic_write_json(self.stats_path, stats)
            self._say(f"published {os.path.relpath(model, self.bundle_path)}: best metric {stats.get('best_metric')}")
            return stats
        except Exception as e:  # noqa: BLE001 - the traceback goes to a server-side file, the client gets the reason
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, "train_errors.log"), "a") as f:
                f.write(traceback.format_exc() + "\n")
            root = str(getattr(datastore, "_datastore_path", "") or "")
            logger.error(f"{safety.CLIENT_MARK}training failed: {type(e).__name__}: "
                         f"{safety.redact(str(e), (self.log_dir, self.bundle_path, root))}"
                         "; the traceback is in the server's logs/train_errors.log")
            if "monailabel.app" in sys.modules:  # run_sync=true: inside the server, which must keep serving
                raise safety.RequestError(f"training failed: {type(e).__name__}", status=422) from None
            raise SystemExit(1) from None
