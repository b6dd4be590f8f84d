"""Segmentation metrics as MedCoSS (and so the TPP paper) computes them: Dice and HD95 in pixels.

Inputs are integer label maps ``(B, H, W)`` / ``(B, 1, H, W)`` (``pred`` may also be logits or
probabilities ``(B, C, H, W)``, then ``argmax`` over C is taken), converted to one-hot with
``num_classes`` channels (background = class 0).  Scores are computed per image and per
foreground class, then averaged over images; ``"mean"`` is the mean over foreground classes
(for binary tasks it is the foreground value).

HD95 (default ``hd="medpy"``): medpy's ``hd95`` as MedCoSS's ``evaluate.py`` calls it (spacing 1):
the surface of a mask is the mask minus its erosion by the 4-connected cross (pixels on the image
edge count as surface); the directed surface distances pred->gt and gt->pred (Euclidean distance
transform) are **pooled** and their 95th percentile (numpy's linear interpolation) is taken.
``hd="monai"`` keeps the former definition (MONAI ``compute_hausdorff_distance(percentile=95)``:
the larger of the two directed 95th percentiles, on MONAI's edges), not the paper's.

Empty masks (per image and class), ``empty="medcoss"`` (default, MedCoSS ``compute_HD95`` /
``dice_score``):

============================  =============  ==========================================
ground truth / prediction      Dice           HD95
============================  =============  ==========================================
both non-empty                 usual          usual (pixels)
both empty                     1.0            0.0
exactly one empty              0.0            500.0 (MedCoSS's constant)
============================  =============  ==========================================

``empty="diagonal"`` (alias ``"policy"``, the former default) uses the image diagonal instead of
500; ``empty="nan"`` gives NaN for every case involving an empty mask, then excluded from the
means (``nanmean``), which is the MONAI ``ignore_empty`` behaviour.

Engine use (bundles): :class:`tpp_monai.bundle.SegmentationMetric` (this module's defaults).
MONAI's ``HausdorffDistance`` handler computes the ``hd="monai"`` variant and leaves NaN/inf for
empty masks: do not use it for the paper's numbers.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Literal, Sequence

import numpy as np
import torch


def to_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map (B, H, W) / (B, 1, H, W), or scores (B, C, H, W) -> one-hot (B, C, H, W) float."""
    x = torch.as_tensor(x)
    if x.ndim == 4 and x.shape[1] == num_classes and num_classes > 1 and x.is_floating_point():
        x = x.argmax(1)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected a label map (B, 1, H, W) or scores with {num_classes} channels, got {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    x = x.long()
    if x.numel() and (x.min() < 0 or x.max() >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}), got [{int(x.min())}, {int(x.max())}]")
    return torch.nn.functional.one_hot(x, num_classes).permute(0, 3, 1, 2).float()


#: HD95 that MedCoSS's evaluation assigns when exactly one of prediction / ground truth is empty.
MEDCOSS_EMPTY_HD95 = 500.0

