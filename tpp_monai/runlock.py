"""One run per output folder: a lock file holding the owner's PID, so two runs never overwrite each
other's checkpoints, logs or resume state.

``OutputLock(folder).acquire()`` creates ``folder/.tpp_monai.lock`` with ``O_EXCL``. A lock whose PID
is still alive on this host is a :class:`OutputFolderLocked` error naming that PID and the fix; the
lock of a dead process (a killed run) is taken over, with a log line. Inside one process the lock
of another live thread is refused too; the same thread takes its own earlier lock over (that run
has ended: a thread runs one thing at a time; e.g. a run that crashed with an exception). Released
by ``release()``, on garbage collection of the holder, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path

LOCK_NAME = ".tpp_monai.lock"

logger = logging.getLogger("tpp_monai")

_HELD: dict[str, "weakref.ref[OutputLock]"] = {}  # lock path -> holder in this process


class OutputFolderLocked(RuntimeError):
    """Another live run writes into the same output folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    # a zombie (killed child not yet reaped) is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class OutputLock:
    """Exclusive lock on an output folder for the lifetime of one run (see module docstring)."""

    def __init__(self, folder: str | os.PathLike, what: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.held = False
        self.thread = threading.get_ident()
        self._finalizer: weakref.finalize | None = None

    def acquire(self) -> "OutputLock":
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": self.what,
              "token": self.token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held, self.thread = True, threading.get_ident()
            _HELD[str(self.path)] = weakref.ref(self)
            self._finalizer = weakref.finalize(self, _remove_if_mine, str(self.path), self.token)
            return self
        raise OutputFolderLocked(f"could not take the lock {self.path}; remove it if no run uses {self.folder}")

    def _take_over_if_stale(self) -> None:
        owner = _read_owner(self.path)
        pid = int(owner.get("pid", -1)) if str(owner.get("pid", "")).lstrip("-").isdigit() else -1
        same_host = owner.get("host") in (None, socket.gethostname())
        if pid == os.getpid():
            ref = _HELD.get(str(self.path))
            holder = ref() if ref is not None else None
            if holder is not None and holder is not self and holder.held and holder.thread != threading.get_ident() \
                    and any(t.ident == holder.thread for t in threading.enumerate()):
                raise OutputFolderLocked(
                    f"{self.folder} is already used by another {owner.get('what', 'run')} in this process "
                    f"(PID {pid}, another thread); finish it first or use another output folder."
                )
            if holder is not None:
                holder.held = False  # superseded: its release() must not remove our lock
        elif not owner and time.time() - self._mtime() < 5:
            time.sleep(0.2)  # another process is writing its lock right now
            owner = _read_owner(self.path)
            if owner:
                return self._take_over_if_stale()
        elif same_host and _pid_alive(pid):
            raise OutputFolderLocked(
                f"{self.folder} is in use by another {owner.get('what', 'run')} (PID {pid}, lock file {self.path}). "
                "Wait for it to finish, stop it, or write to another output folder. Two runs in one folder "
                "would overwrite each other's checkpoints and logs."
            )
        elif not same_host:
            raise OutputFolderLocked(
                f"{self.folder} is locked by PID {pid} on host {owner.get('host')} ({self.path}); if that run is "
                "gone, delete the lock file."
            )
        logger.warning("taking over the stale lock %s of a run that is gone (PID %s)", self.path, owner.get("pid"))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.pop(str(self.path), None)
        if self._finalizer is not None:
            self._finalizer.detach()
        _remove_if_mine(str(self.path), self.token)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _remove_if_mine(path: str, token: str) -> None:
    if _read_owner(Path(path)).get("token") == token:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@atexit.register
def _release_all() -> None:
    for ref in list(_HELD.values()):
        lock = ref()
        if lock is not None:
            lock.release()
