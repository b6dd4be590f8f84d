"""Why a checkpoint file could not be loaded, said precisely (and without unpickling anything).

A wrong diagnosis is unsafe: telling the owner of a crafted pickle "the archive is corrupt", or the owner of
an HTML error page "pass allow_pickle=True", invites the one step that runs code. The file is classified
from its bytes, and a pickle's imports are listed with :mod:`pickletools` (which parses opcodes and runs
nothing):

- not a torch file at all: empty, an HTML page, a Git LFS pointer, other text, random bytes / another format;
- a ``torch.save`` zip that is truncated or corrupt;
- a pickle that would import code (``os.system``, ``subprocess.*``, ``builtins.eval`` ...): refused, named,
  and the opt-in is *not* offered;
- a legacy pickle of harmless Python objects (``argparse.Namespace``, numpy scalars): needs the opt-in,
  for trusted files only;
- a plain ``pickle.dump`` file (no torch header): torch cannot read it at all.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import zipfile
from pathlib import Path

CORRUPT_FIX = "Re-create it (re-run the stage that writes it) or download it again."
DEFAULT_PICKLE_HINT = "pass allow_pickle=True (bundles: --allow_pickle True, CLI: --allow-pickle)"

# Modules / callables whose import from a pickle means code execution, never checkpoint data.
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code",
                 "codeop", "ctypes", "pickle", "_pickle", "marshal", "webbrowser", "multiprocessing", "signal",
                 "commands", "popen2", "pdb", "timeit", "asyncio", "threading", "_thread", "tempfile", "io",
                 "urllib", "http", "ftplib", "smtplib", "telnetlib", "types", "inspect"}
_CODE_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
                  "locals", "vars", "input", "breakpoint", "apply", "execfile", "file"}
_OS_ALIASES = {"posix": "os", "nt": "os"}
_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MAX_PICKLE_SCAN = 64 << 20


def is_code_global(name: str) -> bool:
    """``module.name`` that runs code when a pickle imports it."""
    module, attr = _split(name)
    root = module.split(".")[0]
    return (root in _CODE_MODULES or (root in ("builtins", "__builtin__") and attr in _CODE_BUILTINS)
            or "." in attr)  # a method (``Path.write_text``): a call on an object, not a data type


def _split(name: str) -> tuple[str, str]:
    """``module``, ``qualname`` of a ``module.qualname`` global (GLOBAL opcodes separate them by a space)."""
    if " " in name:
        module, attr = name.split(" ", 1)
        return module, attr
    module, _, attr = name.rpartition(".")
    return module, attr


def _show(name: str) -> str:
    module, attr = _split(name)
    module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles name it the Python 2 way
    alias = _OS_ALIASES.get(module)
    return f"{module}.{attr} ({alias}.{attr})" if alias else f"{module}.{attr}"


def _stream_globals(data: bytes, max_pickles: int = 6) -> list[str]:
    """``"module qualname"`` of every GLOBAL / STACK_GLOBAL / INST in the pickle(s) at the start of ``data``."""
    found: list[str] = []
    f = io.BytesIO(data)
    for _ in range(max_pickles):
        strings: list[str] = []
        memo: dict[int, object] = {}
        last: object = None
        try:
            for op, arg, _pos in pickletools.genops(f):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg))
                    last = None
                elif name == "STACK_GLOBAL":
                    if len(strings) >= 2:
                        found.append(f"{strings[-2]} {strings[-1]}")
                    last = None
                elif isinstance(arg, str) and ("UNICODE" in name or name in ("STRING", "BINSTRING", "SHORT_BINSTRING")):
                    strings.append(str(arg))
                    last = str(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = last
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    last = memo.get(int(arg))
                    if isinstance(last, str):
                        strings.append(last)
                elif name == "STOP":
                    break
                else:
                    last = None
        except Exception:  # noqa: BLE001 - the end of the pickles (raw storage bytes follow) or damage
            break
        if f.tell() >= len(data):
            break
    return list(dict.fromkeys(found))


def pickle_globals(path: str | os.PathLike) -> list[str]:
    """The globals (``"module qualname"``) a torch checkpoint's pickle would import (zip: ``*/data.pkl``; legacy:
    the leading pickles), found without unpickling; [] when there is no readable pickle."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                if not names or z.getinfo(names[0]).file_size > _MAX_PICKLE_SCAN:
                    return []
                return _stream_globals(z.read(names[0]))
        with open(path, "rb") as f:
            return _stream_globals(f.read(_MAX_PICKLE_SCAN))
    except Exception:  # noqa: BLE001 - damaged archive: nothing to list
        return []


