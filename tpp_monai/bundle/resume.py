"""Resumable stage-3 fine-tuning: :class:`FineTuneResume`, a train handler of the bundles.

Every ``save_interval`` iterations (and at the end) rank 0 writes ``models/finetune_resume.pt`` atomically:
the trainable tensors and buffers of the network, optimiser, lr scheduler, AMP grad scaler, the trainer's
iteration, the data position, the RNG states, the validator's best metric and the key-metric saver's record
(so ``models/model.pt`` keeps the best model across the kill), and the run's settings. A NaN/Inf state is
never written.

``resume`` (the bundle's top-level switch, as for TPP): ``"auto"`` continues from that file when it holds an
unfinished run (a finished run's file is left for a new run to overwrite: re-running train.json trains again),
``True`` requires the file (a finished run then does nothing), ``False`` starts over (the file is overwritten at
the next save). A file written
with other settings (PEFT method/config, backbone weights, initial target parameters, lr, batch, iterations,
seed, ...) is refused naming what differs and the fix.

No lost or repeated iteration: the trainer's data loader is wrapped in
:class:`~tpp_monai.engines.resumable_data.ResumableLoader` (each pass over the data shuffles and augments from
``(seed, pass)``), so a run resumed inside an epoch draws exactly the batches an uninterrupted run draws next.
A save that falls on the last iteration of an epoch is made after that epoch's validation instead (a resume
does not skip the validation). Under DDP every rank's RNG states (torch, CUDA, numpy, python: stochastic depth,
dropout) are gathered into the file and each rank restores its own (a resume with another number of processes
restores rank 0's on rank 0 only, with a warning); MONAI's random transforms are reseeded per pass by the loader.
So data order, augmentation, weights, optimiser and schedule continue exactly on every rank.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver
from torch import nn

from tpp_monai.safe_io import CheckpointMismatch, atomic_save, non_finite_tensors, safe_load
from tpp_monai.engines.distributed import is_main_process, unwrap
from tpp_monai.engines.resumable_data import ResumableLoader
from tpp_monai.engines.run_state import restore_rank_rng, rng_of_every_rank, settings_diff
from tpp_monai.peft.api import tensors_digest

RESUME_NAME = "finetune_resume.pt"
RESUME_FORMAT = "tpp-finetune-resume"
_FIX = ("Resume with the settings of that run, start over with --resume False (overwrites that run's resume "
        "state), or train into another --bundle_root.")

logger = logging.getLogger("tpp_monai.bundle")


def parse_resume(value: bool | str | None) -> bool | str:
    """The resume switch from JSON/CLI (``true``/``false``/``auto``, any case) as True/False/"auto"."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("auto", "none", ""):
        return "auto"
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ValueError(f"resume must be auto, true or false; got {value!r}")


