"""The run state every resumable loop saves and restores: the TPP stage (:mod:`tpp_monai.engines.tpp_trainer`, also
the nnU-Net TPP stage) and fine-tuning (:mod:`tpp_monai.bundle.resume`) use these, so they agree on what a resume
restores and on how a changed setting is named.

* :func:`rng_state` / :func:`set_rng_state`: every random number generator a step draws from: torch (CPU), CUDA
  (every device, when present), numpy's global one, Python's ``random`` and the numpy ``RandomState`` of each MONAI
  random transform held by the given modules, in types a weights-only ``torch.load`` reads back.
* :func:`rng_of_every_rank` / :func:`restore_rank_rng`: the same under DDP, each rank its own.
* :func:`settings_diff`: ``name: saved X vs now Y`` for every recorded setting that differs.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("tpp_monai")


def _np_state(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _np_tuple(n: Mapping[str, Any] | tuple) -> tuple:
    if isinstance(n, tuple):  # files of tpp-monai <= 0.x wrote the tuple with keys as a tensor
        kind, keys, pos, has_gauss, gauss = n
    else:
        kind, keys, pos, has_gauss, gauss = n["kind"], n["keys"], n["pos"], n["has_gauss"], n["gauss"]
    return kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)


def monai_randomizables(modules: nn.Module | None) -> list:
    """The MONAI random transforms held by ``modules``' submodules (each owns a numpy RandomState, ``.R``), in order."""
    if modules is None:
        return []
    from monai.transforms import Compose, Randomizable

    out: list = []

    def add(t: Any) -> None:
        if isinstance(t, Randomizable):
            out.append(t)
        for sub in (t.transforms if isinstance(t, Compose) else ()):
            add(sub)

    for m in modules.modules():
        for v in vars(m).values():
            add(v)
    return out


def rng_state(modules: nn.Module | None = None) -> dict[str, Any]:
    """Every RNG state (see the module docstring), storable weights-only."""
    return {"torch": torch.get_rng_state(), "numpy": _np_state(np.random.get_state()), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "monai": [_np_state(t.R.get_state()) for t in monai_randomizables(modules)]}


def set_rng_state(state: Mapping[str, Any] | torch.Tensor, modules: nn.Module | None = None,
                  path: Any = None) -> None:
    """Restore :func:`rng_state`'s output. A bare tensor (TPP resume files of older versions kept torch's state
    only) restores torch's, with a warning naming ``path``."""
    from tpp_monai.safe_io import CheckpointMismatch

    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        logger.warning("%s holds only torch's RNG state (written by an older tpp-monai): numpy's and Python's "
                       "random states are not restored, so the resumed run may differ from an uninterrupted one",
                       path or "the resume state")
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_tuple(state["numpy"]))
    random.setstate(state["python"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    transforms, saved = monai_randomizables(modules), state.get("monai") or []
    if modules is not None and len(transforms) != len(saved):
        raise CheckpointMismatch(f"{path or 'the resume state'} holds {len(saved)} MONAI transform RNG states, this "
                                 f"run has {len(transforms)}; resume with the same tpp-monai version and settings")
    for t, n in zip(transforms, saved):
        t.R.set_state(_np_tuple(n))


def rng_of_every_rank(modules: nn.Module | None = None) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state` (rank order), on every rank (a collective under DDP); one entry outside it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state(modules)]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state(modules))
    return states


def restore_rank_rng(obj: Mapping[str, Any], path: Any, modules: nn.Module | None = None) -> None:
    """Each rank restores its own saved state (``obj["rng_ranks"]``; each draws its own dropout / stochastic-depth
    masks); with another number of processes only rank 0's, with a warning."""
    from tpp_monai.engines.distributed import rank_world

    rank, world = rank_world()
    ranks = obj.get("rng_ranks")
    if ranks is not None and len(ranks) == world:
        set_rng_state(ranks[rank], modules, path)
    elif rank == 0:
        set_rng_state(obj["rng"], modules, path)
        if world == 1 and ranks is None:  # an older single-process file: rank 0's state is all there is
            return
        logger.warning("%s was written by %s process(es), this run has %d: only rank 0's random state is restored, "
                       "so stochastic depth / dropout on the other ranks differ from the interrupted run", path,
                       len(ranks) if ranks is not None else "an unknown number of", world)


def settings_diff(saved: Mapping[str, Any] | None, here: Mapping[str, Any]) -> str:
    """'name: saved X vs now Y' for every recorded setting that differs ('' when all match); long values are cut."""
    if saved is None:
        return "the file records no settings (written by an older version)"

    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 60 else r[:57] + "..."

    keys = sorted(set(saved) | set(here))
    diffs = [f"{k}: saved {short(saved.get(k))} vs now {short(here.get(k))}" for k in keys if saved.get(k) != here.get(k)]
    if saved.get("data") != here.get("data"):
        diffs.append("the training images are not those of that run (paths, sizes or modification times differ)")
    return ", ".join(diffs)
