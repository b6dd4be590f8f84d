"""Segmentation metrics: Dice and 95% Hausdorff distance (pixels), per class, via MONAI.

Inputs are integer label maps ``(B, H, W)`` / ``(B, 1, H, W)`` (``pred`` may also be logits or
probabilities ``(B, C, H, W)``, then ``argmax`` over C is taken), converted to one-hot with
``num_classes`` channels (background = class 0).  Scores are computed per image and per
foreground class (``include_background=False``), then averaged over images; ``"mean"`` is the
mean over foreground classes (for binary tasks it is the foreground value).

Empty-mask policy (per image and class; MONAI alone would return NaN for several of these):

============================  =============  ==========================================
ground truth / prediction      Dice           HD95
============================  =============  ==========================================
both non-empty                 usual          usual (MONAI, Euclidean, in pixels)
both empty                     1.0            0.0  (absence correctly predicted)
gt empty, pred non-empty       0.0            image diagonal (false positive, worst case)
gt non-empty, pred empty       0.0            image diagonal (missed structure, worst case)
============================  =============  ==========================================

So every image contributes finite values and misses are penalised instead of silently
dropped.  Set ``empty="nan"`` to get NaN for every case involving an empty mask instead; those
are then excluded from the means (``nanmean``), which is the MONAI ``ignore_empty`` behaviour.

Engine use (bundles): ``monai.handlers.MeanDice(include_background=False,
output_transform=from_engine(["pred", "label"]))`` and ``monai.handlers.HausdorffDistance(
include_background=False, percentile=95, output_transform=...)`` with post-transforms
``AsDiscreted(keys="pred", argmax=True, to_onehot=C)``, ``AsDiscreted(keys="label",
to_onehot=C)``.  MeanDice's default ``ignore_empty=True`` drops images with an empty ground
truth (NaN); pass ``ignore_empty=False`` to match this module's Dice (both empty -> 1,
gt empty/pred non-empty -> 0).  The HausdorffDistance handler leaves NaN/inf for empty masks;
for the paper's test numbers call :func:`segmentation_metrics` / :class:`SegmentationMeter`
on the saved predictions.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

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


def dice_hd95_per_image(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, empty: Literal["policy", "nan"] = "policy"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C-1) Dice and HD95 (pixels) for the foreground classes, empty masks handled as documented."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = to_onehot(pred, num_classes)
    y = to_onehot(label, num_classes)
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and label {tuple(y.shape)} differ")
    dice = compute_dice(p, y, include_background=False, ignore_empty=False).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, y, include_background=False, percentile=95).float()
    p_any = p[:, 1:].flatten(2).any(-1)
    y_any = y[:, 1:].flatten(2).any(-1)
    both_empty = ~p_any & ~y_any
    one_empty = p_any ^ y_any
    if empty == "nan":
        nan = torch.tensor(float("nan"))
        return torch.where(p_any & y_any, dice, nan), torch.where(p_any & y_any, hd, nan)
    diag = math.hypot(*p.shape[-2:])
    dice = torch.where(both_empty, torch.ones_like(dice), torch.where(one_empty, torch.zeros_like(dice), dice))
    hd = torch.where(both_empty, torch.zeros_like(hd), torch.where(one_empty, torch.full_like(hd, diag), hd))
    return dice, hd


class SegmentationMeter:
    """Accumulates per-image scores over batches; :meth:`aggregate` -> dict of means."""

    def __init__(self, num_classes: int, empty: Literal["policy", "nan"] = "policy",
                 class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.empty = empty
        self.class_names = class_names or [str(c) for c in range(1, num_classes)]
        self.reset()

    def reset(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._hd: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        d, h = dice_hd95_per_image(pred, label, self.num_classes, self.empty)
        self._dice.append(d)
        self._hd.append(h)

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


def segmentation_metrics(pred, label, num_classes: int = 2, empty: Literal["policy", "nan"] = "policy",
                         percent_dice: bool = False) -> dict[str, float]:
    """One-shot :class:`SegmentationMeter`: ``{"dice", "hd95", "dice_<c>", "hd95_<c>"}``."""
    m = SegmentationMeter(num_classes, empty)
    m.update(pred, label)
    return m.aggregate(percent_dice)
