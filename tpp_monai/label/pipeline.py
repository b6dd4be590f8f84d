"""MONAI dictionary transforms and an ignite handler that put :mod:`tpp_monai.label.seg2d` into MONAI Label's
``BasicInferTask`` / ``BasicTrainTask`` pipelines (pre-transforms, post-transforms, best-model keeping).

Images are read by :func:`seg2d.read_image_2d` (PNG upright as PIL reads it, 2D NIfTI / NRRD slices
transposed to the same row/column order), so a PNG and the label 3D Slicer saves for it line up; pixels
go to [0, 1] and ``img_size`` x ``img_size`` exactly as in :func:`seg2d.to_model_input`. Nothing here
imports ``monailabel``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Mapping

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform
from torch import nn

from tpp_monai.label import seg2d


class LoadSeg2Dd(MapTransform):
    """Read ``image`` (and ``label`` when present) into model tensors; keep what the writer needs.

    ``image`` -> (in_chans, S, S) float in [0, 1]; ``label`` -> (1, S, S) long (nearest); the original
    (H, W) goes to ``image_shape`` and the file format / affine to ``image_info`` (as PNG or NIfTI back).
    A label whose size differs from its image, or has a class the model lacks, is refused naming the file.
    """

    def __init__(self, img_size: int, in_chans: int, num_classes: int, max_pixels: int | None = None,
                 image_key: str = "image", label_key: str = "label") -> None:
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.img_size, self.in_chans, self.num_classes = int(img_size), int(in_chans), int(num_classes)
        self.max_pixels, self.image_key, self.label_key = max_pixels, image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        path = d[self.image_key]
        arr, info = seg2d.read_image_2d(path, max_pixels=self.max_pixels)
        d[self.image_key] = seg2d.to_model_input(arr, self.img_size, self.in_chans)
        d["image_shape"] = tuple(int(s) for s in arr.shape[:2])
        d["image_info"] = {k: v for k, v in info.items()}
        if isinstance(d.get(self.label_key), (str, bytes)) or hasattr(d.get(self.label_key), "__fspath__"):
            lbl, _ = seg2d.read_image_2d(d[self.label_key], max_pixels=self.max_pixels)
            if lbl.shape[:2] != arr.shape[:2]:
                raise ValueError(f"label {d[self.label_key]} is {lbl.shape[:2]} but its image {path} is {arr.shape[:2]}: "
                                 "save the label on the image it belongs to (same size)")
            seg2d.check_label_classes(lbl, self.num_classes, d[self.label_key])
            d[self.label_key] = seg2d.to_model_label(lbl, self.img_size, self.num_classes)
        return d


class RestoreSeg2Dd(MapTransform):
    """Class probabilities (C, S, S) -> (H, W) uint8 class-index mask at the input's size (``image_shape``).

    The probabilities are resized bilinearly before the argmax, as :func:`seg2d.predict` does.
    """

    def __init__(self, key: str = "pred", shape_key: str = "image_shape") -> None:
        super().__init__([key])
        self.key, self.shape_key = key, shape_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        p = torch.as_tensor(d[self.key]).float()
        p = F.interpolate(p[None], size=tuple(d[self.shape_key]), mode="bilinear", align_corners=False)[0]
        d[self.key] = p.argmax(0).to(torch.uint8).cpu().numpy()
        return d


class KeepBestTrainable:
    """Ignite handler: snapshot the trainable tensors (target parameters + decoder) at each new best metric.

    Attach to the evaluator (``EPOCH_COMPLETED``; or to the trainer when there is no validation split).
    MONAI Label's own checkpoint savers store the whole network in its own format; the label app publishes
    only what :func:`seg2d.save_model` stores, from the best epoch, once training has finished cleanly.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = 0
        self.metric: float | None = None

    def __call__(self, engine: Any) -> None:
        # MONAI's workflow updates best_metric / best_metric_epoch in its own EPOCH_COMPLETED handler, registered
        # before this one; an evaluator run by ValidationHandler counts the trainer's epochs
        st = engine.state
        best_epoch = getattr(st, "best_metric_epoch", -1)
        if self.state is None or best_epoch in (-1, st.epoch):
            self.state = seg2d.trainable_state_dict(self.network)
            self.epoch = int(st.epoch)
            m = getattr(st, "best_metric", -1)
            self.metric = float(m) if best_epoch != -1 else None

    def restore(self) -> None:
        """Load the kept tensors back into the network (before publishing)."""
        if self.state is not None:
            self.network.load_state_dict(self.state, strict=False)


class StageProgress:
    """Ignite handler for the TPP engine: reports progress where MONAI Label clients look (``train_stats``).

    MONAI Label writes ``train_stats`` only from the fine-tuning engine, so during TPP 3D Slicer saw the
    previous run's stats (or none) and its bar sat at 1%. This writes, at the start and after every TPP
    epoch, ``epoch`` / ``total_epochs`` counted over the whole run (TPP epochs + fine-tuning epochs: the
    bar moves once, from 0 to 100%), ``stage`` ("tpp"), ``stage_epoch`` / ``stage_epochs``, ``start_ts``,
    ``current_time`` (no ``total_time``: Slicer reads its presence as "finished") and the last pretext loss.
    """

    def __init__(self, write: Callable[[dict], None], stage_epochs: int, total_epochs: int, offset: int = 0,
                 stage: str = "tpp", start_ts: float | None = None) -> None:
        self.write, self.stage, self.stage_epochs = write, stage, int(stage_epochs)
        self.total_epochs, self.offset = int(total_epochs), int(offset)
        self.start_ts = time.time() if start_ts is None else float(start_ts)

    def stats(self, done_epochs: int, loss: float | None = None) -> dict:
        secs = int(time.time() - self.start_ts)
        out = {"stage": self.stage, "epoch": self.offset + int(done_epochs), "total_epochs": self.total_epochs,
               "stage_epoch": int(done_epochs), "stage_epochs": self.stage_epochs, "start_ts": int(self.start_ts),
               "current_time": f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"}
        if loss is not None:
            out[f"{self.stage}_loss"] = loss
        return out

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        st = engine.state
        out = st.output
        loss = out.get("loss") if isinstance(out, Mapping) else out
        try:
            loss = float(loss) if loss is not None else None
        except (TypeError, ValueError):
            loss = None
        self.write(self.stats(int(st.epoch), loss))