EmptyPolicy = Literal["medcoss", "diagonal", "policy", "nan"]
HDMethod = Literal["medpy", "monai"]


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances from every surface pixel of ``a`` to the surface of ``b`` (medpy ``__surface_distances``,
    connectivity 1).  Both masks must be non-empty."""
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks")
    cross = generate_binary_structure(a.ndim, 1)
    a_border = a ^ binary_erosion(a, structure=cross, iterations=1)
    b_border = b ^ binary_erosion(b, structure=cross, iterations=1)
    return distance_transform_edt(~b_border, sampling=spacing)[a_border]


def hd95_medpy(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """medpy ``hd95(pred, ref)``: 95th percentile of the pooled directed surface distances."""
    return float(np.percentile(np.hstack((surface_distances(pred, ref, spacing),
                                          surface_distances(ref, pred, spacing))), 95))


def _hd95_monai(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_hausdorff_distance(p, y, include_background=False, percentile=95).float()


def dice_hd95_per_image(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, empty: EmptyPolicy = "medcoss",
    hd: HDMethod = "medpy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C-1) Dice and HD95 (pixels) for the foreground classes, empty masks handled as documented."""
    from monai.metrics import compute_dice

    if empty not in ("medcoss", "diagonal", "policy", "nan"):
        raise ValueError(f"empty must be 'medcoss', 'diagonal' or 'nan', got {empty!r}")
    if hd not in ("medpy", "monai"):
        raise ValueError(f"hd must be 'medpy' (the paper's) or 'monai', got {hd!r}")
    p = to_onehot(pred, num_classes)
    y = to_onehot(label, num_classes)
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and label {tuple(y.shape)} differ")
    dice = compute_dice(p, y, include_background=False, ignore_empty=False).float()
    p_any = p[:, 1:].flatten(2).any(-1)
    y_any = y[:, 1:].flatten(2).any(-1)
    both = p_any & y_any
    if hd == "monai":
        hd95 = _hd95_monai(p, y)
    else:
        hd95 = torch.full(dice.shape, float("nan"))
        pn, yn = p[:, 1:].bool().numpy(), y[:, 1:].bool().numpy()
        for b, c in zip(*np.nonzero(both.numpy())):
            hd95[b, c] = hd95_medpy(pn[b, c], yn[b, c])
    if empty == "nan":
        nan = torch.tensor(float("nan"))
        return torch.where(both, dice, nan), torch.where(both, hd95, nan)
    both_empty = ~p_any & ~y_any
    one_empty = p_any ^ y_any
    worst = MEDCOSS_EMPTY_HD95 if empty == "medcoss" else math.hypot(*p.shape[-2:])
    dice = torch.where(both_empty, torch.ones_like(dice), torch.where(one_empty, torch.zeros_like(dice), dice))
    hd95 = torch.where(both_empty, torch.zeros_like(hd95), torch.where(one_empty, torch.full_like(hd95, worst), hd95))
    return dice, hd95


class SegmentationMeter:
    """Accumulates per-image scores over batches; :meth:`aggregate` -> dict of means."""

    def __init__(self, num_classes: int, empty: EmptyPolicy = "medcoss",
                 class_names: list[str] | None = None, hd: HDMethod = "medpy") -> None:
        self.num_classes = num_classes
        self.empty = empty
        self.hd = hd
        self.class_names = class_names or [str(c) for c in range(1, num_classes)]
        self.reset()

    def reset(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._hd: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        d, h = dice_hd95_per_image(pred, label, self.num_classes, self.empty, self.hd)
        self._dice.append(d)
        self._hd.append(h)

    def __len__(self) -> int:
        """Images scored so far."""
        return sum(len(d) for d in self._dice)

    def gathered(self) -> "SegmentationMeter":
        """A meter with the same settings holding every DDP rank's per-image scores (uneven shards of
        ``DistributedSampler(even_divisible=False)``); a collective: every rank calls it, also with no image.
        Outside DDP it holds this meter's scores."""
        from tpp_monai.engines.distributed import gather_rows

        out = copy.copy(self)
        empty = torch.zeros(0, self.num_classes - 1)
        out._dice = [gather_rows(torch.cat(self._dice) if self._dice else empty)]
        out._hd = [gather_rows(torch.cat(self._hd) if self._hd else empty)]
        return out

    def aggregate(self, percent_dice: bool = False) -> dict[str, float]:
        if not self._dice:
            raise RuntimeError("SegmentationMeter.aggregate() called before update()")
        d = torch.cat(self._dice).numpy()
        h = torch.cat(self._hd).numpy()
        k = 100.0 if percent_dice else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dc, hc = np.nanmean(d, 0), np.nanmean(h, 0)
        out = {"dice": float(k * np.nanmean(dc)), "hd95": float(np.nanmean(hc))}
        for name, dv, hv in zip(self.class_names, dc, hc):
            out[f"dice_{name}"] = float(k * dv)
            out[f"hd95_{name}"] = float(hv)
        return out


def segmentation_metrics(pred, label, num_classes: int = 2, empty: EmptyPolicy = "medcoss",
                         percent_dice: bool = False, hd: HDMethod = "medpy") -> dict[str, float]:
    """One-shot :class:`SegmentationMeter`: ``{"dice", "hd95", "dice_<c>", "hd95_<c>"}``."""
    m = SegmentationMeter(num_classes, empty, hd=hd)
    m.update(pred, label)
    return m.aggregate(percent_dice)
