"""The target-parameter checkpoint (TPP -> fine-tuning hand-over), beside the PEFT API that makes its content.

A target-parameter checkpoint is a ``torch.save`` dict readable with ``weights_only=True``:
``{"format": "tpp-target-params", "version": 3, "peft": {"method", "config"},
"backbone_fingerprint", "backbone_digests": {name: digest}, "shapes": {name: shape}, "state_dict": {name: tensor},
"state_digest": sha256, "meta": {...}}``.
Loading checks the tensors against ``state_digest`` (a changed byte in the tensor data loads without any error from
torch: the zip records' CRCs are not checked), then method, config, backbone fingerprint, names and shapes, and
names what differs. Version-2 files (no digest) load with a warning.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from tpp_monai.checkpoint_diagnosis import CORRUPT_FIX
from tpp_monai.peft.api import (
    backbone_difference,
    backbone_fingerprint,
    backbone_hashes,
    check_target_state_dict,
    get_peft,
    load_target_state_dict,
    target_state_dict,
    tensors_digest,
)
from tpp_monai.safe_io import CheckpointCorrupt, CheckpointMismatch, atomic_save, safe_load, warn_if_non_finite

TARGET_FORMAT = "tpp-target-params"


def save_target_checkpoint(path: str | os.PathLike, backbone: nn.Module, meta: dict | None = None,
                           hashes: tuple[str, dict[str, str]] | None = None) -> Path:
    """Write only the target parameters of ``backbone`` plus what is needed to verify them later. ``hashes``:
    :func:`~tpp_monai.peft.api.backbone_hashes` of ``backbone`` when the caller already has them (the frozen
    tensors do not change during a run, so a TPP run hashes them once, not at every save)."""
    peft = get_peft(backbone)
    state = target_state_dict(backbone)
    fingerprint, digests = hashes if hashes is not None else backbone_hashes(backbone)
    obj = {
        "format": TARGET_FORMAT,
        "version": 3,
        "peft": peft.describe(),
        "backbone_fingerprint": fingerprint,
        "backbone_digests": digests,
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "state_dict": state,
        "state_digest": tensors_digest(state.items()),
        "meta": dict(meta or {}),
    }
    return atomic_save(obj, path)


def read_target_checkpoint(path: str | os.PathLike) -> dict:
    """A target-parameter checkpoint, its tensors verified against the digest saved with them."""
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != TARGET_FORMAT:
        raise CheckpointMismatch(
            f"{path} is not a tpp-monai target-parameter checkpoint (no format '{TARGET_FORMAT}'); "
            "write one with save_target_checkpoint or the TPP stage of a bundle."
        )
    check_target_digest(obj, path)
    return obj


def check_target_digest(obj: dict, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointCorrupt` when the tensors differ from ``state_digest``; warn when there is none."""
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointCorrupt(f"{path}: 'state_dict' is not a dict of tensors; the file is damaged. {CORRUPT_FIX}")
    saved = obj.get("state_digest")
    if saved is None:
        msg = (f"{path} has no tensor digest (a version-{obj.get('version')} target checkpoint, written before "
               "tpp-monai stored one): its tensors cannot be checked for damage. Re-save it (load + "
               "save_target_checkpoint, or re-run the TPP stage) to add the digest.")
        warnings.warn(msg, stacklevel=3)
        logging.getLogger("tpp_monai").warning(msg)
        return
    now = tensors_digest(state.items())
    if now != saved:
        raise CheckpointCorrupt(
            f"{path} is damaged: its target tensors do not match the digest stored when it was saved "
            f"({now[:12]} vs {str(saved)[:12]}; a changed byte from a disk, copy or edit error). {CORRUPT_FIX}")


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
                f"vs this backbone {fp[:12]}). {backbone_difference(obj.get('backbone_digests'), backbone)} "
                "Load the same pre-trained backbone checkpoint (and input normalisation) as the TPP stage."
            )
    warn_if_non_finite(obj["state_dict"], path, "TPP target-parameter checkpoint")
    try:
        check_target_state_dict(backbone, obj["state_dict"])
    except ValueError as e:
        raise CheckpointMismatch(f"{path}: {e}") from e
    load_target_state_dict(backbone, obj["state_dict"])
    return obj.get("meta", {})
