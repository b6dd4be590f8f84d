"""Ignite handlers / metrics the bundles wire in by ``_target_``.

* :class:`SegmentationMetric`: Dice or HD95 (pixels) with the empty-mask policy of
  :mod:`tpp_monai.metrics.segmentation` (every image contributes a finite value).
* :class:`JsonlLogger`: appends the training loss per iteration and the metrics per epoch to a
  JSON-lines file (the demo draws its curves from it).
* :class:`GradClipHandler`: gradient-norm clipping between backward and the optimiser step (MedCoSS
  fine-tunes with ``clip_grad_norm_(model.parameters(), 12)``).
* :class:`PredictionWriter`: classification inference outputs as a CSV of class probabilities
  (segmentation masks are written by :class:`tpp_monai.bundle.SaveMaskd` in the inference postprocessing).
* :class:`AtomicCheckpointSaver`: MONAI ``CheckpointSaver`` whose files (``models/model.pt``) are
  written atomically and never hold NaN/Inf (a kill mid-save keeps the previous good model).
* :class:`CheckedCheckpointLoader`: MONAI ``CheckpointLoader`` that names a missing, empty or
  truncated ``model.pt`` and the fix (instead of a bare ``EOFError``).
* :class:`StopOnNonFiniteLoss`: stops fine-tuning at the first NaN/Inf loss, naming likely causes.
* :class:`OutputFolderLock`: one run per bundle output folder (:mod:`tpp_monai.runlock`).
* :class:`LearningCurves`: fine-tuning's loss / validation-metric curves as PNG + the plotted numbers as CSV.
* :class:`EvaluationFigures`: a confusion matrix (classification) or prediction overlays (segmentation) as PNG.

Every file written here (metrics, predictions, figures) is written atomically; figures use matplotlib's headless Agg.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from ignite.metrics import Metric
from monai.handlers import CheckpointLoader, CheckpointSaver

from tpp_monai.safe_io import atomic_save, atomic_write, check_checkpoint_file, non_finite_tensors
from tpp_monai.runlock import OutputLock


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

    def update(self, output: Sequence[Any]) -> None:
        pred, label = output
        self._meter.update(_stack(pred).detach().cpu(), _stack(label).detach().cpu())

    def compute(self) -> float:
        """Mean over every rank's validation images (uneven DDP shards gathered); NaN with no image."""
        meter = self._meter.gathered()
        return float(meter.aggregate()[self.metric]) if len(meter) else float("nan")


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
        self.reset, self._fresh = reset, True

    def _write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _start(self, engine: Engine) -> None:
        """A fresh run starts a new file (once it runs, i.e. holding the output-folder lock); a resumed one appends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._fresh and self.reset and engine.state.iteration == 0 and self.path.exists():
            self.path.unlink()
        self._fresh = False

    def keep_until(self, iteration: int, epoch: int) -> None:
        """A resumed run continues after ``iteration`` with ``epoch`` epochs done: drop the killed run's records
        past that point (atomically) and append from now on, so each iteration and epoch is logged once."""
        self._fresh = False
        if not self.path.is_file():
            return
        kept = [ln for ln in self.path.read_text().splitlines(keepends=True)
                if ln.strip() and _record_kept(ln, iteration, epoch)]
        atomic_write(self.path, "".join(kept))

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


def _record_kept(line: str, iteration: int, epoch: int) -> bool:
    """Epoch records (metrics) by their epoch, loss records by their iteration; unreadable lines are kept."""
    try:
        rec = json.loads(line)
        return int(rec["epoch"]) <= epoch if "epoch" in rec else int(rec.get("iteration", 0)) <= iteration
    except (ValueError, AttributeError, TypeError, KeyError):
        return True


class PredictionWriter:
    """Writes classification predictions at each iteration of an evaluator: rows
    ``path, pred, prob_0..prob_{C-1}`` into ``output_dir/predictions.csv`` (``pred`` after softmax),
    written atomically when the run completes. The image path comes from the batch key ``path_key``
    (:func:`tpp_monai.bundle.inference_inputs` puts it there). Segmentation masks are written by the inference
    ``postprocessing`` instead (:class:`tpp_monai.bundle.SaveMaskd`, a MONAI ``SaveImaged``).
    """

    def __init__(self, output_dir: str | os.PathLike, kind: str = "cls", path_key: str = "path",
                 class_names: Sequence[str] | None = None) -> None:
        if kind != "cls":
            raise ValueError(f"PredictionWriter writes classification predictions only (kind='cls'), got "
                             f"kind={kind!r}; segmentation masks are written by tpp_monai.bundle.SaveMaskd in "
                             f"the inference postprocessing (see bundles/common/inference.json)")
        self.output_dir, self.kind, self.path_key = Path(output_dir), kind, path_key
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
            prob = torch.softmax(pred, 0) if (pred.min() < 0 or abs(float(pred.sum()) - 1) > 1e-3) else pred
            self._rows.append([path, int(prob.argmax()), *[f"{v:.6f}" for v in prob.tolist()]])
            self.written.append(path)

    def _done(self, engine: Engine) -> None:
        n = len(self._rows[0]) - 2 if self._rows else 0
        names = self.class_names or [str(c) for c in range(n)]
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["path", "pred", *[f"prob_{c}" for c in names]])
        w.writerows(self._rows)
        atomic_write(self.csv_path, buf.getvalue())
        print(f"[tpp-monai] wrote {len(self._rows)} predictions to {self.csv_path}", flush=True)


def save_metrics_json(engine: Engine, path: str | os.PathLike) -> dict:
    """Write the evaluator's metrics to ``path`` (JSON) and print them; returns the dict."""
    m = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, np.floating))}
    p = atomic_write(path, json.dumps(m, indent=2))
    print("[tpp-monai] metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()) + f" -> {p}", flush=True)
    return m


class NonFiniteModelError(FloatingPointError):
    """A model about to be saved holds NaN/Inf: it is not written (the previous file stays)."""


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: atomic ``torch.save``; refuses NaN/Inf; a fixed ``filename`` is replaced in
    place (ignite's remove-then-save would leave no model between the two steps)."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        path = self.dirname / (self.filename or filename)
        bad = non_finite_tensors(checkpoint)
        if bad:
            raise NonFiniteModelError(
                f"not saving {path}: {len(bad)} tensor(s) hold NaN/Inf (e.g. {', '.join(bad[:3])}); the previous "
                f"file is kept. {NON_FINITE_CAUSES}")
        atomic_save(checkpoint, path)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments) writing through :class:`_AtomicDiskSaver`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _AtomicDiskSaver(self.save_dir, getattr(ckpt.save_handler, "filename", None))


NON_FINITE_CAUSES = (
    "Likely causes: NaN/Inf pixels in an input image (check the dataset; a corrupt or 16-bit file), a backbone "
    "or TPP checkpoint that already holds NaN (a warning names it when loaded), or a learning rate too high for "
    "this method (lower --lr)."
)


class StopOnNonFiniteLoss:
    """Raises ``FloatingPointError`` at the first NaN/Inf training loss (ignite's ``TerminateOnNan``
    would end the run with exit 0 and let the NaN model be saved)."""

    def __init__(self, output_transform: Callable = lambda out: _loss_of(out)) -> None:
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if loss is not None and not np.isfinite(float(loss)):
            raise FloatingPointError(
                f"training loss is {float(loss)} at iteration {engine.state.iteration}; stopping (no model saved "
                f"from this point). {NON_FINITE_CAUSES}")


class OutputFolderLock:
    """Locks ``folder`` (the bundle root) while the engine runs: a second run into it is refused naming
    the PID of the first (the lock of a killed run is taken over)."""

    def __init__(self, folder: str | os.PathLike, what: str = "bundle run") -> None:
        self.lock = OutputLock(folder, what=what)

    def attach(self, engine: Engine) -> None:
        """Locks at once (the trainer is being built, before any handler writes a file)."""
        self.lock.acquire()
        engine.add_event_handler(Events.STARTED, lambda e: self.lock.acquire())
        engine.add_event_handler(Events.COMPLETED, lambda e: self.lock.release())


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` (same arguments) checking the file first (see module docstring)."""

    def __call__(self, engine: Engine) -> None:
        path = Path(self.load_path)
        if not path.is_file():
            raise FileNotFoundError(f"model checkpoint not found: {path}. Train the bundle first (stage 3 writes "
                                    "models/model.pt) or pass --model_ckpt /path/to/model.pt.")
        check_checkpoint_file(path, "model checkpoint")
        super().__call__(engine)


# ------------------------------------------------------------------------------------------------ figures
def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> None:
    """PNG written atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue  # a line being appended right now
    return out


class LearningCurves:
    """Fine-tuning's loss and validation-metric curves as ``<out_dir>/curves.png``, with the plotted numbers in
    ``curves.csv`` beside it (rows ``stage,kind,epoch,iteration,name,value``), redrawn as training goes.

    Why: people look at a picture, not at jsonl. The numbers are read back from the :class:`JsonlLogger` files
    (``train_log`` losses, ``val_log`` metrics), so the figure shows exactly what was logged. Rank 0 only."""

    def __init__(self, train_log: str | os.PathLike, val_log: str | os.PathLike, out_dir: str | os.PathLike,
                 title: str = "fine-tuning", every: int = 1) -> None:
        self.train_log, self.val_log, self.out_dir, self.title = Path(train_log), Path(val_log), Path(out_dir), title
        self.every = max(int(every), 1)

    def attach(self, engine: Engine) -> None:
        """Redrawn every ``every`` epochs (the bundles: every validation) and at the end of the run."""
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def rows(self) -> list[dict]:
        rows = []
        for rec in _read_jsonl(self.train_log) + _read_jsonl(self.val_log):
            if rec.get("kind") == "loss":
                rows.append({"stage": rec.get("stage", "train"), "kind": "loss", "epoch": "",
                             "iteration": rec["iteration"], "name": "loss", "value": rec["loss"]})
            elif rec.get("kind") == "metrics":
                for k, v in rec.items():
                    if k not in ("stage", "kind", "epoch", "iteration"):
                        rows.append({"stage": rec.get("stage", "validation"), "kind": "metric", "epoch": rec["epoch"],
                                     "iteration": rec["iteration"], "name": k, "value": v})
        return rows

    def __call__(self, engine: Engine | None = None) -> None:
        if not _is_rank0():
            return
        rows = self.rows()
        if not rows:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["stage", "kind", "epoch", "iteration", "name", "value"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.out_dir / "curves.csv", buf.getvalue())
        plt = _pyplot()
        names = sorted({r["name"] for r in rows if r["kind"] == "metric"})
        fig, axes = plt.subplots(1, 1 + bool(names), figsize=(5 + 5 * bool(names), 3.6), squeeze=False)
        loss = [(r["iteration"], r["value"]) for r in rows if r["kind"] == "loss"]
        ax = axes[0][0]
        if loss:
            ax.plot(*zip(*loss), lw=1)
        ax.set(xlabel="iteration", ylabel="training loss", title=f"{self.title}: loss")
        if names:
            ax = axes[0][1]
            for n in names:
                pts = [(r["iteration"], r["value"]) for r in rows if r["name"] == n and r["kind"] == "metric"]
                ax.plot(*zip(*pts), marker="o", label=n)
            ax.set(xlabel="iteration", ylabel="validation metric", title=f"{self.title}: validation")
            ax.legend()
        _save_figure(fig, self.out_dir / "curves.png")


def _as_index(x: Any) -> torch.Tensor:
    """A prediction or label as class indices: probabilities / one-hot (C, ...) -> argmax over C."""
    t = torch.as_tensor(x).detach().cpu()
    if t.ndim >= 1 and t.shape[0] > 1 and (t.ndim == 1 or t.ndim >= 3):
        return t.argmax(0)
    return t.reshape(t.shape[1:]) if t.ndim >= 1 and t.shape[0] == 1 else t


class EvaluationFigures:
    """Pictures of an evaluation: a confusion matrix (classification: ``confusion_matrix.png`` +
    ``confusion_matrix.csv`` of counts, rows = true class, columns = predicted) or prediction overlays
    (segmentation: ``overlay_<i>.png`` of the first ``max_overlays`` images: image, ground truth, prediction).

    Attach to an evaluator whose output items hold ``image``, ``label`` and ``pred`` (after postprocessing).
    Rank 0 writes; under DDP validation (multi_gpu.json attaches validate handlers on rank 0 only) the figures show
    rank 0's shard of the images, the metrics stay those of all ranks. Every file is written atomically."""

    def __init__(self, out_dir: str | os.PathLike, task: str, num_classes: int, class_names: Sequence[str] | None = None,
                 max_overlays: int = 4) -> None:
        if task not in ("cls", "seg"):
            raise ValueError(f"EvaluationFigures task must be 'cls' or 'seg', got {task!r}")
        self.out_dir, self.task, self.num_classes = Path(out_dir), task, int(num_classes)
        self.class_names = list(class_names or [str(i) for i in range(self.num_classes)])
        self.max_overlays = int(max_overlays)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine | None = None) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _collect(self, engine: Engine) -> None:
        items = engine.state.output
        items = items if isinstance(items, (list, tuple)) else [items]
        for it in items:
            pred, label = _as_index(it["pred"]), _as_index(it["label"])
            if self.task == "cls":
                self.confusion[int(label), int(pred)] += 1
            elif len(self.overlays) < self.max_overlays:
                img = torch.as_tensor(it["image"]).detach().cpu().float()
                img = img.permute(1, 2, 0) if img.shape[0] == 3 else img[0]
                lo, hi = float(img.min()), float(img.max())
                self.overlays.append((((img - lo) / max(hi - lo, 1e-8)).numpy(), label.numpy(), pred.numpy()))

    def _write(self, engine: Engine | None = None) -> None:
        if not _is_rank0():
            return
        if self.task == "cls":
            self._write_confusion()
        else:
            self._write_overlays()

    def _write_confusion(self) -> None:
        cm = self.confusion.numpy()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["true \\ predicted", *self.class_names])
        for name, row in zip(self.class_names, cm):
            w.writerow([name, *row.tolist()])
        atomic_write(self.out_dir / "confusion_matrix.csv", buf.getvalue())
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * self.num_classes, 1 + 0.7 * self.num_classes))
        ax.imshow(cm, cmap="Blues")
        for i in range(self.num_classes):
            for j in range(self.num_classes):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(self.num_classes), self.class_names, rotation=45, ha="right")
        ax.set_yticks(range(self.num_classes), self.class_names)
        ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({int(cm.sum())} images)")
        _save_figure(fig, self.out_dir / "confusion_matrix.png")

    def _write_overlays(self) -> None:
        from numpy import ma

        plt = _pyplot()
        for i, (img, label, pred) in enumerate(self.overlays):
            fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
            for ax, mask, title in zip(axes, (None, label, pred), ("image", "ground truth", "prediction")):
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
                if mask is not None:
                    ax.imshow(ma.masked_equal(mask, 0), cmap="tab10", vmin=0, vmax=9, alpha=0.45,
                              interpolation="nearest")
                ax.set_title(title)
                ax.axis("off")
            _save_figure(fig, self.out_dir / f"overlay_{i}.png")
