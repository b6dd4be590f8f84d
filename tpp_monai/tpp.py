"""Small Python API of the TPP stage and of the hand-over to fine-tuning.

    ckpt = tpp_pretrain(backbone, "adapter", "mae", images, epochs=100, batch_size=64,
                        output_dir="runs/tpp")
    model = load_for_finetuning(fresh_backbone, "adapter", {"bottleneck": 64}, ckpt)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from tpp_monai.peft.target_checkpoint import load_target_checkpoint
from tpp_monai.engines.distributed import global_batch_loader, is_distributed
from tpp_monai.engines.optim import build_optimizer
from tpp_monai.engines.tpp_trainer import TPPTrainer
from tpp_monai.peft.api import apply_peft, get_peft
from tpp_monai.peft.base import PeftMethod
from tpp_monai.pretext import PRETEXT_TASKS, PretextTask, pretext_recipe


class _TensorImages(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        if images.ndim < 4:
            raise ValueError(f"images must be (N, C, H, W[, D]); got shape {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def make_dataset(images: Any, transforms: Callable | None = None) -> Dataset:
    """A tensor (N, C, H, W), a Dataset, or a MONAI datalist (list of dicts) + ``transforms``."""
    if isinstance(images, torch.Tensor):
        return _TensorImages(images)
    if isinstance(images, Dataset):
        return images
    if isinstance(images, (list, tuple)):
        from monai.data import Dataset as MonaiDataset

        return MonaiDataset(list(images), transform=transforms)
    raise TypeError(f"images must be a tensor, a Dataset or a datalist; got {type(images).__name__}")


def tpp_pretrain(
    backbone: nn.Module,
    peft: str | PeftMethod | None,
    pretext: str | PretextTask,
    images: Any,
    *,
    peft_config: dict | None = None,
    pretext_config: dict | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float | None = None,
    weight_decay_end: float | None = None,
    warmup_epochs: float | None = None,
    min_lr: float = 0.0,
    betas: Sequence[float] | None = None,
    clip_grad: float | None = None,
    transforms: Callable | None = None,
    image_key: str = "image",
    num_workers: int = 0,
    shuffle: bool = True,
    output_dir: str | os.PathLike = "tpp_output",
    checkpoint_every_iters: int | None = None,
    checkpoint_every_epochs: int | None = 1,
    resume: bool | str = False,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    amp: bool | str | None = None,
    compile: bool = False,
    progress_bar: bool = False,
    tensorboard: bool = True,
    log_every: int = 10,
    max_iterations: int | None = None,
    handlers: Sequence | None = None,
) -> Path:
    """Run the TPP stage and return the path of the target-parameter checkpoint.

    ``peft``: a method name (applied with ``peft_config``) or None when the backbone already carries
    one. ``pretext``: "mae", "dino" (``pretext_config`` goes to its constructor) or a built task.
    Defaults of lr / weight decay / warm-up / betas follow the paper for the pretext task.
    ``max_iterations`` limits the iterations per epoch (quick runs). ``handlers``: extra objects with
    ``attach(engine)`` (MONAI/ignite handlers, e.g. a loss recorder). ``resume``: True / "auto" continue
    from ``output_dir/tpp_resume.pt`` (see :class:`~tpp_monai.engines.tpp_trainer.TPPTrainer`).

    Under torchrun (call :func:`tpp_monai.engines.distributed.init_distributed` first) ``batch_size`` is
    the *global* batch: each of the W processes loads ``batch_size / W`` images, gradients are averaged,
    and the run equals a single-process run with the same seed (rank 0 writes the checkpoint).
    ``amp``: mixed precision, on by default on CUDA (:func:`tpp_monai.engines.amp.resolve_amp`).
    """
    device = torch.device(device)
    if is_distributed() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if peft is not None:
        apply_peft(backbone, peft, peft_config)
    else:
        get_peft(backbone)
    backbone.to(device)
    if not isinstance(pretext, PretextTask):
        from tpp_monai.pretext.dino_cnn import pretext_name_for

        pretext = PRETEXT_TASKS.get(pretext_name_for(pretext, backbone))(backbone, **(pretext_config or {}))
    task = pretext
    r = pretext_recipe(task, batch_size, lr=lr, weight_decay=weight_decay, weight_decay_end=weight_decay_end,
                       warmup_epochs=warmup_epochs, betas=betas)
    lr, wd, wd_end, warm = r["lr"], r["weight_decay"], r["weight_decay_end"], r["warmup_epochs"]
    optimizer = build_optimizer(task, lr=lr, weight_decay=wd, betas=r["betas"])
    ds = make_dataset(images, transforms)
    if len(ds) == 0:
        raise ValueError("tpp_pretrain got 0 images: pass the downstream training images (a tensor (N, C, H, W), a "
                         "Dataset or a datalist) and check the folder/datalist they come from")
    loader = global_batch_loader(ds, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers,
                                 pin_memory=device.type == "cuda")
    epoch_length = min(len(loader), max_iterations) if max_iterations else None
    trainer = TPPTrainer(
        device=device, max_epochs=epochs, data_loader=loader, task=task, optimizer=optimizer, output_dir=output_dir,
        schedule={"lr": lr, "warmup_epochs": warm, "min_lr": min_lr, "weight_decay": wd, "weight_decay_end": wd_end},
        epoch_length=epoch_length, checkpoint_every_iters=checkpoint_every_iters,
        checkpoint_every_epochs=checkpoint_every_epochs, resume=resume, seed=seed, image_key=image_key,
        clip_grad=clip_grad, amp=amp, compile=compile, progress_bar=progress_bar, tensorboard=tensorboard, log_every=log_every,
        handlers=handlers,
    )
    trainer.run()
    return trainer.checkpointer.target_path


def load_for_finetuning(
    backbone: nn.Module, peft_method: str, peft_config: dict | None, target_ckpt: str | os.PathLike,
    check_fingerprint: bool = True,
) -> nn.Module:
    """Insert ``peft_method`` into ``backbone`` and load the TPP target parameters (checked) into it.

    Returns the backbone (target parameters trainable, everything else frozen). Raises
    :class:`~tpp_monai.safe_io.CheckpointMismatch` if the checkpoint belongs to another
    backbone, method or config.
    """
    apply_peft(backbone, peft_method, peft_config)
    load_target_checkpoint(target_ckpt, backbone, check_fingerprint=check_fingerprint)
    return backbone
