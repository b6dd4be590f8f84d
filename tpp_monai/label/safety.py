"""Request checks for the annotation server: what a client may name, send and see.

The MONAI Label app (``apps/tpp_label``) calls these; nothing here imports ``monailabel``, so the
checks are tested without a server. Why each exists (issue 16): monailabel 0.8.5 joins client-given
label tags and image ids into datastore paths (``tag=../../x`` wrote outside the datastore), segments
any server file named by path, keeps failed uploads in the temp folder forever, answers malformed
input with HTTP 500 and shows training tracebacks and server paths to every client.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

#: image / label file types the app reads (``seg2d.read_image_2d``)
UPLOAD_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz", ".nrrd")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RequestError(ValueError):
    """A client sent something the server refuses; ``status`` is the HTTP code (4xx), the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------- names and paths
def check_name(value: Any, what: str) -> str:
    """A datastore image id, label id or label tag must be a plain name: it is joined into a datastore path."""
    if not isinstance(value, str) or not value or len(value) > 255 or value in (".", "..") \
            or "/" in value or "\\" in value or _CONTROL.search(value):
        raise RequestError(f"{what} {str(value)[:80]!r} is not a plain name: use a datastore {what} "
                           "(letters, digits, '.', '_', '-'; no '/', '\\' or '..')")
    return value


