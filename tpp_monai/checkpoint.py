"""Atomic checkpoint writing and the target-parameter checkpoint (TPP -> fine-tuning hand-over).

A target-parameter checkpoint is a ``torch.save`` dict readable with ``weights_only=True``:
``{"format": "tpp-target-params", "version": 1, "peft": {"method", "config"},
"backbone_fingerprint", "shapes": {name: shape}, "state_dict": {name: tensor}, "meta": {...}}``.
Loading checks method, config, backbone fingerprint, names and shapes, and names what differs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpp_monai.peft.api import (
    backbone_fingerprint,
    check_target_state_dict,
    get_peft,
    load_target_state_dict,
    target_state_dict,
)

TARGET_FORMAT = "tpp-target-params"


class CheckpointMismatch(ValueError):
    """A target-parameter checkpoint does not belong to this backbone / PEFT method / config."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def safe_load(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller opts in to legacy pickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Check the path (or the bundle override).")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the fix
        hint = (
            " It may be a legacy pickled checkpoint: pass allow_pickle=True (only for files you trust)."
            if not allow_pickle
            else ""
        )
        raise RuntimeError(f"Could not read checkpoint {path}: {e}.{hint}") from e


def save_target_checkpoint(path: str | os.PathLike, backbone: nn.Module, meta: dict | None = None) -> Path:
    """Write only the target parameters of ``backbone`` plus what is needed to verify them later."""
    peft = get_peft(backbone)
    state = target_state_dict(backbone)
    obj = {
        "format": TARGET_FORMAT,
        "version": 1,
        "peft": peft.describe(),
        "backbone_fingerprint": backbone_fingerprint(backbone),
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    return atomic_save(obj, path)


def read_target_checkpoint(path: str | os.PathLike) -> dict:
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != TARGET_FORMAT:
        raise CheckpointMismatch(
            f"{path} is not a tpp-monai target-parameter checkpoint (no format '{TARGET_FORMAT}'); "
            "write one with save_target_checkpoint or the TPP stage of a bundle."
        )
    return obj


def load_target_checkpoint(
    path: str | os.PathLike, backbone: nn.Module, check_fingerprint: bool = True
) -> dict:
    """Load target parameters into ``backbone`` after checking method, config, fingerprint and shapes.

    Returns the checkpoint's ``meta``. Raises :class:`CheckpointMismatch` naming what differs.
    """
    obj = read_target_checkpoint(path)
    peft = get_peft(backbone)
    saved, here = obj["peft"], peft.describe()
    if saved["method"] != here["method"]:
        raise CheckpointMismatch(
            f"{path} holds target parameters of PEFT method '{saved['method']}', but the model uses "
            f"'{here['method']}'. Use the same method as the TPP stage."
        )
    diffs = {
        k: (saved["config"].get(k), here["config"].get(k))
        for k in set(saved["config"]) | set(here["config"])
        if saved["config"].get(k) != here["config"].get(k)
    }
    if diffs:
        txt = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise CheckpointMismatch(f"{path}: PEFT config differs ({txt}). Use the TPP stage's config.")
    if check_fingerprint:
        fp = backbone_fingerprint(backbone)
        if fp != obj["backbone_fingerprint"]:
            raise CheckpointMismatch(
                f"{path} was trained on a different backbone (fingerprint {obj['backbone_fingerprint'][:12]} "
                f"vs this backbone {fp[:12]}). Load the same pre-trained backbone checkpoint as the TPP stage."
            )
    try:
        check_target_state_dict(backbone, obj["state_dict"])
    except ValueError as e:
        raise CheckpointMismatch(f"{path}: {e}") from e
    load_target_state_dict(backbone, obj["state_dict"])
    return obj.get("meta", {})
