"""Ignite handlers / metrics the bundles wire in by ``_target_``.

* :class:`SegmentationMetric`: Dice or HD95 (pixels) with the empty-mask policy of
  :mod:`tpp_monai.metrics.segmentation` (every image contributes a finite value).
* :class:`JsonlLogger`: appends the training loss per iteration and the metrics per epoch to a
  JSON-lines file (the demo draws its curves from it).
* :class:`GradClipHandler`: gradient-norm clipping between backward and the optimiser step (MedCoSS
  fine-tunes with ``clip_grad_norm_(model.parameters(), 12)``).
* :class:`PredictionWriter`: inference outputs as files: a CSV of class probabilities
  (classification) or one mask per image written with MONAI ``SaveImage`` (PNG or NIfTI).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric


def _stack(x: Any) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        return torch.stack([torch.as_tensor(t) for t in x])
    return torch.as_tensor(x)


class SegmentationMetric(Metric):
    """``metric`` "dice" (fraction) or "hd95" (pixels) over an epoch; ``output_transform`` -> (pred, label).

    Computed as the paper (MedCoSS) does: per-image Dice and medpy-style pooled HD95, 500 px when exactly
    one mask is empty (see :mod:`tpp_monai.metrics.segmentation`).

    ``pred``: label maps (after ``AsDiscreted(argmax=True)``) or logits (B, C, H, W); ``label``: (B, 1, H, W).
    """

    def __init__(self, metric: str = "dice", num_classes: int = 2, output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        if metric not in ("dice", "hd95"):
            raise KeyError(f"unknown segmentation metric '{metric}'; use 'dice' or 'hd95'")
        self.metric, self.num_classes = metric, int(num_classes)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        from tpp_monai.metrics.segmentation import SegmentationMeter

        self._meter = SegmentationMeter(self.num_classes)
        self._n = 0

    def update(self, output: Sequence[Any]) -> None:
        pred, label = output
        pred, label = _stack(pred).detach().cpu(), _stack(label).detach().cpu()
        self._meter.update(pred, label)
        self._n += pred.shape[0]

    def compute(self) -> float:
        if not self._n:
            return float("nan")
        return float(self._meter.aggregate()[self.metric])


class GradClipHandler:
    """Clip the global gradient norm of the optimiser's parameters to ``max_norm`` every iteration.

    Runs on MONAI's ``IterationEvents.BACKWARD_COMPLETED`` (after ``backward``, before ``optimizer.step``);
    with AMP the gradients are unscaled first, as PyTorch's AMP recipe for clipping does.  Must run on
    every DDP rank (the bundles list it among the first two train handlers).
    """

    def __init__(self, max_norm: float = 12.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        opt = engine.optimizer  # type: ignore[attr-defined]
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(opt)  # type: ignore[attr-defined]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


def _loss_of(output: Any) -> float | None:
    if isinstance(output, dict) and "loss" in output:
        return float(output["loss"])
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict) and "loss" in output[0]:
        return float(output[0]["loss"])
    return None


class JsonlLogger:
    """Appends ``{"stage", "kind": "loss", "iteration", "loss"}`` every ``every`` iterations and
    ``{"kind": "metrics", "epoch", "iteration", <metrics>}`` at every epoch end to ``path``.

    Attach the same logger to a trainer (losses) and its evaluator (metrics, with the trainer's
    iteration taken from ``trainer`` when given)."""

    def __init__(self, path: str | os.PathLike, stage: str = "train", every: int = 1, trainer: Engine | None = None,
                 reset: bool = True) -> None:
        self.path, self.stage, self.every, self.trainer = Path(path), stage, max(int(every), 1), trainer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if reset and self.path.exists():
            self.path.unlink()

    def _write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        loss = _loss_of(engine.state.output)
        if loss is not None:
            self._write({"stage": self.stage, "kind": "loss", "iteration": engine.state.iteration, "loss": loss})

    def _epoch(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        if metrics:
            it = self.trainer.state.iteration if self.trainer is not None else engine.state.iteration
            ep = self.trainer.state.epoch if self.trainer is not None else engine.state.epoch
            self._write({"stage": self.stage, "kind": "metrics", "epoch": ep, "iteration": it, **metrics})


class PredictionWriter:
    """Writes inference outputs at each iteration of an evaluator.

    ``kind="cls"``: rows ``path, pred, prob_0..prob_{C-1}`` into ``output_dir/predictions.csv``
    (``pred`` after softmax). ``kind="seg"``: the argmax mask of each image via MONAI
    ``SaveImage`` to ``output_dir/<name>_seg<ext>`` (``.png``: uint8 class indices; ``.nii.gz``).
    The image path comes from the batch key ``path_key`` (see :func:`tpp_monai.bundle.data.with_paths`).
    """

    def __init__(self, output_dir: str | os.PathLike, kind: str = "cls", path_key: str = "path",
                 output_ext: str = ".png", class_names: Sequence[str] | None = None) -> None:
        if kind not in ("cls", "seg"):
            raise ValueError(f"kind must be 'cls' or 'seg', got {kind!r}")
        self.output_dir, self.kind, self.path_key, self.ext = Path(output_dir), kind, path_key, output_ext
        self.class_names = list(class_names) if class_names else None
        self.csv_path = self.output_dir / "predictions.csv"
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._done)

    def _start(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.written = []
        self._rows: list[list] = []

    def _items(self, engine: Engine):
        outs, batch = engine.state.output, engine.state.batch
        if isinstance(outs, dict):  # not decollated
            outs = [{k: v[i] for k, v in outs.items() if isinstance(v, torch.Tensor)} for i in range(len(outs["pred"]))]
        if isinstance(batch, dict):
            batch = [{self.path_key: p} for p in batch.get(self.path_key, [None] * len(outs))]
        for i, o in enumerate(outs):
            path = batch[i].get(self.path_key) if i < len(batch) else None
            yield o, str(path) if path is not None else f"item_{len(self.written) + i:05d}"

    def _iteration(self, engine: Engine) -> None:
        for o, path in list(self._items(engine)):
            pred = torch.as_tensor(o["pred"]).detach().cpu().float()
            if self.kind == "cls":
                prob = torch.softmax(pred, 0) if (pred.min() < 0 or abs(float(pred.sum()) - 1) > 1e-3) else pred
                self._rows.append([path, int(prob.argmax()), *[f"{v:.6f}" for v in prob.tolist()]])
                self.written.append(path)
            else:
                if pred.shape[0] > 1:  # logits / probabilities per class
                    mask = pred.argmax(0, keepdim=True)
                elif torch.equal(pred, pred.round()):  # already a label map (post-processed by AsDiscreted)
                    mask = pred
                else:  # one foreground probability
                    mask = pred > 0.5
                self.written.append(self._save_mask(mask.to(torch.uint8), path))

    def _save_mask(self, mask: torch.Tensor, path: str) -> str:
        from monai.transforms import SaveImage

        saver = SaveImage(output_dir=str(self.output_dir), output_postfix="seg", output_ext=self.ext,
                          separate_folder=False, output_dtype=np.uint8, scale=None, resample=False,
                          print_log=False)
        mask = mask.as_subclass(torch.Tensor)  # SaveImage would name the file after a MetaTensor's own meta
        # MONAI's PNG writer expects (C, W, H) spatial order (it transposes); keep the image orientation
        saver(mask.permute(0, 2, 1) if self.ext == ".png" else mask, meta_data={"filename_or_obj": path})
        stem = Path(path).name.split(".")[0]
        return str(self.output_dir / f"{stem}_seg{self.ext}")

    def _done(self, engine: Engine) -> None:
        if self.kind == "cls":
            n = len(self._rows[0]) - 2 if self._rows else 0
            names = self.class_names or [str(c) for c in range(n)]
            with open(self.csv_path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "pred", *[f"prob_{c}" for c in names]])
                w.writerows(self._rows)
            print(f"[tpp-monai] wrote {len(self._rows)} predictions to {self.csv_path}", flush=True)
        else:
            print(f"[tpp-monai] wrote {len(self.written)} masks to {self.output_dir}", flush=True)


def save_metrics_json(engine: Engine, path: str | os.PathLike) -> dict:
    """Write the evaluator's metrics to ``path`` (JSON) and print them; returns the dict."""
    m = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, np.floating))}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(m, indent=2))
    print("[tpp-monai] metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()) + f" -> {p}", flush=True)
    return m