def check_upload_ext(filename: str, what: str = "upload") -> str:
    """The file type of an upload, from its name; refuse types the app cannot read."""
    low = os.path.basename(str(filename)).lower()
    for ext in sorted(UPLOAD_EXT, key=len, reverse=True):
        if low.endswith(ext):
            return ext
    raise RequestError(f"{what}: file type of {os.path.basename(str(filename))[:80]!r} is not accepted; "
                       f"send one of {', '.join(UPLOAD_EXT)}")


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` (symlinks resolved) lies inside ``folder``."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([p, f]) == f and p != f


# ------------------------------------------------------------------------------------ train params
#: what a client may set for one /train run; everything else in the merged request is the server's
TRAIN_KEYS = ("tpp", "pretext", "tpp_epochs", "epochs", "batch_size", "lr", "val_split", "device")
MAX_VAL_SPLIT = 0.9
MAX_EPOCHS, MAX_BATCH = 100_000, 4096


def _int(v: Any, name: str, lo: int, hi: int, errors: list) -> int | None:
    if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
        errors.append(f"{name} must be a whole number, got {v!r}")
        return None
    try:
        i = int(v)
    except (TypeError, ValueError):
        errors.append(f"{name} must be a whole number, got {v!r}")
        return None
    if not lo <= i <= hi:
        errors.append(f"{name} must be in [{lo}, {hi}], got {i}")
        return None
    return i


def _bool(v: Any, name: str, errors: list) -> bool | None:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off"):
        return False
    errors.append(f"{name} must be true or false, got {v!r}")
    return None


def validate_train_params(params: Mapping[str, Any] | None, pretexts: Sequence[str],
                          *, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """Check and normalise /train parameters; one RequestError lists every problem.

    ``epochs`` >= 1 (a run that fine-tunes nothing must not publish a model), ``tpp_epochs`` >= 0,
    ``batch_size`` >= 1, ``lr`` finite and > 0, ``val_split`` in [0, 0.9], ``pretext`` registered, ``device`` cpu / cuda[:N].
    Keys outside :data:`TRAIN_KEYS` are refused unless listed in ``ignore`` (keys monailabel adds itself).
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise RequestError(f"train parameters must be a JSON object, got {type(params).__name__}")
    ignore = set(ignore)
    errors: list[str] = []
    unknown = sorted(k for k in params if k not in TRAIN_KEYS and k not in ignore)
    if unknown:
        errors.append(f"unknown train parameter(s) {unknown}; allowed: {', '.join(TRAIN_KEYS)}")
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k not in TRAIN_KEYS or v is None:
            continue
        if k == "epochs":
            out[k] = _int(v, k, 1, MAX_EPOCHS, errors)
        elif k == "tpp_epochs":
            out[k] = _int(v, k, 0, MAX_EPOCHS, errors)
        elif k == "batch_size":
            out[k] = _int(v, k, 1, MAX_BATCH, errors)
        elif k == "lr":
            try:
                f = float(v)
                if isinstance(v, bool) or not math.isfinite(f) or f <= 0:
                    raise ValueError
                out[k] = f
            except (TypeError, ValueError):
                errors.append(f"lr must be a finite number > 0, got {v!r}")
        elif k == "val_split":
            try:
                f = float(v)
                if isinstance(v, bool) or not 0.0 <= f <= MAX_VAL_SPLIT:
                    raise ValueError
                out[k] = f
            except (TypeError, ValueError):
                errors.append(f"val_split must be a fraction in [0, {MAX_VAL_SPLIT}], got {v!r}")
        elif k == "tpp":
            out[k] = _bool(v, k, errors)
        elif k == "pretext":
            if str(v).lower() not in pretexts:
                errors.append(f"pretext {v!r} is not a registered pretext task; known: {', '.join(pretexts)}")
            else:
                out[k] = str(v).lower()
        elif k == "device":
            devs = v if isinstance(v, (list, tuple)) else [v]
            if not devs or any(not isinstance(d, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", d) for d in devs):
                errors.append(f"device must be 'cpu', 'cuda' or 'cuda:N' (or a list of them), got {v!r}")
            else:
                out[k] = v
    if errors:
        raise RequestError("invalid train parameters: " + "; ".join(errors))
    return out


def parse_json_object(text: str | None, what: str) -> dict:
    """``params`` / ``info`` form fields: a JSON object, or a 400 naming the field and the parse error."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"{what} is not valid JSON ({e.msg} at character {e.pos})") from e
    if not isinstance(obj, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------------ binding
def host_from_argv(argv: Sequence[str]) -> str | None:
    """The ``--host`` given to ``monailabel start_server`` (None when absent: monailabel then uses 0.0.0.0)."""
    for i, a in enumerate(argv):
        if a == "--host" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--host="):
            return a.split("=", 1)[1]
    return None


def is_loopback(host: str | None) -> bool:
    return host is not None and (host in LOOPBACK or host.startswith("127."))


def check_bind(host: str | None, expose: bool, auth_enabled: bool) -> str | None:
    """Refuse to listen beyond this machine unless asked to (``--conf expose true``); returns a warning to log.

    Without authentication any client that reaches the port can download the whole dataset and
    replace or delete labels and the model.
    """
    shown = host if host is not None else "0.0.0.0 (monailabel's default)"
    if is_loopback(host):
        return None
    if not expose:
        raise RuntimeError(
            f"the label server would listen on {shown}, reachable from the network without authentication. "
            "Start it with --host 127.0.0.1 (or `python -m tpp_monai.label.serve`, which defaults to it); to serve "
            "other machines on purpose, enable authentication (MONAI_LABEL_AUTH_ENABLE=true, see "
            "apps/tpp_label/README.md) and add --conf expose true.")
    if not auth_enabled:
        return (f"listening on {shown} WITHOUT authentication (--conf expose true): anyone who reaches the port "
                "can read the dataset and replace the model; set MONAI_LABEL_AUTH_ENABLE=true")
    return None


# ------------------------------------------------------------------------------- status for clients
#: our train task prefixes every line a client may see with this; everything else stays in the log
CLIENT_MARK = "tpp_label| "


def redact(text: str, roots: Iterable[str]) -> str:
    """Replace server folders (app, studies, model, temp) in a message with '<server>'."""
    roots = [str(r) for r in roots if r]
    for r in sorted({os.path.realpath(r) for r in roots} | set(roots), key=len, reverse=True):
        if len(r) > 1:
            text = text.replace(r, "<server>")
    return text


def client_task_view(task: Mapping[str, Any] | None, roots: Iterable[str]) -> dict | None:
    """A monailabel task record as a client may see it: our marked lines only (no tracebacks), no paths."""
    if task is None:
        return None
    roots = list(roots)
    out = {k: task[k] for k in ("id", "status", "start_ts", "end_ts") if k in task}
    req = task.get("request") or {}
    out["request"] = {k: req[k] for k in ("model", *TRAIN_KEYS) if k in req}
    lines = []
    for line in task.get("details") or []:
        i = str(line).find(CLIENT_MARK)
        if i >= 0:
            lines.append(redact(str(line)[i + len(CLIENT_MARK):], roots))
    out["details"] = lines
    return out


# --------------------------------------------------------------------------------- temporary files
class UploadFolder:
    """A private temp folder for this server's uploads and results, swept when no request is running.

    monailabel writes every upload with ``tempfile.NamedTemporaryFile`` and deletes it in a
    background task that only runs when the request succeeds; pointing ``tempfile.tempdir`` here
    lets the server delete what failed requests leave behind.
    """

    def __init__(self, parent: str | None = None, max_age_s: float = 3600.0):
        self.path = tempfile.mkdtemp(prefix="tpp-label-uploads-", dir=parent)
        self.max_age_s = max_age_s

    def sweep(self, idle: bool) -> int:
        """Delete what is in the folder: all when ``idle`` (no request can still need it), else what is older than max age."""
        n, now = 0, time.time()
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return 0
        for e in entries:
            try:
                if idle or now - e.stat(follow_symlinks=False).st_mtime > self.max_age_s:
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(e.path, ignore_errors=True)
                    else:
                        os.unlink(e.path)
                    n += 1
            except FileNotFoundError:
                pass
        return n

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class RequestGuard:
    """ASGI middleware: caps the request body (413 naming the limit) and sweeps the upload folder after requests."""

    def __init__(self, app, folder: UploadFolder, max_body_bytes: int):
        self.app, self.folder, self.max_body_bytes = app, folder, int(max_body_bytes)
        self.active = 0

    async def _refuse(self, send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def too_large(self, size: int) -> str:
        return (f"request body of {size} bytes is larger than the server's limit of {self.max_body_bytes} bytes "
                "(--conf max_upload_mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0
        if length > self.max_body_bytes:
            return await self._refuse(send, 413, self.too_large(length))
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body_bytes:
                    raise RequestError(self.too_large(seen), status=413)
            return msg

        self.active += 1
        try:
            await self.app(scope, limited, send)
        finally:
            self.active -= 1
            self.folder.sweep(idle=self.active == 0)
