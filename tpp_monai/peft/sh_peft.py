"""SH-PEFT (Liu et al., MICCAI 2024): sparse selective tuning of the most important backbone weights.

Importance of every weight (all layer types, LayerNorm included), with ``lam = 1``::

    I = I_td + lam * (sum(I_td) / sum(I_ta)) * I_ta
    L1:           I_td = | sum_b dL_b/dw |     I_ta = |w|
    L2 (default): I_td = sum_b (dL_b/dw)^2     I_ta = w^2

The sums in the ratio run over *all* weights considered (global normalisation, matching the global
top-k selection). Usage::

    imp = estimate_importance(model, loss_fn, batches, variant="l2", module=backbone)
    mask = build_mask(imp, top_percent=1.0)            # exactly k = ceil(N * p / 100) entries
    method = apply_peft(backbone, SHPeft(mask=mask))   # selected tensors trainable, grads masked
    opt = build_sh_optimizer(backbone, head.parameters())   # the paper's: SGD lr 1e-3 (MaskedSGD)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_iterations)   # the paper's cosine
    ... train ...
    save_sparse_delta(backbone, "delta.safetensors")
    apply_sparse_delta(fresh_backbone, "delta.safetensors")   # same outputs, bit for bit

Paper defaults (:data:`PAPER_DEFAULTS`): SGD, lr 1e-3, cosine schedule, batch 64, importance estimated
over one epoch of the training set (``estimate_importance`` with ``max_batches=None`` runs every batch it
is given: pass one pass of the loader). Not stated in the paper, chosen here and written down: momentum 0.9
(the usual SGD fine-tuning setting, e.g. VPT/SPT), no weight decay, no warm-up. :class:`MaskedAdamW` stays
available (``optimizer="adamw"``).

Exactness: the gradient hooks zero the unselected entries of the gradients, and :class:`MaskedAdamW`
keeps Adam state only for the selected entries and writes only those (``index_copy_`` into the flat
weight), so unselected entries are never written -- weight decay included -- and stay bit-identical.
(A stock optimiser would still decay unselected entries; use :class:`MaskedAdamW`, or call
``method.protect(model, optimizer)`` to restore them after every step of any optimiser.)

The saved "delta" holds, per tensor, the flat indices and the trained *values* (not differences),
so re-applying it reproduces the trained weights exactly.

TPP: the targets are backbone entries chosen with a downstream loss, so pre-training them with a
pretext task means estimating the mask with the pretext loss; ``tpp_pretrain`` does not do that for
you (build the method with a mask first and pass ``peft=None``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

DELTA_FORMAT = "tpp-sh-peft-delta"

#: SH-PEFT paper (Liu et al., MICCAI 2024): "SGD lr 1e-3, cosine, batch 64", importance within one epoch.
#: ``momentum`` / ``weight_decay`` are not stated there (our choice, see the module docstring).
PAPER_DEFAULTS: dict[str, Any] = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
                                  "schedule": "cosine", "batch_size": 64, "importance_epochs": 1}


# ------------------------------------------------------------------------------ importance + mask
def estimate_importance(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    variant: str = "l2",
    lam: float = 1.0,
    module: nn.Module | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Importance of every parameter of ``module`` (default ``model``), keyed by name within ``module``.

    ``loss_fn(model, batch)`` returns a scalar loss; one backward per batch. Parameters are made to
    require grad for the estimate and their flags and ``.grad`` are restored afterwards.
    """
    variant = variant.lower()
    if variant not in ("l1", "l2"):
        raise ValueError(f"variant must be 'l1' or 'l2'; got '{variant}'")
    module = model if module is None else module
    params = dict(module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    saved = {n: p.grad for n, p in params.items()}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    all_flags = {id(p): p.requires_grad for p in model.parameters()}
    n_batches = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        was_training = model.training
        for b, batch in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            for p in params.values():
                p.grad = None
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is None:
                    continue
                g = g.detach().double()
                acc[n] += g if variant == "l1" else g * g
            n_batches += 1
        model.train(was_training)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = saved[n]
        for p in model.parameters():
            if id(p) in all_flags:
                p.requires_grad_(all_flags[id(p)])
    if n_batches == 0:
        raise ValueError("estimate_importance got no batches")
    td = {n: (a.abs() if variant == "l1" else a) for n, a in acc.items()}
    ta = {n: (p.detach().double().abs() if variant == "l1" else p.detach().double() ** 2) for n, p in params.items()}
    s_td = sum(float(t.sum()) for t in td.values())
    s_ta = sum(float(t.sum()) for t in ta.values())
    scale = lam * s_td / s_ta if s_ta > 0 else 0.0
    return {n: (td[n] + scale * ta[n]).float() for n in params}


def mask_size(total: int, top_percent: float) -> int:
    """Number of selected entries: ``k = ceil(total * top_percent / 100)``, at least 1, at most ``total``."""
    if not 0 < top_percent <= 100:
        raise ValueError(f"top_percent must be in (0, 100]; got {top_percent}")
    return min(total, max(1, math.ceil(total * top_percent / 100.0 - 1e-9)))


def build_mask(importance: Mapping[str, torch.Tensor], top_percent: float = 1.0) -> dict[str, torch.Tensor]:
    """Global top-k% binary mask over all tensors (``k`` from :func:`mask_size`; ties broken by ``topk``)."""
    names = list(importance)
    flat = torch.cat([importance[n].detach().reshape(-1).float() for n in names])
    k = mask_size(flat.numel(), top_percent)
    sel = torch.zeros(flat.numel(), dtype=torch.bool)
    sel[torch.topk(flat, k, sorted=False).indices] = True
    out, i = {}, 0
    for n in names:
        m = importance[n].numel()
        out[n] = sel[i:i + m].view(importance[n].shape).clone()
        i += m
    return out


# ------------------------------------------------------------------------------ the PEFT method
@dataclass
class SHPeftConfig(PeftConfig):
    top_percent: float = 1.0
    variant: str = "l2"
    lam: float = 1.0


def _mask_grad(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * mask.to(grad.device, grad.dtype)


@torch.no_grad()
def _restore_unselected(saved, optimizer, args, kwargs) -> None:
    for p, ref, m in saved:
        p.copy_(torch.where(m, p, ref))


@PEFT_METHODS.register("sh_peft")
class SHPeft(PeftMethod):
    """Selected backbone tensors become target parameters; their unselected entries get zero gradient.

    Build it with ``mask=`` (from :func:`build_mask`); :meth:`indices` gives the flat selected
    indices per tensor (what :class:`MaskedAdamW` and :func:`save_sparse_delta` use).
    """

    name = "sh_peft"
    config_cls = SHPeftConfig
    #: needs a mask from a task loss before injection; the generic TPP stage cannot build one
    tpp_supported: ClassVar[bool] = False
    tpp_refusal: ClassVar[str] = "its weight mask comes from the downstream task's gradients, which a pretext task lacks"
    bundle_refusal: ClassVar[str] = (
        "it needs a weight mask estimated from the task's gradients before injection and a masked optimiser, which "
        "the bundles' recipe does not run. Train it from Python: mask = build_mask(estimate_importance(model, loss_fn, "
        "batches), top_percent); apply_peft(backbone, SHPeft(mask=mask)); build_sh_optimizer(model) "
        "(tpp_monai.peft.sh_peft)")

    def __init__(self, config: Any = None, mask: Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.mask: dict[str, torch.Tensor] = {}
        if mask is not None:
            self.set_mask(mask)

    def set_mask(self, mask: Mapping[str, torch.Tensor]) -> None:
        self.mask = {n: m.detach().bool().cpu() for n, m in mask.items() if bool(m.any())}

    def inject(self, model: nn.Module) -> None:
        if not self.mask:
            raise RuntimeError(
                "sh_peft needs a mask: mask = build_mask(estimate_importance(model, loss_fn, batches), top_percent) "
                "then apply_peft(backbone, SHPeft(mask=mask))"
            )
        params = dict(model.named_parameters())
        missing = sorted(set(self.mask) - set(params))
        if missing:
            raise KeyError(f"sh_peft mask names not in the model: {missing[:6]}")
        for n, m in self.mask.items():
            if tuple(m.shape) != tuple(params[n].shape):
                raise ValueError(f"sh_peft mask for {n} has shape {tuple(m.shape)}, weight {tuple(params[n].shape)}")
            params[n].register_hook(partial(_mask_grad, m.to(params[n].device)))
        self._index = {n: m.reshape(-1).nonzero().squeeze(1) for n, m in self.mask.items()}

    def is_target(self, name: str) -> bool:
        return name in self.mask or super().is_target(name)

    def protect(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """Make any optimiser exact: after each ``optimizer.step()`` the unselected entries of the selected
        tensors are restored from a copy taken now (costs one copy of those tensors). Returns the hook handle.

        Use it with stock optimisers (SGD with momentum, AdamW with weight decay, ...);
        :class:`MaskedAdamW` needs no protection.
        """
        params = dict(model.named_parameters())
        saved = [(params[n], params[n].detach().clone(), m.to(params[n].device)) for n, m in self.mask.items()]
        return optimizer.register_step_post_hook(partial(_restore_unselected, saved))

    def indices(self) -> dict[str, torch.Tensor]:
        return {n: m.reshape(-1).nonzero().squeeze(1) for n, m in self.mask.items()}

    def num_selected(self) -> int:
        return sum(int(m.sum()) for m in self.mask.values())


# ------------------------------------------------------------------------------ exact sparse AdamW
def _masked_param_groups(model: nn.Module, method: "SHPeft | None", extra_params: Iterable[nn.Parameter],
                         who: str) -> tuple[dict[int, torch.Tensor], list[dict]]:
    """The masked optimisers' shared set-up: flat indices of the selected entries per tensor (by parameter id),
    one group of the sparse tensors and one of the dense extras (a head)."""
    if not isinstance(method, SHPeft):
        raise TypeError(f"{who} needs a model carrying the sh_peft method")
    params = dict(model.named_parameters())
    index: dict[int, torch.Tensor] = {}
    sparse = []
    for n, idx in method.indices().items():
        index[id(params[n])] = idx.to(params[n].device)
        sparse.append(params[n])
    groups = [{"params": sparse}]
    extra = [p for p in extra_params if p.requires_grad]
    if extra:
        groups.append({"params": extra})
    return index, groups


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled decay, bias correction, as ``torch.optim.AdamW``) that updates only selected entries.

    ``MaskedAdamW(backbone, lr=..., extra_params=head.parameters())``: the backbone's SH-PEFT tensors
    are updated at their selected flat indices only (Adam moments of size k); ``extra_params``
    (a head) are updated densely. Unselected entries are never written: bit-identical.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, extra_params: Iterable[nn.Parameter] = (),
                 method: SHPeft | None = None) -> None:
        from tpp_monai.peft.api import get_peft

        self._index, groups = _masked_param_groups(model, method or get_peft(model), extra_params, "MaskedAdamW")
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                idx = self._index.get(id(p))
                flat = p.view(-1)
                g = p.grad.reshape(-1)
                if idx is not None:
                    g = g.index_select(0, idx)
                    v = flat.index_select(0, idx)
                else:
                    v = flat.clone()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(v)
                    st["exp_avg_sq"] = torch.zeros_like(v)
                st["step"] += 1
                t = st["step"]
                v.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                v.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))
                if idx is not None:
                    flat.index_copy_(0, idx, v)
                else:
                    flat.copy_(v)
        return loss