def _trainable(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def _frozen(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in net.named_parameters() if not p.requires_grad}


class FineTuneResume:
    """Periodic resume state of a ``SupervisedTrainer`` and continuation from it (see module docstring).

    Args:
        ckpt_dir: the bundle's ``models`` folder; the file is ``ckpt_dir/finetune_resume.pt``.
        resume: ``"auto"``, True or False (strings from the command line are accepted).
        save_interval: iterations between saves (0: only at the end).
        seed: seeds the per-pass data order and augmentation (the bundle's ``seed``).
        lr_scheduler: the scheduler stepped by the trainer (its state is saved).
        evaluator: the validator (best metric and the key-metric checkpoint record are saved).
        settings: values that must be equal for a resume (the bundle passes lr, batch size, PEFT, ...).
    """

    def __init__(self, ckpt_dir: str, resume: bool | str = "auto", save_interval: int = 500, seed: int = 0,
                 lr_scheduler: Any = None, evaluator: Engine | None = None, settings: Mapping[str, Any] | None = None,
                 filename: str = RESUME_NAME) -> None:
        if isinstance(save_interval, bool) or not isinstance(save_interval, int) or save_interval < 0:
            raise ValueError(f"save_interval must be a number of iterations >= 0 (0: only at the end), got "
                             f"{save_interval!r}")
        self.path = Path(ckpt_dir) / filename
        self.resume, self.save_interval, self.seed = parse_resume(resume), int(save_interval), int(seed)
        self.lr_scheduler, self.evaluator = lr_scheduler, evaluator
        self.extra_settings = dict(settings or {})
        self._last_saved = -1

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Engine) -> None:
        """Wraps the data loader now; the rest happens when the run starts (MONAI attaches handlers before
        the trainer holds its network and optimiser)."""
        if not isinstance(engine.data_loader, ResumableLoader):
            engine.data_loader = ResumableLoader(engine.data_loader, self.seed)
        engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        """Loads the resume state when asked (before the loggers' STARTED handlers see the iteration) and
        registers the saves after every other handler (so they run after validation and the NaN check)."""
        if getattr(self, "_registered", False):
            return
        self._registered = True
        net = unwrap(engine.network)
        self.settings = {
            **self.extra_settings,
            "max_epochs": int(engine.state.max_epochs), "epoch_length": int(engine.state.epoch_length),
            "dataset_size": _dataset_size(engine.data_loader.loader), "amp": bool(getattr(engine, "amp", False)),
            "trainable": {n: list(p.shape) for n, p in _trainable(net).items()},
            "frozen_weights": tensors_digest(_frozen(net).items()),
            "initial_trainable": tensors_digest(_trainable(net).items()),
        }
        obj = self._read() if self.resume and self.path.is_file() else None
        if obj is not None and self.resume == "auto" and _finished(obj):
            _say(f"{self.path} is the state of a finished run: starting a new run (auto resumes an unfinished "
                 "run only; --resume True keeps the finished one)")
        elif obj is not None:
            self._load(engine, net, obj)
        elif self.resume is True:
            raise FileNotFoundError(
                f"--resume True but there is no fine-tuning resume state {self.path} (written every "
                f"save_interval iterations by a train.json run into this bundle_root). Check --bundle_root, "
                f"or use --resume auto / False to start a new run.")
        elif self.resume:
            _say(f"no fine-tuning resume state {self.path}: starting from iteration 0")
        elif self.path.is_file() and is_main_process():
            _say(f"--resume False: starting over; {self.path} of the previous run will be overwritten")
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _iteration(self, engine: Engine) -> None:
        it, n = engine.state.iteration, self.save_interval
        if n and it % n == 0 and it % engine.state.epoch_length:  # epoch ends: saved after validation
            self.save(engine)

    def _epoch(self, engine: Engine) -> None:
        if self.save_interval and engine.state.iteration % self.save_interval == 0:
            self.save(engine)

    # ------------------------------------------------------------------ save / load
    def save(self, engine: Engine) -> None:
        """Write the resume state (rank 0; once per iteration; never NaN/Inf)."""
        it = engine.state.iteration
        if it == self._last_saved:
            return
        rngs = rng_of_every_rank()  # a collective: every rank saves at the same iterations
        if not is_main_process():
            self._last_saved = it  # as rank 0 below: the next save is at the same iteration on every rank
            return
        from tpp_monai.bundle.handlers import NON_FINITE_CAUSES, NonFiniteModelError

        net = unwrap(engine.network)
        model = {**_trainable(net), **dict(net.named_buffers())}
        model = {k: v.detach().cpu().clone() for k, v in model.items()}
        bad = non_finite_tensors(model)
        if bad:
            raise NonFiniteModelError(f"not saving {self.path}: {len(bad)} tensor(s) hold NaN/Inf (e.g. "
                                      f"{', '.join(bad[:3])}); the previous resume state is kept. {NON_FINITE_CAUSES}")
        scaler = getattr(engine, "scaler", None)
        state = {
            "format": RESUME_FORMAT, "version": 1, "iteration": it, "epoch": engine.state.epoch,
            "settings": self.settings, "model": model, "optimizer": engine.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "data": engine.data_loader.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
            "validation": self._validation_state(),
        }
        atomic_save(state, self.path)
        self._last_saved = it

    def _read(self) -> dict:
        obj = safe_load(self.path)
        if not isinstance(obj, dict) or obj.get("format") != RESUME_FORMAT:
            raise CheckpointMismatch(f"{self.path} is not a tpp-monai fine-tuning resume state. Move it away, or "
                                     "start over with --resume False (overwrites it).")
        return obj

    def _load(self, engine: Engine, net: nn.Module, obj: dict) -> None:
        diffs = settings_diff(obj.get("settings") or {}, self.settings)
        if diffs:
            raise CheckpointMismatch(f"{self.path} was written by a fine-tuning run with other settings ({diffs}). "
                                     f"{_FIX}")
        missing, unexpected = net.load_state_dict(obj["model"], strict=False)
        if unexpected or set(_trainable(net)) - set(obj["model"]):
            raise CheckpointMismatch(f"{self.path}: tensors do not match the network ({unexpected[:3]}). {_FIX}")
        engine.optimizer.load_state_dict(obj["optimizer"])
        if self.lr_scheduler is not None and obj["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(obj["lr_scheduler"])
        engine.data_loader.load_state_dict(obj["data"])
        self._restore_validation(obj.get("validation") or {})
        if obj.get("scaler") and getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(obj["scaler"])  # MONAI's Trainer.run() made a new one
        restore_rank_rng(obj, self.path)  # after set-up, right before the first resumed iteration
        it = int(obj["iteration"])
        self._last_saved = it
        total = engine.state.max_epochs * engine.state.epoch_length
        engine.state.iteration, engine.state.epoch = it, it // engine.state.epoch_length
        from tpp_monai.bundle.handlers import JsonlLogger

        for log in _attached(engine, JsonlLogger) + (_attached(self.evaluator, JsonlLogger) if self.evaluator else []):
            if is_main_process():
                log.keep_until(it, engine.state.epoch)  # the killed run's records past the saved iteration are not kept twice
        if it >= total:  # ignite ends the run at once (COMPLETED handlers still run)
            _say(f"fine-tuning already finished ({it} iterations, {self.path}); nothing to do. "
                 "Pass --resume False to train again.")
            return
        _say(f"resuming fine-tuning from {self.path} at iteration {it} of {total} (epoch {engine.state.epoch}); "
             "pass --resume False to start over")

    # ------------------------------------------------------------------ best-model bookkeeping
    def _savers(self) -> list[CheckpointSaver]:
        return _attached(self.evaluator, CheckpointSaver) if self.evaluator is not None else []

    def _validation_state(self) -> dict:
        if self.evaluator is None:
            return {}
        s = self.evaluator.state
        savers = [{"key_metric": c._key_metric_checkpoint.state_dict() if c._key_metric_checkpoint else None}
                  for c in self._savers()]
        return {"best_metric": float(s.best_metric), "best_metric_epoch": int(s.best_metric_epoch), "savers": savers}

    def _restore_validation(self, v: Mapping[str, Any]) -> None:
        if self.evaluator is None or not v:
            return
        self.evaluator.state.best_metric = v["best_metric"]
        self.evaluator.state.best_metric_epoch = v["best_metric_epoch"]
        for saver, st in zip(self._savers(), v.get("savers", [])):
            if saver._key_metric_checkpoint is not None and st.get("key_metric") is not None:
                saver._key_metric_checkpoint.load_state_dict(st["key_metric"])


def _attached(engine: Engine, cls: type) -> list:
    """The handler objects of type ``cls`` attached to ``engine`` (through their bound methods)."""
    found: list = []
    for handlers in engine._event_handlers.values():
        for h, *_ in handlers:
            obj = getattr(h, "__self__", None)
            if isinstance(obj, cls) and obj not in found:
                found.append(obj)
    return found


def _finished(obj: Mapping[str, Any]) -> bool:
    st = obj.get("settings") or {}
    total = int(st.get("max_epochs", 0)) * int(st.get("epoch_length", 0))
    return bool(total) and int(obj["iteration"]) >= total


def _dataset_size(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _say(msg: str) -> None:
    logger.info(msg)
    if is_main_process():
        print(f"[tpp-monai] {msg}", flush=True)
