"""Functions users call: insert a method, list/save/load its target parameters, count them."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

PEFT_ATTR = "tpp_peft"


class TargetParameterMismatch(ValueError):
    """A set of target parameters does not fit the model it is loaded into."""


def apply_peft(
    model: nn.Module, method: str | PeftMethod, config: PeftConfig | dict | None = None, **kwargs: Any
) -> PeftMethod:
    """Insert ``method`` into ``model``, freeze every other parameter and return the method object.

    Only the target parameters require grad afterwards; heads live outside the backbone and are
    left to the caller (they are not target parameters).
    """
    if getattr(model, PEFT_ATTR, None) is not None:
        raise RuntimeError(
            f"This model already carries PEFT method '{get_peft(model).name}'; build a fresh backbone "
            "to insert another one."
        )
    m = method if isinstance(method, PeftMethod) else PEFT_METHODS.get(method)(config, **kwargs)
    m.inject(model)
    for name, p in model.named_parameters():
        p.requires_grad_(m.is_target(name))
    object.__setattr__(model, PEFT_ATTR, m)  # plain attribute: not a sub-module, not in state_dict
    return m


def get_peft(model: nn.Module) -> PeftMethod:
    m = getattr(model, PEFT_ATTR, None)
    if m is None:
        raise RuntimeError("No PEFT method has been applied to this model; call apply_peft(model, name) first.")
    return m


def merge_peft(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Fold the method's target parameters into the backbone (LoRA, SSF, ...) and return a plain model.

    The returned model carries no PEFT method any more (no ``peft_`` parameters or hooks for methods
    that merge); methods that cannot be merged raise ``NotImplementedError``. ``inplace=False``
    merges a deep copy and leaves ``model`` untouched.
    """
    m = get_peft(model)
    if not inplace:
        model = copy.deepcopy(model)
    merged = m.merge(model)
    if getattr(merged, PEFT_ATTR, None) is not None:
        object.__delattr__(merged, PEFT_ATTR)
    return merged


def target_parameter_names(model: nn.Module) -> list[str]:
    m = get_peft(model)
    return [n for n, _ in model.named_parameters() if m.is_target(n)]


def target_parameters(model: nn.Module) -> list[nn.Parameter]:
    m = get_peft(model)
    return [p for n, p in model.named_parameters() if m.is_target(n)]


def target_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the target parameters, by name."""
    m = get_peft(model)
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if m.is_target(n)}


def check_target_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`TargetParameterMismatch` naming every missing, unexpected or mis-shaped tensor."""
    params = dict(model.named_parameters())
    expected = set(target_parameter_names(model))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
        for k in expected & set(state)
        if tuple(state[k].shape) != tuple(params[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_preview(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {_preview(shapes)}")
        raise TargetParameterMismatch(
            "Target parameters do not fit this model (" + "; ".join(parts) + "). Build the model with the "
            "same backbone and PEFT method/config as the run that saved them."
        )


def load_target_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy target parameters into ``model`` after checking names and shapes (never a partial load)."""
    check_target_state_dict(model, state)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def _tensor_record(name: str, t: torch.Tensor) -> tuple[bytes, bytes]:
    """What a digest of a named tensor covers: its name, dtype and shape, then its bytes."""
    t = t.detach().cpu().contiguous()
    # reshape(-1): a 0-dim tensor (BatchNorm's int64 num_batches_tracked) cannot be viewed as bytes; same bytes
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), data


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and values of named tensors in name order: identifies weights
    independent of the file or module they came from."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        for part in _tensor_record(name, t):
            h.update(part)
    return h.hexdigest()


def backbone_hashes(model: nn.Module) -> tuple[str, dict[str, str]]:
    """The backbone fingerprint and a short digest per non-target tensor, in one pass over the weights.

    The fingerprint is :func:`tensors_digest` of every non-target tensor (parameters and buffers): it
    identifies the frozen backbone a set of target parameters was trained on. The per-tensor digests
    (16 hex digits) let a mismatch name what differs (:func:`backbone_difference`).
    """
    m = getattr(model, PEFT_ATTR, None)
    h = hashlib.sha256()
    digests: dict[str, str] = {}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        if m is not None and m.is_target(name):
            continue
        head, data = _tensor_record(name, t)
        h.update(head)
        h.update(data)
        digests[name] = hashlib.sha256(head + data).hexdigest()[:16]
    return h.hexdigest(), digests


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 identifying the frozen backbone (see :func:`backbone_hashes`)."""
    return backbone_hashes(model)[0]


def backbone_difference(saved_digests: Mapping[str, str] | None, model: nn.Module, limit: int = 5) -> str:
    """Which backbone tensors differ between a file's recorded digests and ``model``, as one sentence.

    Files written before the digests were recorded get a hint instead: target parameters trained on another
    backbone, or in another pixel space (input normalisation is part of the backbone), do not transfer.
    """
    if not saved_digests:
        return ("The file records no per-tensor digests (written by an older tpp-monai): if it predates the input "
                "normalisation inside the backbone, its target parameters were trained in another pixel space; "
                "re-run the TPP stage with this backbone.")
    here = backbone_hashes(model)[1]
    only_file = sorted(set(saved_digests) - set(here))
    only_model = sorted(set(here) - set(saved_digests))
    changed = sorted(k for k in set(here) & set(saved_digests) if here[k] != saved_digests[k])
    parts = [f"{label} {len(names)}: {', '.join(names[:limit])}{', ...' if len(names) > limit else ''}"
             for label, names in (("changed values", changed), ("only in the file", only_file),
                                  ("only in this backbone", only_model)) if names]
    return "Backbone tensors that differ: " + ("; ".join(parts) if parts else "none (tensor order or dtype)") + "."


@dataclass
class ParameterReport:
    """Counts like the paper's "Ratio": trainable / all parameters in %, task head included."""

    trainable: int
    total: int
    target: int
    head: int

    @property
    def ratio(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} / {self.total:,} ({self.ratio:.3f}%): "
            f"target {self.target:,}, head {self.head:,}"
        )


def count_parameters(module: nn.Module | None) -> tuple[int, int]:
    """The one parameter counter: ``(trainable, total)`` elements of ``module`` (``(0, 0)`` for None); a tensor
    shared by two submodules counts once, as ``module.parameters()`` yields it once."""
    if module is None:
        return 0, 0
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_report(backbone: nn.Module, head: nn.Module | None = None) -> ParameterReport:
    """Trainable/total parameters of backbone (+ injected target params) and head."""
    bb_train, bb_total = count_parameters(backbone)
    head_train, head_n = count_parameters(head)
    return ParameterReport(bb_train + head_train, bb_total + head_n, bb_train, head_n)


def _preview(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k})" if len(names) > k else "")
