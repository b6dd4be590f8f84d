"""The TPP learning report: did the target parameters learn anything in the TPP stage?

A TPP stage that runs but does not train (too few steps, a warm-up longer than the run, a tiny lr, or a
pretext the frozen backbone already solves) hands fine-tuning what is almost its random init, and nothing in a
loss log says so. :class:`TPPReport` records the target tensors at the start (``w0``), the loss and lr of every
optimiser step, and at the end writes ``tpp_report.json`` next to the stage's target-parameter checkpoint, logs
one ``TPP report:`` line and warns (:class:`TPPLearningWarning`, naming the likely cause) when the target
parameters barely moved or the loss did not fall. One implementation for every path: the ignite
:class:`~tpp_monai.engines.tpp_trainer.TPPTrainer` (API ``tpp_pretrain``, bundles, MONAI Label) and the nnU-Net
TPP stage. Its state (``state_dict``) travels in the resume file, so a resumed run reports the whole run.

Definitions (schema in ``docs/stunet_tpp.md`` and the report's own fields):

- ``window`` = max(1, round(10% of the steps)); ``loss_start`` / ``loss_end`` = mean loss of the first / last
  window; ``loss_rel_change`` = (end - start) / |start|.
- per *kind* of target tensor (the parameter name from its ``peft_*`` module on, block indices removed, e.g.
  ``adapter.down.weight``): ``rel_change`` = ||w - w0|| / ||w0|| over all tensors of the kind, or ||w|| where
  ``w0`` is all zeros (zero-initialised up-projections, LoRA B).

Thresholds (``THRESHOLDS``): the parameters "barely moved" when ``moved`` (the largest ``rel_change`` of the kinds
that do not start at zero; of all kinds when every kind does: ||w|| of a zero-initialised tensor is about
lr x sqrt(numel) after a single Adam step, so it says little) is below 1%
(the 3D stage's Conv-Adapters at ~200 steps of lr 2.5e-5 moved by less); the loss "did not fall" when it fell by
less than 1% (not judged for DINO, whose loss rises at first by design while the centre and teacher settle).
Causes named: fewer than 100 steps, warm-up >= the run, a zero lr or a sum of lr below 0.01 (Adam moves a tensor
element by at most about lr per step, and target tensors start at ~0.01-0.1 per element), else a pretext on data
the backbone already models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tpp_monai.safe_io import atomic_write

REPORT_NAME = "tpp_report.json"
REPORT_FORMAT = "tpp-learning-report"
THRESHOLDS = {"min_rel_change": 0.01, "min_loss_drop": 0.01, "min_steps": 100, "min_lr_sum": 0.01}
NO_LOSS_CHECK = ("dino", "dino3d", "dino_cnn")  # pretexts whose loss rises first by design

logger = logging.getLogger("tpp_monai.tpp")


class TPPLearningWarning(UserWarning):
    """The TPP stage ran but its target parameters barely learned (see the report's ``warnings``)."""


def target_kind(name: str) -> str:
    """``blocks.3.peft_adapter.down.weight`` -> ``adapter.down.weight`` (module path and indices dropped)."""
    parts = name.split(".")
    start = next((i for i, p in enumerate(parts) if p.startswith("peft_")), 0)
    kept = [p for p in parts[start:] if not p.isdigit()]
    if kept and kept[0].startswith("peft_"):
        kept[0] = kept[0][len("peft_"):]
    return ".".join(kept) or name


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    from tpp_monai.peft.api import target_state_dict

    return {k: v.float() for k, v in target_state_dict(model).items()}


class TPPReport:
    """Records ``w0`` of ``model``'s target tensors, then every step's loss and lr; :meth:`finalise` reports.

    ``model``: the backbone whose target parameters are handed over (DINO: the EMA teacher), ``handover``
    says which. ``path``: which loop writes the report ("trainer" or "nnunet").
    """

    def __init__(self, model: nn.Module, *, pretext: str, peft: str, total_steps: int, warmup_steps: int | None = None,
                 handover: str = "trained", path: str = "trainer") -> None:
        self.model = model
        self.meta = {"path": path, "pretext": pretext, "peft": peft, "handover": handover,
                     "total_steps": int(total_steps), "warmup_steps": None if warmup_steps is None else int(warmup_steps)}
        self.w0 = _targets(model)
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.first_step = 1
        self.complete = True
        self.seconds = 0.0
        self._t0 = time.time()

    # ------------------------------------------------------------------ recording
    def record(self, loss: float, lr: float) -> None:
        self.losses.append(float(loss))
        self.lrs.append(float(lr))

    def state_dict(self) -> dict[str, Any]:
        """What a resume file stores so that the resumed run's report covers the whole run."""
        return {"format": REPORT_FORMAT, "w0": {k: v.clone() for k, v in self.w0.items()},
                "losses": list(self.losses), "lrs": list(self.lrs), "first_step": self.first_step,
                "complete": self.complete, "seconds": self.seconds + time.time() - self._t0}

    def load_state_dict(self, state: Mapping[str, Any] | None, iteration: int) -> None:
        """Continue a run resumed at ``iteration``; without ``state`` (older resume file) the report covers only
        the iterations after it (``complete`` false, ``w0`` = the resumed tensors)."""
        if not state or state.get("format") != REPORT_FORMAT or set(state["w0"]) != set(self.w0):
            self.w0, self.losses, self.lrs = _targets(self.model), [], []
            self.first_step, self.complete = int(iteration) + 1, False
            logger.warning("the resume state holds no TPP report state: tpp_report.json will cover iterations %d.. only",
                           iteration + 1)
            return
        n = int(iteration) - int(state["first_step"]) + 1
        self.w0 = {k: v.float() for k, v in state["w0"].items()}
        self.losses, self.lrs = list(state["losses"])[:n], list(state["lrs"])[:n]
        self.first_step, self.complete = int(state["first_step"]), bool(state["complete"])
        self.seconds, self._t0 = float(state.get("seconds", 0.0)), time.time()

    # ------------------------------------------------------------------ the report
    def summary(self) -> dict[str, Any]:
        steps = len(self.losses)
        window = max(1, round(0.1 * steps)) if steps else 0
        start = sum(self.losses[:window]) / window if steps else float("nan")
        end = sum(self.losses[-window:]) / window if steps else float("nan")
        rel_loss = (end - start) / abs(start) if steps and start != 0 else float("nan")
        now = _targets(self.model)
        groups: dict[str, dict[str, float]] = {}
        for name, w0 in self.w0.items():
            g = groups.setdefault(target_kind(name), {"tensors": 0, "numel": 0, "init_sq": 0.0, "dist_sq": 0.0})
            w = now[name]
            g["tensors"] += 1
            g["numel"] += w.numel()
            g["init_sq"] += float(w0.double().pow(2).sum())
            g["dist_sq"] += float((w.double() - w0.double()).pow(2).sum())
        targets = {}
        for kind, g in sorted(groups.items()):
            init, dist = math.sqrt(g["init_sq"]), math.sqrt(g["dist_sq"])
            targets[kind] = {"tensors": int(g["tensors"]), "numel": int(g["numel"]), "zero_init": init == 0.0,
                             "init_norm": init, "distance": dist, "rel_change": dist / init if init > 0 else dist}
        rels = [t["rel_change"] for t in targets.values()]
        # ||w|| of a zero-initialised tensor grows with its size after even one Adam step (about lr x sqrt(numel)):
        # the relative change of the non-zero-initialised kinds judges "moved" when there are any
        judged = [t["rel_change"] for t in targets.values() if not t["zero_init"]] or rels
        out = {"format": REPORT_FORMAT, "version": 1, **self.meta, "steps": steps,
               "first_step": self.first_step, "last_step": self.first_step + steps - 1, "complete": self.complete,
               "window": window, "loss_start": start, "loss_end": end, "loss_rel_change": rel_loss,
               "loss_checked": self.meta["pretext"] not in NO_LOSS_CHECK,
               "lr_sum": float(sum(self.lrs)), "lr_max": float(max(self.lrs, default=0.0)), "targets": targets,
               "rel_change_max": max(rels, default=0.0), "rel_change_min": min(rels, default=0.0),
               "moved": max(judged, default=0.0),
               "thresholds": dict(THRESHOLDS), "seconds": round(self.seconds + time.time() - self._t0, 2)}
        out["warnings"] = _diagnose(out)
        out["learned"] = not out["warnings"]
        return out

    def finalise(self, output_dir: str | os.PathLike, name: str = REPORT_NAME, log: Any = None) -> dict[str, Any]:
        """Write ``output_dir/name`` (atomic), log the one-line summary (``log``: a callable taking a string, else
        this module's logger) and warn when TPP barely learned. Returns the report."""
        report = self.summary()
        path = Path(output_dir) / name
        atomic_write(path, json.dumps(_finite(report), indent=2) + "\n")
        line = one_line(report) + f" -> {path}"
        (log or logger.info)(line)
        for w in report["warnings"]:
            logger.warning(w)
            warnings.warn(w, TPPLearningWarning, stacklevel=2)
        return report


def one_line(r: Mapping[str, Any]) -> str:
    """``TPP report: loss 0.751 -> 0.612 (-18.5%) over 400 steps, sum of lr 0.42; target change ...``"""
    kinds = ", ".join(f"{k} {100 * v['rel_change']:.2f}%" for k, v in r["targets"].items())
    cover = "" if r["complete"] else f" (iterations {r['first_step']}-{r['last_step']} only)"
    return (f"TPP report: loss {r['loss_start']:.4g} -> {r['loss_end']:.4g} ({100 * r['loss_rel_change']:+.1f}%) "
            f"over {r['steps']} steps{cover}, sum of lr {r['lr_sum']:.3g}; target change {kinds}")


def _diagnose(r: Mapping[str, Any]) -> list[str]:
    th = r["thresholds"]
    still = r["moved"] < th["min_rel_change"]
    flat = r["loss_checked"] and not (r["loss_rel_change"] <= -th["min_loss_drop"])
    if not (still or flat):
        return []
    causes = []
    if r["steps"] < th["min_steps"]:
        causes.append(f"too few steps ({r['steps']} < {th['min_steps']})")
    if r["warmup_steps"] is not None and r["warmup_steps"] >= r["steps"]:
        causes.append(f"a warm-up ({r['warmup_steps']} steps) as long as the run or longer")
    if r["lr_max"] == 0:
        causes.append("a zero learning rate")
    elif r["lr_sum"] < th["min_lr_sum"]:
        causes.append(f"a learning rate too small for the run (sum of lr {r['lr_sum']:.2g} < {th['min_lr_sum']})")
    if not causes:
        causes.append("a pretext on data the frozen backbone already models (the loss starts low and stays)")
    what = []
    if still:
        what.append(f"the target parameters barely moved (largest relative change {100 * r['moved']:.3g}% "
                    f"< {100 * th['min_rel_change']:g}%)")
    if flat:
        what.append(f"the {r['pretext']} loss did not fall by {100 * th['min_loss_drop']:g}% "
                    f"({r['loss_start']:.4g} -> {r['loss_end']:.4g})")
    return [f"TPP barely learned: {' and '.join(what)}; likely cause: {'; '.join(causes)}. "
            "Fine-tuning will start close to the methods' own initialisation."]


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``tpp_report.json`` (a clear error if it is not one)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable TPP report ({e}); it is written at the end of a TPP stage") from e
    if obj.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path} is not a TPP learning report (format {obj.get('format')!r})")
    return obj


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined values (no steps) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

