"""Stage 2 (TPP) and the demo's stage 1 (upstream MAE pre-training) for the bundles' JSON."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from tpp_monai.bundle.networks import read_backbone_checkpoint
from tpp_monai.bundle.resume import parse_resume

logger = logging.getLogger("tpp_monai.bundle")

TARGET_FILE = "tpp_target_params.pt"


def build_pretext(
    backbone: nn.Module, pretext: str = "mae", decoder_mode: str = "inherit_frozen",
    backbone_ckpt: str | os.PathLike | None = "", allow_pickle: bool = False,
    pretext_config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The pretext task around a PEFT backbone.

    MAE: ``decoder_mode`` ``inherit_frozen`` (classification) / ``inherit_trainable``
    (segmentation) take the MAE decoder stored with ``backbone_ckpt``, run with the heads recorded
    for its format (MedCoSS/MAE: 16; ``pretext_config["decoder_heads"]`` overrides); when the
    checkpoint has no decoder (DINO/timm backbone, or no checkpoint) a fresh decoder (``"new"``) is
    used, with a warning.
    Other pretexts (``dino``) get ``pretext_config`` only; ``dino`` on a CNN backbone (EfficientNet encoder) is
    the CNN DINO (``dino_cnn``, :mod:`tpp_monai.pretext.dino_cnn`).
    """
    from tpp_monai.pretext import PRETEXT_TASKS

    cfg = dict(pretext_config or {})
    if pretext == "mae":
        if decoder_mode != "new":
            loaded = read_backbone_checkpoint(backbone_ckpt, allow_pickle=allow_pickle)
            if loaded is not None and loaded.decoder_state:
                cfg.update(decoder_mode=decoder_mode, decoder_state=loaded)
            else:
                logger.warning("backbone checkpoint %r has no MAE decoder: using a new, trainable decoder instead of "
                               "'%s'", backbone_ckpt, decoder_mode)
                cfg["decoder_mode"] = "new"
        else:
            cfg["decoder_mode"] = "new"
    from tpp_monai.pretext.dino_cnn import pretext_name_for

    return PRETEXT_TASKS.get(pretext_name_for(pretext, backbone))(backbone, **cfg)


def build_tpp_optimizer(task: nn.Module, lr: float | None = None, batch_size: int = 64,
                        weight_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW over target parameters + trainable pretext head; paper defaults per pretext when None."""
    from tpp_monai.engines.optim import build_optimizer
    from tpp_monai.pretext import pretext_recipe

    r = pretext_recipe(task, batch_size, lr=lr, weight_decay=weight_decay)
    lr = r["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"--tpp_lr must be a positive learning rate or null (the paper's default), got {lr!r}")
    return build_optimizer(task, lr=lr, weight_decay=r["weight_decay"], betas=r["betas"])


def build_tpp_trainer(
    task: nn.Module, optimizer: torch.optim.Optimizer, data_loader: Iterable, output_dir: str | os.PathLike,
    device: str | torch.device = "cpu", max_epochs: int = 1, epoch_length: int | None = None,
    lr: float | None = None, warmup_epochs: float | None = None, min_lr: float = 0.0, weight_decay: float | None = None,
    weight_decay_end: float | None = None, target_name: str = TARGET_FILE, seed: int | None = 0,
    progress_bar: bool = True, log_every: int = 10, handlers: Sequence | None = None, resume: bool | str = "auto",
    checkpoint_every_epochs: int | None = 1,
):
    """A :class:`~tpp_monai.engines.TPPTrainer` writing ``output_dir/<target_name>`` (default
    ``tpp_target_params.pt``), warm-up + cosine schedule; warm-up is capped at half the run.
    ``warmup_epochs`` None: the paper's for the pretext (MAE 40, DINO 10: the pretext class's ``defaults``).

    ``resume`` (the bundle's top-level ``resume``): "auto" continues a killed run from
    ``tpp_resume.pt`` when it was written with the same settings (and refuses one with other
    settings), true requires it, false starts over."""
    from tpp_monai.engines.tpp_trainer import TPPTrainer
    from tpp_monai.pretext import pretext_recipe

    lr = optimizer.param_groups[0]["lr"] if lr is None else lr
    r = pretext_recipe(task, 1, lr=lr, weight_decay=weight_decay, weight_decay_end=weight_decay_end,
                       warmup_epochs=warmup_epochs, betas=tuple(optimizer.param_groups[0]["betas"]))
    wd, wd_end = r["weight_decay"], r["weight_decay_end"]
    resume = parse_resume(resume)
    os.makedirs(output_dir, exist_ok=True)
    warm = min(float(r["warmup_epochs"]), max_epochs / 2)
    trainer = TPPTrainer(
        device=torch.device(device), max_epochs=int(max_epochs), data_loader=data_loader, task=task,
        optimizer=optimizer, output_dir=output_dir, epoch_length=epoch_length,
        schedule={"lr": lr, "warmup_epochs": warm, "min_lr": min_lr, "weight_decay": wd, "weight_decay_end": wd_end},
        seed=seed, progress_bar=progress_bar, log_every=log_every, handlers=handlers, resume=resume,
        checkpoint_every_epochs=checkpoint_every_epochs,
    )
    trainer.checkpointer.target_path = Path(output_dir) / target_name
    return trainer


def save_mae_checkpoint(task: nn.Module, path: str | os.PathLike) -> Path:
    """Write an upstream MAE checkpoint in the timm-MAE layout ``{'model': encoder + decoder tensors}``.

    The encoder tensors keep the timm names (``patch_embed.*``, ``blocks.N.*``, ...), PEFT-inserted
    tensors (``peft_*``) are left out, the decoder keeps ``decoder_*``/``mask_token``; so
    :func:`tpp_monai.backbones.weights.load_vit_checkpoint` reads it like a released MAE file.
    """
    from tpp_monai.safe_io import atomic_save

    enc = {k: v.detach().cpu().clone() for k, v in task.backbone.state_dict().items() if "peft_" not in k}
    dec = {k: v.detach().cpu().clone() for k, v in task.decoder.state_dict().items()}
    cfg = task.backbone.cfg.to_dict() if hasattr(task.backbone, "cfg") else {}
    # what the tensors cannot tell, recorded so later stages run the decoder and the pixel space as trained
    implied = {"decoder_heads": int(task.decoder_heads), "input_norm": getattr(task.backbone, "input_norm", "none"),
               "channel_order": getattr(task.backbone, "channel_order", "rgb")}
    out = atomic_save({"model": {**enc, **dec}, "config": cfg, "source": "tpp-monai upstream MAE (demo)", **implied},
                      path)
    logger.info("wrote MAE backbone checkpoint %s", out)
    print(f"[tpp-monai] wrote MAE backbone checkpoint {out}", flush=True)
    return out


