"""Every checkpoint nnU-Net loads is loaded weights-only (no code runs from a crafted file).

nnU-Net 2.8.1 reads its checkpoints with ``torch.load(..., weights_only=False)`` in three places (the
predictor's ``initialize_from_trained_model_folder``, the trainer's ``load_checkpoint`` for ``--c`` /
``--val`` / ``--val_best``, and ``load_pretrained_weights`` for ``-pretrained_weights``): unpickling a
crafted file there runs whatever its ``__reduce__`` names. A pre-check that re-parses nnU-Net's
arguments to guess the files it will load misses spellings (``-device`` read as ``-d evice``, ``-f 00``
is ``fold_0``). So instead of guessing, :func:`weights_only_loads` makes every ``torch.load`` inside the
block weights-only: nnU-Net runs with its own argument parsing and path logic, and the files it
actually opens are the ones checked. nnU-Net's own checkpoints hold tensors, plain data, ``torch.device``
and numpy numbers (the Dice values in its logs), which the weights-only loader allows here.

Opt-in (trusted files only): ``tpp-monai nnunet-predict --allow-pickle`` (every fold), ``tpp-monai
nnunet-train --allow-pickle`` / ``TPP_NNUNET_ALLOW_PICKLE=1`` (only the ``-pretrained_weights`` file,
e.g. STU-Net's official pickled ``*.model``; checkpoints nnU-Net wrote itself never need it), the 3D
bundles' ``--settings::allow_pickle true``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

PREDICT_OPT_IN = "re-run with `tpp-monai nnunet-predict --allow-pickle ...`"
TRAIN_OPT_IN = ("`tpp-monai nnunet-train --allow-pickle` (or TPP_NNUNET_ALLOW_PICKLE=1) allows a pickled "
                "-pretrained_weights file; checkpoints nnU-Net writes itself (checkpoint_*.pth) always load weights-only, "
                "so a pickled one was not written by nnU-Net: do not use it")
BUNDLE_OPT_IN = "add `--settings::allow_pickle true` to the bundle command"


def allow_pickle_from_env() -> bool:
    """``TPP_NNUNET_ALLOW_PICKLE=1``: the ``-pretrained_weights`` file may be a legacy pickle (trusted files only)."""
    return str(os.environ.get("TPP_NNUNET_ALLOW_PICKLE", "0")).lower() in ("1", "true", "yes")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs more than a weights-only load (or is unreadable): refused, nothing was unpickled."""


def nnunet_data_globals() -> list:
    """numpy scalar/array/dtype reconstructors: plain data that nnU-Net's logs hold (np.float64 Dice values)."""
    import numpy as np
    import numpy.dtypes as dtypes

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype,
            *[getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]]