# ------------------------------------------------------------------------------ exact sparse SGD (the paper's)
class MaskedSGD(torch.optim.Optimizer):
    """SGD with momentum (``torch.optim.SGD``'s update: ``b = mu * b + (g + wd * w)``, ``w -= lr * b``, the
    first step ``b = g``) that updates only the selected entries of the SH-PEFT tensors (momentum buffers of
    size k); ``extra_params`` (a head) are updated densely. Unselected entries are never written."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 extra_params: Iterable[nn.Parameter] = (), method: SHPeft | None = None) -> None:
        from tpp_monai.peft.api import get_peft

        self._index, groups = _masked_param_groups(model, method or get_peft(model), extra_params, "MaskedSGD")
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                idx = self._index.get(id(p))
                flat = p.view(-1)
                g = p.grad.reshape(-1)
                v = flat.index_select(0, idx) if idx is not None else flat.clone()
                if idx is not None:
                    g = g.index_select(0, idx)
                if wd:
                    g = g.add(v, alpha=wd)
                if mu:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = g.clone()
                    else:
                        st["momentum_buffer"].mul_(mu).add_(g)
                    g = st["momentum_buffer"]
                v.add_(g, alpha=-lr)
                if idx is not None:
                    flat.index_copy_(0, idx, v)
                else:
                    flat.copy_(v)
        return loss


def build_sh_optimizer(model: nn.Module, extra_params: Iterable[nn.Parameter] = (), optimizer: str | None = None,
                       lr: float | None = None, momentum: float | None = None,
                       weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The SH-PEFT optimiser, the paper's by default (:data:`PAPER_DEFAULTS`: :class:`MaskedSGD`, lr 1e-3);
    ``optimizer="adamw"`` gives :class:`MaskedAdamW` (``weight_decay`` default 0.01 there)."""
    d = PAPER_DEFAULTS
    name = (optimizer or d["optimizer"]).lower()
    lr = d["lr"] if lr is None else float(lr)
    if name == "sgd":
        return MaskedSGD(model, lr=lr, momentum=d["momentum"] if momentum is None else float(momentum),
                         weight_decay=d["weight_decay"] if weight_decay is None else float(weight_decay),
                         extra_params=extra_params)
    if name == "adamw":
        return MaskedAdamW(model, lr=lr, weight_decay=0.01 if weight_decay is None else float(weight_decay),
                           extra_params=extra_params)
    raise ValueError(f"SH-PEFT optimizer must be 'sgd' (the paper's) or 'adamw'; got {optimizer!r}")


