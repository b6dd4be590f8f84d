"""The TPP stage as a MONAI workflow (ignite engine): pretext loss -> AdamW step on the target
parameters (+ trainable pretext head) -> ``task.after_step`` (EMA teacher, centre), one
:func:`~tpp_monai.engines.tpp_step.tpp_step` per iteration (the nnU-Net TPP stage runs the same step).

Handlers: per-iteration LR/weight-decay schedule, loss logging (``StatsHandler``,
``TensorBoardStatsHandler``), optional progress bar, and :class:`TargetCheckpointHandler`, which
writes the target-parameter checkpoint (only target parameters, atomic) and a resume file
(target parameters, pretext head, optimiser, schedule, iteration, RNG, data order, settings; atomic).

Safety: the output folder is locked for the run (:mod:`tpp_monai.runlock`, rank 0 under DDP; a
second run into it is refused naming the first one's PID). ``resume``: ``"auto"`` continues from
``tpp_resume.pt`` when it exists and was written with the same settings (logged), ``True`` also
requires it to exist, ``False`` starts over. A resume file written with other settings (seed,
epochs, data size, training images, schedule, PEFT, pretext, backbone) is refused naming what differs
(the images by path, size and modification time: :mod:`tpp_monai.data.fingerprint`). The data
order is a function of the seed and the pass over the data
(:class:`~tpp_monai.engines.resumable_data.ResumableLoader`) and, with ``seed`` set, every
iteration seeds the RNG with ``seed + iteration``; so a resumed run equals an uninterrupted one
bit for bit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from torch import nn

from tpp_monai.safe_io import CheckpointMismatch, atomic_save, safe_load
from tpp_monai.peft.target_checkpoint import save_target_checkpoint
from tpp_monai.data.fingerprint import dataset_fingerprint
from tpp_monai.engines.amp import grad_scaler, resolve_amp
from tpp_monai.engines.distributed import barrier, is_main_process, wrap_ddp
from tpp_monai.engines.resumable_data import ResumableLoader
from tpp_monai.engines.run_state import rng_state, set_rng_state, settings_diff
from tpp_monai.engines.tpp_report import TPPReport
from tpp_monai.engines.tpp_step import tpp_step
from tpp_monai.engines.schedules import WarmupCosineSchedule
from tpp_monai.peft.api import backbone_difference, backbone_hashes, get_peft, load_target_state_dict, target_state_dict
from tpp_monai.runlock import OutputLock

TARGET_NAME = "target_params.pt"
RESUME_NAME = "tpp_resume.pt"
RESUME_FORMAT = "tpp-resume-state"

logger = logging.getLogger("tpp_monai.tpp")


def _batch_images(batch: Any, image_key: str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if image_key not in batch:
            raise KeyError(f"Batch has no key '{image_key}' (keys: {list(batch)}); set image_key")
        return batch[image_key]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"Cannot find images in a batch of type {type(batch).__name__}")


class TargetCheckpointHandler:
    """Saves target parameters (``target_params.pt``) and the resume state every ``every_iters``
    iterations and/or ``every_epochs`` epochs, and at the end of training."""

    def __init__(
        self, output_dir: str | os.PathLike, every_iters: int | None = None, every_epochs: int | None = 1,
        target_name: str = TARGET_NAME, resume_name: str = RESUME_NAME, meta: dict | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.every_iters, self.every_epochs = every_iters, every_epochs
        self.target_path = self.output_dir / target_name
        self.resume_path = self.output_dir / resume_name
        self.meta = dict(meta or {})
        self._last_saved = -1
        self._hashes: dict[int, tuple[str, dict[str, str]]] = {}

    def frozen_hashes(self, module: nn.Module) -> tuple[str, dict[str, str]]:
        """:func:`~tpp_monai.peft.api.backbone_hashes` of ``module``, computed once per run: the frozen tensors
        cannot change during TPP (~344 MB hashed per call for ViT-B), the target parameters are not part of it."""
        if id(module) not in self._hashes:
            self._hashes[id(module)] = backbone_hashes(module)
        return self._hashes[id(module)]

    def attach(self, engine: "TPPTrainer") -> None:
        if self.every_iters:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=int(self.every_iters)), self)
        if self.every_epochs:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=int(self.every_epochs)), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: "TPPTrainer") -> None:
        it = engine.state.iteration
        if it == self._last_saved or not is_main_process():  # under DDP rank 0 writes; all ranks hold the same
            return
        self._last_saved = it
        task, backbone = engine.task, engine.task.backbone
        meta = {**self.meta, "iteration": it, "epoch": engine.state.epoch, "pretext": task.name,
                "pretext_config": task.config() if hasattr(task, "config") else {}}
        handover = task.handover_backbone() if hasattr(task, "handover_backbone") else backbone  # DINO: teacher
        save_target_checkpoint(self.target_path, handover, meta=meta, hashes=self.frozen_hashes(handover))
        state = resume_state(
            task, engine.optimizer, engine.schedule, iteration=it,
            epoch=it // engine.state.epoch_length if engine.state.epoch_length else engine.state.epoch,
            max_epochs=engine.state.max_epochs, data=engine.data_loader.state_dict(), settings=engine.settings,
            report=engine.report.state_dict(), hashes=self.frozen_hashes(backbone))
        atomic_save(state, self.resume_path)


def resume_state(task: nn.Module, optimizer: torch.optim.Optimizer, schedule: WarmupCosineSchedule, *, iteration: int,
                 epoch: int, max_epochs: int, data: Any, settings: Mapping[str, Any], report: dict | None = None,
                 hashes: tuple[str, dict[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    """The resume file's content (format ``tpp-resume-state``), shared by every TPP loop (this trainer and the
    nnU-Net TPP stage, which adds its ``extra`` entries: network weights, grad scaler). ``rng``: every RNG state
    (:func:`tpp_monai.engines.run_state.rng_state`: torch, CUDA, numpy, Python, the task's MONAI transforms)."""
    backbone = task.backbone
    fingerprint, digests = hashes if hashes is not None else backbone_hashes(backbone)  # once per run: see frozen_hashes
    return {
        "format": RESUME_FORMAT,
        "iteration": int(iteration),
        "epoch": int(epoch),
        "max_epochs": int(max_epochs),
        "peft": get_peft(backbone).describe(),
        "pretext": task.name,
        "backbone_fingerprint": fingerprint,
        "backbone_digests": digests,
        "target_state": target_state_dict(backbone),
        "head_state": {k: v.detach().cpu() for k, v in task.head_state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": rng_state(task),
        "data": data,
        "settings": dict(settings),
        "report": report,
        **extra,
    }


def read_resume_state(path: str | os.PathLike, task: nn.Module, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Load a resume file and refuse (naming what differs) one of another PEFT, pretext, backbone or settings."""
    return check_resume_state(load_resume_state(path), path, task, settings)


def load_resume_state(path: str | os.PathLike) -> dict[str, Any]:
    """The resume file's dict (weights-only load); refused if it is no tpp-monai resume state."""
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != RESUME_FORMAT:
        raise CheckpointMismatch(f"{path} is not a tpp-monai resume state")
    return obj


def check_resume_state(obj: dict[str, Any], path: str | os.PathLike, task: nn.Module,
                       settings: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse a loaded resume state (:func:`load_resume_state`) of another PEFT, pretext, backbone or settings."""
    backbone = task.backbone
    here = get_peft(backbone).describe()
    if obj["peft"] != here:
        raise CheckpointMismatch(f"{path}: PEFT {obj['peft']} differs from this run's {here}. {_RESUME_FIX}")
    if obj["pretext"] != task.name:
        raise CheckpointMismatch(
            f"{path}: pretext '{obj['pretext']}' differs from this run's '{task.name}'. {_RESUME_FIX}")
    if obj["backbone_fingerprint"] != backbone_hashes(backbone)[0]:
        raise CheckpointMismatch(
            f"{path} was written with a different backbone; load the same backbone weights as that run. "
            f"{backbone_difference(obj.get('backbone_digests'), backbone)} {_RESUME_FIX}")
    diffs = settings_diff(obj.get("settings"), settings)
    if diffs:
        raise CheckpointMismatch(f"{path} was written by a run with other settings ({diffs}). {_RESUME_FIX}")
    return obj


class TPPTrainer(Trainer):
    """Ignite/MONAI trainer of the TPP stage.

    Args:
        device: "cpu", "cuda", ...
        max_epochs: epochs to train.
        data_loader: iterable of batches (tensor, ``(images, ...)`` or dict with ``image_key``).
        task: a :class:`~tpp_monai.pretext.PretextTask` (backbone with PEFT applied inside).
        optimizer: e.g. :func:`tpp_monai.engines.optim.build_optimizer`.
        schedule: a :class:`WarmupCosineSchedule` or a dict of its/``build_schedule`` fields
            (``lr``, ``warmup_epochs``, ``min_lr``, ``weight_decay``, ``weight_decay_end``);
            None: constant lr of the optimiser.
        output_dir: where ``target_params.pt``, ``tpp_resume.pt`` and ``tb/`` go (locked while this
            trainer lives: another run into it is refused).
        checkpoint_every_iters / checkpoint_every_epochs: checkpoint frequency.
        resume: ``"auto"`` (continue from ``output_dir/tpp_resume.pt`` when it exists), ``True`` (it must
            exist) or ``False`` (start over); a resume file of other settings is refused.
        seed: per-iteration RNG seed (``seed + iteration``) and seed of the data order; None keeps the
            global RNG running (the data order then gets a random seed, stored for resuming).
        clip_grad: max gradient norm (None: the task's ``default_clip_grad``, DINO 3.0, else none; 0: no clipping).
        amp: mixed precision (:func:`tpp_monai.engines.amp.resolve_amp`): None/True = bf16 (fp16 +
            GradScaler where bf16 is unsupported) on CUDA, off on CPU; "bf16"/"fp16" force it; False off.
        compile: run the forward through ``torch.compile``.
        find_unused_parameters: passed to DDP (a pretext whose trainable tensors may go unused in a step).
        settings: extra values recorded in the resume file that must match on resume.

    Under torchrun (an initialised process group) the task runs DDP-wrapped: gradients of the target
    parameters and the trainable pretext head are averaged over ranks, each rank loads its share of
    the global batch (:func:`tpp_monai.engines.distributed.global_batch_loader`), rank 0 alone writes
    checkpoints and logs, and every rank resumes from the same resume file.
    """

    def __init__(
        self, device: str | torch.device, max_epochs: int, data_loader: Iterable, task: nn.Module,
        optimizer: torch.optim.Optimizer, output_dir: str | os.PathLike, schedule: WarmupCosineSchedule | dict | None = None,
        epoch_length: int | None = None, checkpoint_every_iters: int | None = None,
        checkpoint_every_epochs: int | None = 1, resume: bool | str = False, seed: int | None = None,
        image_key: str = "image", clip_grad: float | None = None, amp: bool | str | None = None,
        progress_bar: bool = False, tensorboard: bool = True, log_every: int = 10, handlers: Sequence | None = None,
        meta: dict | None = None, compile: bool = False, find_unused_parameters: bool = False,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        _check_positive("max_epochs", max_epochs)
        if epoch_length is not None:
            _check_positive("epoch_length", epoch_length)
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be True, False or 'auto'; got {resume!r}")
        _check_not_empty(data_loader)
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=data_loader, epoch_length=epoch_length,
            handlers=None, decollate=False, amp=False,
        )
        if self.state.epoch_length is None:
            raise ValueError("epoch_length is needed for a data loader without len()")
        data_seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.data_loader = ResumableLoader(data_loader, data_seed)
        self.output_dir = Path(output_dir)
        self.lock = OutputLock(self.output_dir, what="TPP run")
        if is_main_process():  # under DDP rank 0 writes, so rank 0 holds the lock
            self.lock.acquire()
        try:
            self.task = task.to(self.state.device)
            self.network = wrap_ddp(self.task, self.state.device, find_unused_parameters)  # the task itself without DDP
            self.forward_fn = torch.compile(self.network) if compile else self.network
            self.optimizer = optimizer
            self.total_steps = int(max_epochs * self.state.epoch_length)
            self.schedule = self._make_schedule(schedule)
            if clip_grad is None:  # the pretext's own default (DINO: 3.0, as its main_dino.py; MAE: none)
                clip_grad = getattr(task, "default_clip_grad", None)
            self.seed, self.image_key, self.clip_grad = seed, image_key, clip_grad
            self.settings = {
                "seed": seed, "max_epochs": int(max_epochs), "epoch_length": int(self.state.epoch_length),
                "batches_per_pass": getattr(self.data_loader, "_len", None), "dataset_size": _dataset_size(data_loader),
                "data": dataset_fingerprint(getattr(data_loader, "dataset", None)),
                "schedule": self.schedule.state_dict(), "clip_grad": clip_grad, **dict(settings or {}),
            }
            self.amp_dtype = resolve_amp(amp, self.state.device)
            self.use_amp = self.amp_dtype is not None
            self.grad_scaler = grad_scaler(self.state.device, self.amp_dtype)
            self.add_event_handler(Events.ITERATION_STARTED, self._apply_schedule)
            handover = task.handover_backbone() if hasattr(task, "handover_backbone") else task.backbone
            self.report = TPPReport(  # recorded before the checkpointer saves the iteration, finalised after it
                handover, pretext=task.name, peft=get_peft(task.backbone).name, total_steps=self.total_steps,
                warmup_steps=self.schedule.warmup_steps, handover="trained" if handover is task.backbone else "teacher")
            self.add_event_handler(Events.ITERATION_COMPLETED,
                                   lambda e: self.report.record(e.state.output["loss"], e.state.output["lr"]))
            self.checkpointer = TargetCheckpointHandler(output_dir, checkpoint_every_iters, checkpoint_every_epochs,
                                                        meta=meta)
            self.checkpointer.attach(self)
            if is_main_process():
                self.add_event_handler(Events.COMPLETED, lambda e: self.report.finalise(self.checkpointer.target_path.parent, log=_say))
                self._attach_logging(progress_bar, tensorboard, log_every)
            self._extra_handlers = list(handlers or [])
            for h in self._extra_handlers:
                h.attach(self)
            self._finished = False
            if hasattr(task, "set_schedule_position"):
                task.set_schedule_position(0, self.total_steps, int(self.state.epoch_length))
            if resume and not self.resume_from(self.checkpointer.resume_path, missing_ok=resume == "auto"):
                _say(f"no resume state in {self.output_dir}: starting TPP from iteration 0")
            elif not resume and self.checkpointer.resume_path.is_file() and is_main_process():
                logger.warning("resume=False: starting over; %s of the previous run will be overwritten",
                               self.checkpointer.resume_path)
        except BaseException:
            self.lock.release()
            raise

    # ------------------------------------------------------------------ set-up
    def _make_schedule(self, schedule: WarmupCosineSchedule | dict | None) -> WarmupCosineSchedule:
        if isinstance(schedule, WarmupCosineSchedule):
            return schedule
        s = dict(schedule or {})
        lr = s.pop("lr", self.optimizer.param_groups[0]["lr"])
        if not lr or lr <= 0 or lr != lr:
            raise ValueError(f"TPP learning rate must be > 0, got {lr!r}; leave it unset for the paper's default")
        warm_epochs = s.pop("warmup_epochs", None)
        warm = s.pop("warmup_steps", None)
        if warm is None:
            warm = int(round((warm_epochs or 0) * self.state.epoch_length))
        wd = s.pop("weight_decay", None)
        min_lr = s.pop("min_lr", lr if schedule is None else 0.0)
        wd_end = s.pop("weight_decay_end", None)
        if s:
            raise TypeError(f"Unknown schedule option(s) {sorted(s)}; use lr, warmup_epochs/warmup_steps, min_lr, "
                            "weight_decay, weight_decay_end")
        return WarmupCosineSchedule(
            lr=lr, total_steps=self.total_steps, warmup_steps=min(int(warm), self.total_steps), min_lr=min_lr,
            weight_decay=wd, weight_decay_end=wd_end,
        )

    def _apply_schedule(self, engine: Engine) -> None:
        self.schedule.apply(self.optimizer, engine.state.iteration - 1)

    def _attach_logging(self, progress_bar: bool, tensorboard: bool, log_every: int) -> None:
        from monai.handlers import StatsHandler, TensorBoardStatsHandler

        every = max(int(log_every), 1)
        StatsHandler(
            iteration_log=lambda e, i: i % every == 0, name=logger.name, tag_name="loss",
            output_transform=lambda o: o["loss"],
        ).attach(self)
        if tensorboard:
            TensorBoardStatsHandler(
                log_dir=str(self.output_dir / "tb"), iteration_log=every, tag_name="loss",
                output_transform=lambda o: o["loss"],
            ).attach(self)
        if progress_bar:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=True).attach(self, output_transform=lambda o: {"loss": o["loss"]})

    # ------------------------------------------------------------------ iteration
    def _iteration(self, engine: Engine, batchdata: Any) -> dict[str, float]:
        i = engine.state.iteration - 1
        if self.seed is not None:
            torch.manual_seed(self.seed + i)
        images = _batch_images(batchdata, self.image_key).to(self.state.device, non_blocking=self.non_blocking)
        self.task.train()
        mean_loss = tpp_step(self.task, self.forward_fn, self.optimizer, [images], step=i, total_steps=self.total_steps,
                             device=self.state.device, amp_dtype=self.amp_dtype, scaler=self.grad_scaler,
                             clip_grad=self.clip_grad, ddp_module=self.network)
        return {"loss": float(mean_loss), "lr": float(self.optimizer.param_groups[0]["lr"])}

    # ------------------------------------------------------------------ resume
    def resume_from(self, path: str | os.PathLike, missing_ok: bool = False) -> bool:
        """Load a resume file written by :class:`TargetCheckpointHandler`; False if absent and ``missing_ok``."""
        path = Path(path)
        if not path.is_file():
            if missing_ok:
                return False
            raise FileNotFoundError(f"No resume state at {path}")
        obj = read_resume_state(path, self.task, self.settings)
        backbone = self.task.backbone
        load_target_state_dict(backbone, obj["target_state"])
        self.task.load_head_state_dict(obj["head_state"])
        self.optimizer.load_state_dict(obj["optimizer"])
        self.schedule.load_state_dict({**obj["schedule"], "total_steps": self.total_steps})
        set_rng_state(obj["rng"], self.task, path)
        self.data_loader.load_state_dict(obj["data"])
        it = int(obj["iteration"])
        self.state.iteration = it
        self.state.epoch = it // self.state.epoch_length
        self.checkpointer._last_saved = it
        if hasattr(self.task, "set_schedule_position"):
            self.task.set_schedule_position(it, self.total_steps, int(self.state.epoch_length))
        self.report.load_state_dict(obj.get("report"), it)
        self._finished = it >= self.total_steps
        for h in self._extra_handlers:  # logs (bundle JsonlLogger): drop what the killed run logged past `it`
            if hasattr(h, "keep_until"):
                h.keep_until(it, self.state.epoch)
        _say(f"resuming TPP from {path} at iteration {it} of {self.total_steps} (epoch {self.state.epoch}); "
             "pass resume=False (bundles: --resume false) to start over")
        return True

    def run(self) -> None:  # type: ignore[override]
        """Train (or do nothing when the resumed run had finished); the output folder is unlocked after."""
        try:
            if self._finished:
                logger.info("TPP already finished (%d iterations); nothing to do", self.state.iteration)
                return
            if is_main_process():
                self.lock.acquire()  # a second run() of this trainer takes the lock again
            super().run()
            barrier()  # rank 0 has written the final checkpoint before any rank goes on to read it
        finally:
            self.lock.release()


_RESUME_FIX = ("Resume with the same settings, write to another output folder, or start over with resume=False "
               "(bundles: --resume false), which overwrites that run's state.")


def _say(msg: str) -> None:
    logger.info(msg)
    if is_main_process():
        print(f"[tpp-monai] {msg}", flush=True)


def _dataset_size(data_loader: Iterable) -> int | None:
    ds = getattr(data_loader, "dataset", None)
    try:
        return len(ds) if ds is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_not_empty(data_loader: Iterable) -> None:
    try:
        n = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        return
    if n == 0:
        ds = getattr(data_loader, "dataset", None)
        what = f"{len(ds)} images" if ds is not None and hasattr(ds, "__len__") else "no batches"
        raise ValueError(f"The TPP data loader yields no batches ({what}); give it training images "
                         "(check the datalist / image folder, and drop_last with fewer images than the batch size).")

