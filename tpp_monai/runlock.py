"""One run per output folder: a lock file holding the owner's PID, so two runs never overwrite each
other's checkpoints, logs or resume state.

``OutputLock(folder).acquire()`` creates ``folder/.tpp_monai.lock`` atomically with its contents (a
hard link of a private temporary file, which fails if the lock exists). A lock whose PID is still
alive on this host is a :class:`OutputFolderLocked` error naming that PID and the fix; the lock of a
dead process (a killed run) is taken over, with a log line. The lock records the owner's process
start time and boot id, so a PID that a later process reuses is recognised as stale too (where
``/proc`` is missing the message says PIDs can be reused). Taking over is serialised between
processes by an ``flock`` on the folder (released by the kernel when its holder dies, so it can never
go stale itself): of several runs that start together over a killed run's lock, exactly one gets in.
Inside one process the lock of another live thread is refused too; the same thread takes its own
earlier lock over (that run has ended: a thread runs one thing at a time; e.g. a run that crashed with
an exception). Released by ``release()``, on garbage collection of the holder, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; take-overs are then not serialised between processes
    fcntl = None

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


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_reused(owner: dict, pid: int) -> bool:
    """True when ``pid`` is alive but is not the process that wrote the lock (another boot, or a process
    started at another time): the PID was reused after the run died."""
    if owner.get("boot") and _boot_id() and owner["boot"] != _boot_id():
        return True
    now = _proc_start(pid)
    return bool(owner.get("proc_start")) and now is not None and now != owner["proc_start"]


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder for the check-and-remove of a stale lock: without it two
    starters that both saw the dead run's lock could each remove it, the second removing the first's new
    lock, and both get in."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _create_with(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` in one step (hard link of a written temporary file; False if
    ``path`` exists), so no reader ever sees an empty lock."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: O_EXCL create, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


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
              "token": self.token, "proc_start": _proc_start(os.getpid()), "boot": _boot_id()}
        for _ in range(3):
            created = _create_with(self.path, json.dumps(me))
            if not created:
                # check, remove and re-create under the guard: another starter that also saw the stale lock
                # waits here and then finds this run's lock (alive), instead of removing it
                with _folder_guard(self.folder):
                    if self.path.exists():
                        self._take_over_if_stale()
                    created = _create_with(self.path, json.dumps(me))
            if not created:
                continue
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
        elif same_host and _pid_alive(pid) and not _pid_reused(owner, pid):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0) or 0)))
            raise OutputFolderLocked(
                f"{self.folder} is in use by another {owner.get('what', 'run')} (PID {pid}, locked since {since}, "
                f"lock file {self.path}). Wait for it to finish, stop it, or write to another output folder. Two "
                "runs in one folder would overwrite each other's checkpoints and logs."
                + ("" if owner.get("proc_start") else f" If PID {pid} is not that run (a PID is reused after a run "
                   "dies and this lock records no process start time), delete the lock file.")
            )
        elif not same_host:
            raise OutputFolderLocked(
                f"{self.folder} is locked by PID {pid} on host {owner.get('host')} ({self.path}); if that run is "
                "gone, delete the lock file."
            )
        reused = same_host and pid > 0 and pid != os.getpid() and _pid_alive(pid)
        logger.warning("taking over the stale lock %s of a run that is gone (PID %s%s)", self.path, owner.get("pid"),
                       ", now reused by another process" if reused else "")
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
    with _folder_guard(Path(path).parent):
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