# ------------------------------------------------------------------------------ sparse delta I/O
def sparse_delta(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {"indices": int64 (k,), "values": (k,)}}`` of the selected entries (CPU copies)."""
    from tpp_monai.peft.api import get_peft

    method = get_peft(model)
    if not isinstance(method, SHPeft):
        raise TypeError("sparse_delta needs a model carrying the sh_peft method")
    params = dict(model.named_parameters())
    out = {}
    for n, idx in method.indices().items():
        p = params[n].detach()
        out[n] = {"indices": idx.cpu().long(), "values": p.reshape(-1).index_select(0, idx.to(p.device)).cpu().clone()}
    return out


def save_sparse_delta(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, str] | None = None) -> str:
    """Write the selected indices + trained values per tensor to a safetensors file (atomically)."""
    import json

    from safetensors.torch import save_file

    from tpp_monai.peft.api import get_peft
    from tpp_monai.safe_io import atomic_file

    delta = sparse_delta(model)
    tensors, shapes = {}, {}
    params = dict(model.named_parameters())
    for n, d in delta.items():
        tensors[f"{n}::indices"] = d["indices"].contiguous()
        tensors[f"{n}::values"] = d["values"].contiguous()
        shapes[n] = list(params[n].shape)
    metadata = {"format": DELTA_FORMAT, "peft": json.dumps(get_peft(model).describe()), "shapes": json.dumps(shapes)}
    metadata.update({k: str(v) for k, v in (meta or {}).items()})
    path = os.fspath(path)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_sparse_delta(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(os.fspath(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != DELTA_FORMAT:
            raise ValueError(f"{path} is not an SH-PEFT sparse delta (format {DELTA_FORMAT})")
        for key in f.keys():
            name, kind = key.rsplit("::", 1)
            out.setdefault(name, {})[kind] = f.get_tensor(key)
    return out


def apply_sparse_delta(model: nn.Module, delta: str | os.PathLike | Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Write the saved values at the saved indices of ``model``'s tensors (in place, exact)."""
    if not isinstance(delta, Mapping):
        delta = load_sparse_delta(delta)
    params = dict(model.named_parameters())
    missing = sorted(set(delta) - set(params))
    if missing:
        raise KeyError(f"sparse delta tensors not in the model: {missing[:6]}")
    with torch.no_grad():
        for n, d in delta.items():
            p = params[n]
            idx = d["indices"].long().to(p.device)
            if idx.numel() and int(idx.max()) >= p.numel():
                raise ValueError(f"sparse delta index out of range for {n} ({p.numel()} entries)")
            p.view(-1).index_copy_(0, idx, d["values"].to(p.device, p.dtype))
    return model