def _refusal(path: Any, err: BaseException, opt_in: str, what: str) -> str:
    from tpp_monai.safe_io import describe_unreadable

    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return f"Could not read {what} {path!r} with a weights-only load ({type(err).__name__}: {err})."
    msg = describe_unreadable(path, err, allow_pickle=False, what=what, pickle_hint=opt_in)
    return msg


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", opt_in: str = PREDICT_OPT_IN,
                      what: str = "nnU-Net checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` allowing nnU-Net's numpy log values; a refusal is an
    :class:`UnsafeCheckpointError` naming the file, why, and ``opt_in``."""
    with _real_torch_load() as load:
        with torch.serialization.safe_globals(nnunet_data_globals()):
            try:
                return load(path, map_location=map_location, weights_only=True)
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised naming the file and the opt-in
                raise UnsafeCheckpointError(_refusal(path, e, opt_in, what)) from e


def check_checkpoints_weights_only(paths: Iterable[str | os.PathLike], pickle_hint: str = PREDICT_OPT_IN
                                   ) -> str | None:
    """None when every existing file in ``paths`` loads weights-only; else the refusal message (file + fix)."""
    for path in paths:
        if not os.path.isfile(path):
            continue  # a missing fold: nnU-Net names it
        try:
            load_weights_only(path, opt_in=pickle_hint)
        except UnsafeCheckpointError as e:
            return str(e)
    return None


_ORIGINAL_LOAD: Callable | None = None  # the real torch.load while a guard is installed


@contextlib.contextmanager
def _real_torch_load() -> Iterator[Callable]:
    yield _ORIGINAL_LOAD or torch.load


def _key(path: Any) -> str | None:
    return os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else None


@contextlib.contextmanager
def weights_only_loads(opt_in: str, trusted: Sequence[str | os.PathLike] | set[str] = (),
                       what: str = "nnU-Net checkpoint") -> Iterator[set[str]]:
    """Within the block every ``torch.load`` is weights-only, whatever ``weights_only`` its caller passes
    (nnU-Net passes False), except for files in ``trusted`` (real paths; the yielded set can be extended
    inside the block). A refusal raises :class:`UnsafeCheckpointError` naming the file and ``opt_in``.
    Not re-entrant across threads: it replaces ``torch.load`` for the whole process while active."""
    global _ORIGINAL_LOAD
    allowed = {k for k in map(_key, trusted) if k}
    if _ORIGINAL_LOAD is not None:  # nested: the outer guard stays in force
        yield allowed
        return
    original = torch.load

    def guarded_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        if _key(f) in allowed:
            return original(f, map_location=map_location, pickle_module=pickle_module, weights_only=weights_only,
                            mmap=mmap, **kwargs)
        with torch.serialization.safe_globals(nnunet_data_globals()):
            try:
                return original(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised naming the file and the opt-in
                raise UnsafeCheckpointError(_refusal(f, e, opt_in, what)) from e

    guarded_load._tpp_monai_guard = True
    _ORIGINAL_LOAD, torch.load = original, guarded_load
    try:
        yield allowed
    finally:
        torch.load, _ORIGINAL_LOAD = original, None


# ---------------------------------------------------------------------------------------------- entry points
def run_ddp_guarded(rank, dataset_name_or_id, configuration, fold, tr, p, disable_checkpointing, c, val,
                    pretrained_weights, *rest):
    """nnU-Net's ``run_ddp`` (``-num_gpus`` > 1, one spawned process per GPU) under :func:`weights_only_loads`:
    spawned processes start fresh, so the guard of the launching process does not reach them."""
    from nnunetv2.run import run_training as rt

    target = getattr(rt.run_ddp, "_tpp_original", rt.run_ddp)
    trusted = [pretrained_weights] if pretrained_weights and allow_pickle_from_env() else []
    with weights_only_loads(TRAIN_OPT_IN, trusted):
        return target(rank, dataset_name_or_id, configuration, fold, tr, p, disable_checkpointing, c, val,
                      pretrained_weights, *rest)


run_ddp_guarded._tpp_original = None


def _train_entry(allow_pickle: bool) -> None:
    """nnU-Net's ``run_training_entry`` (its parser, its checkpoint paths); ``allow_pickle`` trusts only the
    ``-pretrained_weights`` value nnU-Net parsed."""
    import inspect

    from nnunetv2.run import run_training as rt

    run_training = rt.run_training
    sig = inspect.signature(run_training)
    with weights_only_loads(TRAIN_OPT_IN) as trusted:
        def run_training_checked(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            weights = bound.arguments.get("pretrained_weights")
            if allow_pickle and weights:
                trusted.add(os.path.realpath(weights))
            return run_training(*args, **kwargs)

        original_ddp = rt.run_ddp
        run_ddp_guarded._tpp_original = original_ddp
        rt.run_training, rt.run_ddp = run_training_checked, run_ddp_guarded
        try:
            rt.run_training_entry()
        finally:
            rt.run_training, rt.run_ddp = run_training, original_ddp


def _predict_entry(allow_pickle: bool) -> None:
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    with (contextlib.nullcontext() if allow_pickle else weights_only_loads(PREDICT_OPT_IN)):
        predict_entry_point()


ENTRY_POINTS: dict[str, Callable[[bool], None]] = {"nnUNetv2_train": _train_entry, "nnUNetv2_predict": _predict_entry}


def run_nnunet_entry(tool: str, args: list[str], allow_pickle: bool = False) -> int:
    """Run nnU-Net's console script ``tool`` in this process with ``args`` (as ``tool args`` would), every
    checkpoint load weights-only; returns the exit code (2 and a message on stderr for a refused file)."""
    entry = ENTRY_POINTS[tool]
    old_argv = sys.argv
    sys.argv = [tool, *args]
    try:
        entry(allow_pickle)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UnsafeCheckpointError as e:
        print(f"tpp-monai: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = old_argv
    return 0


__all__ = ["UnsafeCheckpointError", "weights_only_loads", "load_weights_only", "check_checkpoints_weights_only",
           "nnunet_data_globals", "allow_pickle_from_env", "run_nnunet_entry", "run_ddp_guarded", "PREDICT_OPT_IN", "TRAIN_OPT_IN",
           "BUNDLE_OPT_IN"]
