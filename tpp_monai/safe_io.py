"""Generic safe checkpoint I/O, the bottom layer every writer and reader of files uses.

Writing: :func:`atomic_file` / :func:`atomic_write` (temporary file in the same folder, fsync, rename: a crash mid-write leaves the
previous file intact) and :func:`atomic_save` (``torch.save`` through it; a full disk is a
:class:`DiskFullError` naming the file). Reading: :func:`safe_load` (``torch.load`` weights-only unless the
caller opts in; an unreadable file is an error naming it and the fix) and :func:`check_checkpoint_file`.
The target-parameter format (TPP -> fine-tuning hand-over) is :mod:`tpp_monai.peft.target_checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from tpp_monai.checkpoint_diagnosis import describe_unreadable

class CheckpointMismatch(ValueError):
    """A checkpoint (target parameters, resume state) does not belong to this backbone / PEFT method / config / run."""


class CheckpointCorrupt(CheckpointMismatch):
    """A checkpoint's tensors differ from the digest written with them (damaged file)."""


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike, suffix: str) -> Iterator[tuple[int, Path]]:
    """The one atomic-write mechanism: a temporary file beside ``path`` (name with the writer's PID; a killed
    writer's leftovers removed first, :func:`remove_stale_tmps`), given the usual permissions (umask, not
    ``mkstemp``'s owner-only ones) and renamed over ``path`` when the block ends without error, removed otherwise.
    Yields its open descriptor and its path; the caller writes and fsyncs through one of them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=suffix, dir=path.parent)
    try:
        yield fd, Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Atomic writing for any writer that takes a file name (``torch.save``, safetensors, MONAI's image writers,
    ``shutil.copyfile``): yields a temporary path beside ``path``, fsyncs it and renames it over ``path`` when the
    block ends without error, so a crash mid-write leaves the previous file intact (:func:`_atomic_target`).
    ``suffix``: a writer that appends its own extension gets a name ending in it."""
    with _atomic_target(path, suffix) as (fd, tmp):
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary file) atomically (:func:`_atomic_target`),
    through the temporary file's own descriptor, fsync'ed before the rename."""
    with _atomic_target(path, ".tmp") as (fd, _tmp), os.fdopen(fd, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


STALE_TMP_AGE_S = {"dead_pid": 10.0, "no_pid": 3600.0}


def remove_stale_tmps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` left for ``path`` when its writer was killed
    (SIGKILL, power loss): those whose PID (in the name) is dead on this host, and, from older versions
    without a PID in the name, those untouched for an hour. A few seconds' age is required as well, so a
    live writer (another host on a shared folder) is never touched. Returns what was removed."""
    import glob
    import re
    import time

    from tpp_monai.runlock import _pid_alive

    path = Path(path)
    removed, now = [], time.time()
    for name in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        m = re.fullmatch(rf"\.{re.escape(path.name)}\.(?:pid(\d+)\.)?[^.]+\.tmp", os.path.basename(name))
        if m is None:
            continue
        try:
            age = now - os.stat(name).st_mtime
        except OSError:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        stale = age > STALE_TMP_AGE_S["no_pid"] if pid is None else (
            pid != os.getpid() and not _pid_alive(pid) and age > STALE_TMP_AGE_S["dead_pid"])
        if stale:
            try:
                os.unlink(name)
                removed.append(Path(name))
            except OSError:
                pass
    if removed:
        logging.getLogger("tpp_monai").info("removed %d temporary file(s) of %s left by a killed writer",
                                            len(removed), path)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`: a crash mid-write leaves the previous file intact. A full
    disk is a :class:`DiskFullError` naming ``path`` (torch itself says only ``unexpected pos 704 vs 598``)."""
    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:
        full = disk_full_error(path, e)
        if full is not None:
            raise full from e
        raise


class DiskFullError(OSError):
    """No space left while writing a file (the previous version of the file, if any, is intact)."""


def disk_full_error(path: str | os.PathLike, err: BaseException) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` and the free space when ``err`` is a failed write for lack of
    space (``ENOSPC`` / ``EDQUOT``, or torch's zip writer's ``unexpected pos``); else None."""
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(err, RuntimeError) and "unexpected pos" in str(err))
    if not full:
        return None
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"disk full while writing {path} ({free}; {type(err).__name__}: "
                         f"{str(err).strip()[:120]}). Free space on that disk or write elsewhere, then re-run; "
                         "no partial file was left and an earlier version of the file is intact", str(path))


def non_finite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN/Inf in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in non_finite_tensors(v, f"{prefix}[{i}]")]
    return []


def warn_if_non_finite(obj: Any, path: str | os.PathLike, what: str = "checkpoint") -> list[str]:
    """Log a warning naming ``path`` when its tensors hold NaN/Inf (a diverged run saved it)."""
    bad = non_finite_tensors(obj)
    if bad:
        msg = (f"{what} {path} holds NaN/Inf in {len(bad)} tensor(s) (e.g. {', '.join(bad[:3])}); it was probably "
               "saved by a run that diverged. Training from it will produce NaN: use an earlier checkpoint.")
        warnings.warn(msg, stacklevel=3)
        logging.getLogger("tpp_monai").warning(msg)
    return bad


def safe_load(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller opts in to legacy pickles; a file that
    cannot be read is a ``RuntimeError`` naming it and saying whether it is corrupt or a pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Check the path (or the bundle override).")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the fix
        raise RuntimeError(describe_unreadable(path, e, allow_pickle)) from e


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """Cheap check that ``path`` is a complete ``torch.save`` (zip) file, before a loader that would
    fail with a bare ``EOFError``/zip error; raises naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}.")
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        raise RuntimeError(describe_unreadable(path, None, False, what))
    return path
