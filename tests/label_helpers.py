"""Shared set-up of the label-server tests: a tiny copy of a real 2D bundle, the app folder, a studies folder.

The bundle is ``bundles/demo_ct_adapter_tpp`` copied with small values in its own override knobs (ViT-Tiny,
depth 2, 32 px, random seeded backbone, one TPP epoch), so the server serves and trains a real bundle in seconds.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "tpp_label"
SOURCE_BUNDLE = REPO / "bundles" / "demo_ct_adapter_tpp"
#: the bundle's own knobs, set in every config file that has them (train / inference / tpp_pretrain)
TINY = {"vit_size": "tiny", "vit_overrides": {"depth": 2}, "image_size": 32, "backbone_ckpt": "",
        "num_workers": 0, "batch_size": 4, "num_iterations": 4, "val_interval": 1, "amp": False,
        "tpp_epochs": 1, "tpp_batch_size": 4, "tpp_warmup_epochs": 0, "train_cache": "none", "tpp_cache": "none"}
NETWORK_KEYS = ("vit_size", "vit_overrides", "image_size", "backbone_ckpt", "amp", "num_workers", "batch_size")


def tiny_bundle(dst: Path, dataset_dir: Path | None = None) -> Path:
    """``dst`` = a copy of the demo bundle's configs with :data:`TINY` written into its config files."""
    (dst / "configs").mkdir(parents=True)
    for f in (SOURCE_BUNDLE / "configs").iterdir():
        shutil.copy(f, dst / "configs" / f.name)
    for name in ("train.json", "inference.json", "tpp_pretrain.json"):
        p = dst / "configs" / name
        cfg = json.loads(p.read_text())
        for k, v in TINY.items():
            if k in cfg or (name != "tpp_pretrain.json" and k in NETWORK_KEYS):
                cfg[k] = v
        if "bundle_root" in cfg:
            cfg["bundle_root"] = str(dst)
        if dataset_dir is not None and "dataset_dir" in cfg:
            cfg["dataset_dir"] = str(dataset_dir)
        p.write_text(json.dumps(cfg, indent=4))
    return dst


def app_copy(dst: Path) -> Path:
    """The app folder as ``start_server --app`` takes it (main.py + lib/); the server adds model/, logs/."""
    shutil.copytree(APP, dst, ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin", "README.md"))
    return dst


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