def refused_global(err: BaseException | None) -> str | None:
    """The global torch's weights-only unpickler refused (``GLOBAL posix.system``), if it says so."""
    m = re.search(r"GLOBAL ([\w.]+)", str(err or ""))
    return m.group(1) if m else None


def sniff(path: str | os.PathLike) -> str:
    """``empty`` / ``zip`` / ``zip-truncated`` / ``torch-legacy`` / ``pickle`` / ``html`` / ``lfs`` / ``text``
    / ``unknown`` from the first bytes (and the zip directory)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip" if zipfile.is_zipfile(path) else "zip-truncated"
    if head.startswith(_TORCH_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"version https://git-lfs"):
        return "lfs"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml")) or b"<html" in text[:200]:
        return "html"
    try:
        sample = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in sample)
    return "text" if printable >= 0.95 * len(sample) else "unknown"


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        line = f.read(80).decode("utf-8", "replace").strip().splitlines()
    return (line[0] if line else "")[:60]


def describe_unreadable(path: str | os.PathLike, err: BaseException | None, allow_pickle: bool = False,
                        what: str = "checkpoint", pickle_hint: str | None = None) -> str:
    """Why ``path`` could not be loaded, naming the file, what it is, and the fix (see the module docstring).

    ``pickle_hint`` is the opt-in offered for a legacy pickle of harmless objects (default: ``allow_pickle=True``)."""
    path = Path(path)
    hint = pickle_hint or DEFAULT_PICKLE_HINT
    head = f"Could not read {what} {path}"
    if not path.is_file():
        return f"{head}: the file does not exist."
    size = path.stat().st_size
    kind = sniff(path)
    detail = ""
    if err is not None:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        core = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported operand" in ln), lines[-1] if lines else "")
        detail = f" ({type(err).__name__}: {core[:200]})"
    if kind == "empty":
        return f"{head}: the file is empty (0 bytes), e.g. a save that was killed. {CORRUPT_FIX}"
    if kind == "zip-truncated":
        return (f"{head}: the file is truncated ({size} bytes; a torch.save archive whose end is missing, e.g. an "
                f"interrupted copy or save){detail}. {CORRUPT_FIX}")
    if kind in ("zip", "torch-legacy", "pickle"):
        names = pickle_globals(path)
        refused = refused_global(err)
        if refused and refused not in {n.replace(" ", ".") for n in names}:
            names.append(refused)
        code = [n for n in names if is_code_global(n)]
        if code:
            return (f"{head}: refused: it would import {', '.join(map(_show, code))} when unpickled, which runs code "
                    f"on this machine. It is not a checkpoint to load (and no opt-in makes it one): delete it, "
                    f"and get the file from its publisher again{detail}.")
        if refused and not allow_pickle:
            others = [_show(n) for n in names if not _split(n)[0].startswith(("torch", "collections"))] or [refused]
            return (f"{head}: it is a legacy pickle holding Python objects that a weights-only load refuses "
                    f"({', '.join(others[:6])}){detail}. Only if it comes from a source you trust: {hint}.")
        if kind == "pickle":
            return (f"{head}: it is a plain Python pickle (pickle.dump), not a torch.save file, so torch.load cannot "
                    f"read it{detail}. Re-save it with torch.save(obj, path), or {CORRUPT_FIX[0].lower()}{CORRUPT_FIX[1:]}")
        if kind == "torch-legacy":
            return (f"{head}: it is a legacy (non-zip) torch.save file that is corrupt or truncated ({size} bytes)"
                    f"{detail}. {CORRUPT_FIX}")
        return f"{head}: the torch.save archive is corrupt ({size} bytes){detail}. {CORRUPT_FIX}"
    if kind == "html":
        return (f"{head}: it is an HTML page, not a checkpoint (starts with {_first_line(path)!r}): the download "
                "returned a web page (a login, error or preview page). Download the file itself (the direct / raw link).")
    if kind == "lfs":
        return (f"{head}: it is a Git LFS pointer, not the checkpoint: run `git lfs pull` in its repository "
                "(or download the file itself).")
    if kind == "text":
        return (f"{head}: it is a text file, not a checkpoint (starts with {_first_line(path)!r}). "
                f"Point to the checkpoint file itself. {CORRUPT_FIX}")
    return (f"{head}: it is not a PyTorch checkpoint (neither a torch.save archive nor a pickle; random or corrupt "
            f"bytes, or another format){detail}. {CORRUPT_FIX}")


__all__ = ["describe_unreadable", "pickle_globals", "sniff", "is_code_global", "refused_global", "CORRUPT_FIX"]
