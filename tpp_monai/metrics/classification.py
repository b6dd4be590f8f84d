"""Classification metrics as reported in the TPP paper: ACC, AUC, macro F1 (fractions in [0, 1]).

Inputs: ``y_true`` integer labels (N,) and ``y_score`` class probabilities (N, C) (softmax
outputs; logits work for AUC, which only needs the ranking, but not for anything else) or, for
binary tasks, (N,) scores of the positive class.  Predictions are ``argmax`` of ``y_score``.

* ACC: fraction of correct argmax predictions.
* AUC: binary -> ROC AUC of the positive-class score; multi-class -> one-vs-rest ROC AUC
  averaged over classes (macro), computed with MONAI ``compute_roc_auc(average="macro")`` on
  one-hot labels.  A class absent from ``y_true`` has no defined AUC: it is skipped (MONAI
  warns and returns NaN for it) and the mean is over the remaining classes.
* F1: macro F1 (``sklearn.metrics.f1_score(average="macro", zero_division=0)``).

Engine use (MONAI/ignite handlers; bundles):
* ``monai.handlers.ROCAUC(average="macro", output_transform=from_engine(["pred", "label"]))``
  with post-transforms ``Activationsd(keys="pred", softmax=True)`` and
  ``AsDiscreted(keys="label", to_onehot=C)``: matches :func:`auc` (binary: C=2 one-hot gives
  the same value as the positive-class AUC).
* ``ignite.metrics.Accuracy(output_transform=...)`` on (probabilities, integer labels) matches :func:`accuracy`.
* MONAI ``ConfusionMatrix(metric_name="f1 score")`` computes per-class F1 with *micro-style*
  reductions by default and does not equal macro F1; use :class:`EpochClassificationMetric`
  (an ignite ``EpochMetric``) with ``metric="f1"`` (or "acc", "auc") instead, e.g. in a bundle:
  ``{"_target_": "tpp_monai.metrics.classification.EpochClassificationMetric", "metric": "f1",
  "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}`` attached by
  ``monai.handlers.IgniteMetricHandler`` or used directly as a key metric.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return torch.stack([t.detach().cpu() for t in x]).numpy()
    return np.asarray(x)


def _labels(y_true) -> np.ndarray:
    y = _np(y_true)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(1)
    return y.reshape(-1).astype(np.int64)


def _scores(y_score) -> np.ndarray:
    s = _np(y_score).astype(np.float64)
    if s.ndim == 1:  # binary positive-class scores
        s = np.stack([1.0 - s, s], 1)
    return s


def predictions(y_score) -> np.ndarray:
    return _scores(y_score).argmax(1)


def accuracy(y_true, y_score) -> float:
    y = _labels(y_true)
    return float((predictions(y_score) == y).mean())


def auc(y_true, y_score) -> float:
    from monai.metrics import compute_roc_auc

    y = _labels(y_true)
    s = _scores(y_score)
    if s.shape[1] == 2:
        return float(compute_roc_auc(torch.from_numpy(s[:, 1]), torch.from_numpy(y)))
    present = [c for c in range(s.shape[1]) if 0 < (y == c).sum() < len(y)]
    onehot = np.eye(s.shape[1])[y][:, present]
    return float(compute_roc_auc(torch.from_numpy(s[:, present]), torch.from_numpy(onehot), average="macro"))


def macro_f1(y_true, y_score) -> float:
    from sklearn.metrics import f1_score

    s = _scores(y_score)
    return float(f1_score(_labels(y_true), s.argmax(1), average="macro", labels=list(range(s.shape[1])),
                          zero_division=0))


METRICS: dict[str, Callable] = {"acc": accuracy, "auc": auc, "f1": macro_f1}


def classification_metrics(y_true, y_score, percent: bool = False) -> dict[str, float]:
    """``{"acc", "auc", "f1"}``; ``percent=True`` multiplies by 100 (the paper's tables)."""
    k = 100.0 if percent else 1.0
    return {name: k * fn(y_true, y_score) for name, fn in METRICS.items()}


try:  # ignite is part of monai[ignite]; keep this module importable without it
    from ignite.metrics import EpochMetric as _EpochMetric
except ImportError:  # pragma: no cover
    _EpochMetric = object  # type: ignore[misc,assignment]


class EpochClassificationMetric(_EpochMetric):  # type: ignore[misc,valid-type]
    """ignite ``EpochMetric`` computing ``metric`` ("acc", "auc", "f1") over the whole epoch.

    ``output_transform`` must return ``(y_pred, y)``: probabilities (B, C) (lists of (C,) tensors
    from ``from_engine`` are fine) and integer or one-hot labels.
    """

    def __init__(self, metric: str = "f1", output_transform: Callable = lambda x: x, device="cpu") -> None:
        if metric not in METRICS:
            raise KeyError(f"unknown metric '{metric}'; choose from {sorted(METRICS)}")
        fn = METRICS[metric]
        super().__init__(lambda p, t: fn(t, p), output_transform=self._stack(output_transform),
                         check_compute_fn=False, device=device)

    @staticmethod
    def _stack(transform: Callable) -> Callable:
        def f(output):
            p, y = transform(output)
            if isinstance(p, (list, tuple)):
                p = torch.stack([torch.as_tensor(t) for t in p])
            if isinstance(y, (list, tuple)):
                y = torch.stack([torch.as_tensor(t) for t in y])
            y = torch.as_tensor(y)
            if y.ndim == 2 and y.shape[1] > 1:
                y = y.argmax(1)
            return p.float(), y.reshape(-1).long()

        return f
