"""Classification metrics as reported in the TPP paper: ACC, AUC, macro F1 (fractions in [0, 1]).

Inputs: ``y_true`` integer labels (N,) and ``y_score`` class probabilities (N, C) (softmax
outputs; logits work for AUC, which only needs the ranking, but not for anything else) or, for
binary tasks, (N,) scores of the positive class.  Predictions are ``argmax`` of ``y_score``.

* ACC: fraction of correct argmax predictions.
* AUC (the paper's, as MedCoSS computes it: ``sklearn.metrics.roc_auc_score(y, p,
  multi_class="ovo", average="macro")``): binary -> ROC AUC of the positive-class score;
  multi-class -> **one-vs-one** macro AUC (Hand & Till 2001): for every pair of classes (j, k) the
  mean of AUC(j vs k, scored by p_j) and AUC(k vs j, scored by p_k) on the samples of j and k only,
  averaged over pairs.  A pair with an absent class has no defined AUC and is skipped.
  The former definition, one-vs-rest macro (MONAI ``compute_roc_auc``), stays available as
  :func:`auc_ovr` / metric name ``"auc_ovr"``; it is *not* what the paper reports.
* F1: macro F1 (``sklearn.metrics.f1_score(average="macro", zero_division=0)``).

Engine use (MONAI/ignite handlers; bundles):
* ``monai.handlers.ROCAUC(average="macro", output_transform=from_engine(["pred", "label"]))``
  with post-transforms ``Activationsd(keys="pred", softmax=True)`` and
  ``AsDiscreted(keys="label", to_onehot=C)``: matches :func:`auc_ovr` only (one-vs-rest), so the
  bundles use :class:`EpochClassificationMetric` with ``metric="auc"`` (one-vs-one) instead.
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


def _binary_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties count 1/2."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc(y_true, y_score) -> float:
    """The paper's AUC: binary ROC AUC, or one-vs-one macro AUC for more than two classes (MedCoSS)."""
    y = _labels(y_true)
    s = _scores(y_score)
    if s.shape[1] == 2:
        pos, neg = s[y == 1, 1], s[y == 0, 1]
        return _binary_auc(pos, neg) if len(pos) and len(neg) else float("nan")
    pair_aucs = []
    for j in range(s.shape[1]):
        for k in range(j + 1, s.shape[1]):
            in_j, in_k = y == j, y == k
            if not in_j.any() or not in_k.any():
                continue
            a_jk = _binary_auc(s[in_j, j], s[in_k, j])
            a_kj = _binary_auc(s[in_k, k], s[in_j, k])
            pair_aucs.append((a_jk + a_kj) / 2)
    return float(np.mean(pair_aucs)) if pair_aucs else float("nan")


def auc_ovr(y_true, y_score) -> float:
    """One-vs-rest macro AUC (MONAI ``compute_roc_auc``); absent classes skipped. Not the paper's metric."""
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


#: The paper's metrics (what :func:`classification_metrics` and the bundles report).
METRICS: dict[str, Callable] = {"acc": accuracy, "auc": auc, "f1": macro_f1}


def acc_auc_f1(y_true, y_score) -> float:
    """ACC + AUC + F1: MedCoSS's model-selection score on the validation set (best epoch = highest sum)."""
    return accuracy(y_true, y_score) + auc(y_true, y_score) + macro_f1(y_true, y_score)


#: Every metric available by name (``EpochClassificationMetric(metric=...)``), the paper's and alternatives.
ALL_METRICS: dict[str, Callable] = {**METRICS, "auc_ovr": auc_ovr, "acc_auc_f1": acc_auc_f1}


def classification_metrics(y_true, y_score, percent: bool = False) -> dict[str, float]:
    """``{"acc", "auc", "f1"}`` as the paper reports them; ``percent=True`` multiplies by 100."""
    k = 100.0 if percent else 1.0
    return {name: k * fn(y_true, y_score) for name, fn in METRICS.items()}


try:  # ignite is part of monai[ignite]; keep this module importable without it
    from ignite.metrics import EpochMetric as _EpochMetric
except ImportError:  # pragma: no cover
    _EpochMetric = object  # type: ignore[misc,assignment]


class EpochClassificationMetric(_EpochMetric):  # type: ignore[misc,valid-type]
    """ignite ``EpochMetric`` computing ``metric`` ("acc", "auc", "f1", "auc_ovr", or "acc_auc_f1") over the whole epoch.

    ``output_transform`` must return ``(y_pred, y)``: probabilities (B, C) (lists of (C,) tensors
    from ``from_engine`` are fine) and integer or one-hot labels.
    """

    def __init__(self, metric: str = "f1", output_transform: Callable = lambda x: x, device="cpu") -> None:
        if metric not in ALL_METRICS:
            raise KeyError(f"unknown metric '{metric}'; choose from {sorted(ALL_METRICS)}")
        fn = ALL_METRICS[metric]
        super().__init__(lambda p, t: fn(t, p), output_transform=self._stack(output_transform),
                         check_compute_fn=False, device=device)

    def compute(self) -> float:
        """The metric over the whole epoch, every rank's validation shard gathered (the shards of
        ``DistributedSampler(even_divisible=False)`` may differ in size, which ignite's own gather cannot
        take); every rank returns the same value, equal to the single-process one."""
        from tpp_monai.engines.distributed import gather_rows

        local_p = torch.cat(self._predictions, 0) if self._predictions else torch.zeros(0)
        local_y = torch.cat(self._targets, 0) if self._targets else torch.zeros(0, dtype=torch.long)
        p, y = gather_rows(local_p), gather_rows(local_y)
        if not len(y):
            from ignite.exceptions import NotComputableError

            raise NotComputableError("EpochClassificationMetric needs at least one validation sample")
        return float(self.compute_fn(p, y))

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
