"""Request checks for the annotation server: what a client may name, send and see.

The MONAI Label app (``apps/tpp_label``) calls these; only :func:`start_server_args` imports
``monailabel`` (its own argument parser, lazily), so the checks are tested without a server. Why each exists (issue 16): monailabel 0.8.5 joins client-given
label tags and image ids into datastore paths (``tag=../../x`` wrote outside the datastore), segments
any server file named by path, keeps failed uploads in the temp folder forever, answers malformed
input with HTTP 500 and shows training tracebacks and server paths to every client.
Issue 21 added: monailabel reflects any web ``Origin`` with credentials and ignores ``Host`` (any page in
the annotator's browser could read the dataset and replace the model: :class:`BrowserGuard`), and the
loopback guard read the first ``--host`` while uvicorn binds the last (:func:`bound_host`).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import logging
import shutil
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

#: image / label file types the app reads (``images.read_image_2d``)
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
    try:
        p, f = os.path.realpath(path), os.path.realpath(folder)
        return os.path.commonpath([p, f]) == f and p != f
    except (ValueError, TypeError):  # a NUL byte or a non-path: not a file of ours
        return False


# ------------------------------------------------------------------------------------ train params
#: what a client may set for one /train run; everything else in the merged request is the server's
TRAIN_KEYS = ("tpp", "pretext", "tpp_epochs", "epochs", "batch_size", "lr", "val_split", "device")
#: what MONAI Label's own client and 3D Slicer add to every request (``MONAILabelClient._update_client_id``):
#: accepted and ignored by training (the client id says who asked, it sets nothing)
CLIENT_KEYS = ("client_id",)
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
    ignore = set(ignore) | set(CLIENT_KEYS)
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


# ------------------------------------------------------------------------------------------ binding
def start_server_args(argv: Sequence[str]) -> argparse.Namespace:
    """``monailabel start_server`` arguments parsed by monailabel's own argparse definition.

    ``argv``: the words after ``start_server``. ``host`` is None when no ``--host`` / ``-i`` (or an
    abbreviation argparse accepts, e.g. ``--ho``) is given; when several are, the last wins, as in
    monailabel (the address uvicorn binds).
    """
    from monailabel.main import Main  # imported here: the other checks in this module work without monailabel

    parser = argparse.ArgumentParser("monailabel start_server", add_help=False)
    Main.args_start_server(None, parser)  # the method only adds arguments to the parser it is given
    parser.set_defaults(host=None)
    args, _ = parser.parse_known_args(list(argv))
    return args


def bound_host(argv: Sequence[str]) -> str | None:
    """The address a ``... start_server ...`` command line makes uvicorn bind (monailabel's default 0.0.0.0
    when no host is given); None when ``argv`` is not a start_server command (other launchers: the
    per-request check of :class:`BrowserGuard` still refuses connections that are not to loopback)."""
    argv = list(argv)
    if "start_server" not in argv:
        return None
    host = start_server_args(argv[argv.index("start_server") + 1:]).host
    return "0.0.0.0" if host is None else host


def is_loopback(host: str | None) -> bool:
    host = host.strip("[]") if isinstance(host, str) else host
    return host is not None and (host in LOOPBACK or host.startswith("127.") or host.startswith("::ffff:127."))


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
        seen, over, replaced = 0, None, False

        async def limited():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body_bytes:
                    over = self.too_large(seen)
                    raise RequestError(over, status=413)
            return msg

        async def guarded_send(msg):
            # a chunked body (no content-length) that grows past the cap fails inside the form parser, which
            # answers 400 "error parsing the body": the client gets the 413 naming the limit instead
            nonlocal replaced
            if over is not None:
                if msg["type"] == "http.response.start" and not replaced:
                    replaced = True
                    await self._refuse(send, 413, over)
                return None
            return await send(msg)

        self.active += 1
        try:
            await self.app(scope, limited, guarded_send)
        except RequestError:
            if over is None:
                raise
            if not replaced:
                await self._refuse(send, 413, over)
        finally:
            self.active -= 1
            self.folder.sweep(idle=self.active == 0)


# ------------------------------------------------------------------------------- browsers (CORS, Host)
def parse_list(spec: str | Sequence[str] | None) -> list[str]:
    """``"a, b"`` / ``["a", "b"]`` -> ["a", "b"] (empty entries dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    return [str(i).strip() for i in items if str(i).strip()]


def normalise_origin(origin: str) -> str:
    """``HTTP://Host:3000/`` -> ``http://host:3000``: the form browsers send in the Origin header."""
    return origin.strip().rstrip("/").lower()


def check_origins(origins: Sequence[str]) -> list[str]:
    """The cross-origin allow-list (``--conf cors_origins``): full origins only, never ``*``.

    ``*`` with credentials lets every web page the annotator opens read the dataset and change labels.
    """
    out = []
    for o in origins:
        n = normalise_origin(o)
        if n == "*" or not re.fullmatch(r"https?://[^/\s*]+", n):
            raise RuntimeError(f"cors origin {o!r} is refused: list full origins such as http://localhost:3000 "
                               "(scheme://host[:port] of the OHIF viewer), never '*' (it would let any web page "
                               "use this server with the annotator's browser)")
        out.append(n)
    return out


def host_name(host_header: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``, ``[::1]:8000`` -> ``::1``, ``Name`` -> ``name``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.index("]")] if "]" in h else h[1:]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class BrowserGuard:
    """ASGI middleware: what a web browser (or a page in it) may ask of the server.

    * ``Host`` must name this server: a loopback name, the address the connection arrived on, or one of
      ``allowed_hosts`` (``*`` = any). A page on ``http://evil.example`` whose name an attacker re-points to
      127.0.0.1 (DNS rebinding) sends ``Host: evil.example`` and gets 400.
    * A request with an ``Origin`` that is neither the server's own nor in ``allowed_origins`` gets 403
      before anything runs (a cross-site form POST needs no preflight); CORS headers are sent only
      for listed origins (monailabel reflects any origin with credentials).
    * Unless ``expose``: a connection that did not arrive on a loopback address is refused (403), whatever
      address the server was started on (the start-up check reads the command line; this reads the socket).
    """

    def __init__(self, app, allowed_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = (),
                 expose: bool = False):
        self.app = app
        self.allowed_origins = {normalise_origin(o) for o in allowed_origins}
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.expose = bool(expose)

    @staticmethod
    async def _refuse(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"vary", b"Origin")]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, message) when the request must be refused, else None."""
        headers = {k.lower(): v for k, v in (scope.get("headers") or [])}
        server = scope.get("server") or (None, None)
        local = str(server[0]) if server[0] is not None else None
        if not self.expose and local is not None and not is_loopback(local):
            return 403, (f"this server answers only on loopback (connection arrived on {local}); start it with "
                         "--host 127.0.0.1, or enable authentication and --conf expose true to serve other machines")
        host = headers.get(b"host", b"").decode("latin-1")
        name = host_name(host) if host else ""
        if "*" not in self.allowed_hosts and not (is_loopback(name) or name == (local or "").lower()
                                                   or name in self.allowed_hosts):
            return 400, (f"Host header {host[:100]!r} does not name this server (DNS-rebinding guard); connect to "
                         "http://127.0.0.1:<port>, or list the name with --conf allowed_hosts <name>[,<name>...]")
        origin = headers.get(b"origin")
        if origin is not None:
            o = normalise_origin(origin.decode("latin-1"))
            same = o.split("://", 1)[-1] == host.strip().lower() if host else False
            if not same and o not in self.allowed_origins:
                return 403, (f"cross-origin request from {o[:100]!r} refused: this server allows no other web origin by "
                             "default; allow the OHIF viewer's origin with --conf cors_origins http://host:port")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        bad = self.refusal(scope)
        if bad is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await self._refuse(send, *bad)
        return await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------ full disk
#: errors of a write that ran out of room: the disk or quota is full, or the file-size limit was reached
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_message(what: str) -> str:
    return (f"{what} failed: the server's disk is full (nothing was changed; the previous file is kept). "
            "Free space on the server, then send it again")


# ------------------------------------------------------------------------------ training vs. server
def exit_when_orphaned(server_pid: int, every_s: float = 1.0) -> None:
    """In the train subprocess (a thread): end the process as soon as the server that started it is gone.

    A stopped (or killed) server used to leave its training running, which then replaced the model that a
    new server might already serve. The model is written only at the very end of a run, so exiting loses
    nothing that was published; the previous model stays.
    """
    while True:
        if os.getppid() != server_pid:
            logging.getLogger(__name__).error(
                f"{CLIENT_MARK}the label server stopped: training stopped, the previous model is kept")
            logging.shutdown()
            os._exit(3)
        time.sleep(every_s)
