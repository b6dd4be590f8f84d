"""The label server is safe by default (issue 16, items 5-10), tested on a real server on 127.0.0.1.

One server is started with ``python -m tpp_monai.label.serve`` and no ``--host`` (so the default
bind is what is tested), a private TMPDIR and a datastore of three tiny synthetic PNGs. Attacks:
path traversal in label tags / image ids / label ids (refused, nothing written outside the
datastore), server paths for /infer (refused with one message whether the file exists or not,
also when smuggled in ``params``), failed and oversized uploads (413 naming the limit; the temp
folder is empty afterwards), malformed JSON (400 with the reason), bad /train parameters
(4xx, the model file untouched). The library and train-task checks run without a server.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import label_server
from PIL import Image

from label_helpers import app_copy, tiny_bundle
from tpp_monai.label import images, safety
from tpp_monai.label.serve import server_argv

try:
    import requests
except ImportError:  # pragma: no cover
    requests = None

HAVE_MONAILABEL = importlib.util.find_spec("monailabel") is not None and requests is not None
NO_MONAILABEL = "monailabel is not installed (optional extra, see apps/tpp_label/README.md); server tests skipped"
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT, HTTP_TIMEOUT = 180, 60
SERVER_OWN = ("studies/", "app/", "bundles/", "systmp/", "sessions/", "slicer/")  # what the test server may write to
OHIF = "http://localhost:3000"  # the one cross-origin allowed on the test server (--conf cors_origins)
TRAIN_START_TIMEOUT = 300


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _studies(root: Path) -> Path:
    rng = np.random.default_rng(0)
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in range(3):
        _png(studies / f"img_{i}.png", (rng.random((32, 32)) * 255).astype(np.uint8))
        if i < 2:
            lbl = np.zeros((32, 32), np.uint8)
            lbl[4:16, 4:16], lbl[20:28, 20:28] = 1, 2
            _png(studies / "labels" / "final" / f"img_{i}.png", lbl)
    return studies


def _files(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------ library (no server needed)
def test_names_params_and_bind_checks():
    for bad in ("../x", "..", ".", "a/b", "/etc/passwd", "a\\b", "x\x00y", "", "a" * 300):
        with pytest.raises(safety.RequestError, match="not a plain name"):
            safety.check_name(bad, "label tag")
    assert safety.check_name("final", "label tag") == "final" and safety.check_name("case 01.v2", "image id")

    pretexts = ["dino", "mae"]
    assert safety.validate_train_params({"epochs": "3", "lr": 1e-4, "tpp": "false"}, pretexts) == \
        {"epochs": 3, "lr": 1e-4, "tpp": False}
    for bad, what in (({"epochs": -1}, "epochs must be in"), ({"epochs": 0}, "epochs must be in"),
                      ({"epochs": 2.5}, "whole number"), ({"tpp_epochs": -2}, "tpp_epochs"),
                      ({"batch_size": 0}, "batch_size"), ({"lr": "nan"}, "lr must be"), ({"lr": 0}, "lr must be"),
                      ({"pretext": "jigsaw"}, "not a registered"), ({"device": "/dev/x"}, "device"),
                      ({"epoch": 5}, "unknown train parameter")):
        with pytest.raises(safety.RequestError, match=what):
            safety.validate_train_params(bad, pretexts)

    assert server_argv(["--studies", "s"])[-4:] == ["--host", "127.0.0.1", "--app", str(REPO / "apps" / "tpp_label")]
    assert "0.0.0.0" in server_argv(["--host", "0.0.0.0", "--studies", "s"])
    assert safety.bound_host(["start_server", "--studies", "s"]) == "0.0.0.0"  # monailabel's default
    for host in (None, "0.0.0.0", "192.168.1.5"):
        with pytest.raises(RuntimeError, match="--host 127.0.0.1"):
            safety.check_bind(host, expose=False, auth_enabled=False)
    assert "WITHOUT authentication" in safety.check_bind("0.0.0.0", expose=True, auth_enabled=False)
    assert safety.check_bind("0.0.0.0", expose=True, auth_enabled=True) is None
    assert safety.check_bind("127.0.0.1", expose=False, auth_enabled=False) is None


def test_bound_host_is_read_like_monailabel_reads_it():
    """Issue 21.4: the guard read the first --host and ignored -i; monailabel's argparse binds the last one."""
    main = "/x/monailabel/main.py"
    for argv, bound in ((["start_server", "--host", "127.0.0.1", "--host", "0.0.0.0"], "0.0.0.0"),
                        (["start_server", "-i", "0.0.0.0", "--studies", "s"], "0.0.0.0"),
                        (["start_server", "--host", "127.0.0.1", "-i", "192.168.1.5"], "192.168.1.5"),
                        (["start_server", "--ho", "0.0.0.0"], "0.0.0.0"),  # argparse accepts abbreviations
                        (["start_server", "--host=0.0.0.0", "-i", "127.0.0.1"], "127.0.0.1"),
                        (["start_server", "--studies", "s"], "0.0.0.0")):
        assert safety.bound_host([main, *argv]) == bound, argv
        if bound != "127.0.0.1":
            with pytest.raises(RuntimeError, match="--host 127.0.0.1"):
                safety.check_bind(safety.bound_host([main, *argv]), expose=False, auth_enabled=False)
    assert safety.bound_host(["uvicorn", "monailabel.app:app"]) is None  # not start_server: the socket check guards
    # the launcher adds loopback only when no host is given in any spelling
    assert "127.0.0.1" not in server_argv(["-i", "0.0.0.0", "--studies", "s"])
    assert server_argv(["--studies", "s", "-a", "app"])[-2:] == ["--host", "127.0.0.1"]
    assert safety.validate_train_params({"epochs": 2, "client_id": "user-xyz"}, ["mae"]) == {"epochs": 2}


def _scope(host=b"127.0.0.1:8000", origin=None, server=("127.0.0.1", 8000), method="GET"):
    headers = [(b"host", host)] if host is not None else []
    if origin is not None:
        headers.append((b"origin", origin))
    return {"type": "http", "method": method, "headers": headers, "server": server}


def test_browser_guard_decisions():
    """Issue 21.2 without a server: cross-origin, DNS rebinding (Host), non-loopback connections."""
    g = safety.BrowserGuard(None, allowed_origins=["http://localhost:3000"])
    assert g.refusal(_scope()) is None
    assert g.refusal(_scope(origin=b"http://127.0.0.1:8000")) is None  # the server's own pages
    assert g.refusal(_scope(origin=b"http://localhost:3000", method="OPTIONS")) is None  # the listed OHIF origin
    assert g.refusal(_scope(host=b"[::1]:8000", server=("::1", 8000))) is None
    status, text = g.refusal(_scope(origin=b"https://evil.example"))
    assert status == 403 and "cors_origins" in text
    status, text = g.refusal(_scope(origin=b"null"))  # sandboxed frames and file:// pages
    assert status == 403
    status, text = g.refusal(_scope(host=b"evil.example:8000"))
    assert status == 400 and "DNS-rebinding" in text and "allowed_hosts" in text
    status, text = g.refusal(_scope(host=b"192.168.1.5:8000", server=("192.168.1.5", 8000)))
    assert status == 403 and "loopback" in text  # arrived on the LAN address, not exposed
    exposed = safety.BrowserGuard(None, allowed_hosts=["annot.lab"], expose=True)
    assert exposed.refusal(_scope(host=b"192.168.1.5:8000", server=("192.168.1.5", 8000))) is None
    assert exposed.refusal(_scope(host=b"annot.lab:8000", server=("192.168.1.5", 8000))) is None
    assert exposed.refusal(_scope(host=b"evil.example", server=("192.168.1.5", 8000)))[0] == 400
    with pytest.raises(RuntimeError, match="never '\\*'"):
        safety.check_origins(["*"])
    assert safety.check_origins(["HTTP://LocalHost:3000/"]) == ["http://localhost:3000"]


def test_nan_images_and_255_labels_are_refused_naming_the_file(tmp_path):
    """Issue 21.10 (NaN / Inf images became black images) and 25.1 (a 0/255 label failed only at training)."""
    import nibabel as nib

    a = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    for bad in (np.nan, np.inf):
        b = a.copy()
        b[3, 4] = bad
        nib.save(nib.Nifti1Image(b[..., None], np.eye(4)), str(tmp_path / "scan.nii.gz"))
        with pytest.raises(images.ImageReadError, match=r"scan.nii.gz: 1 of 256 pixels are NaN or Inf"):
            images.read_image_2d(tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(a[..., None], np.eye(4)), str(tmp_path / "ok.nii.gz"))
    assert np.array_equal(images.read_image_2d(tmp_path / "ok.nii.gz")[0], a.T)

    lbl = np.zeros((16, 16), np.uint8)
    lbl[2:8, 2:8] = 255
    with pytest.raises(images.ImageReadError, match=r"label mask.png has class value\(s\) \[255\].*divide the mask by 255"):
        images.check_label_classes(lbl, 2, "mask.png")
    images.check_label_classes(lbl // 255, 2, "mask.png")
    _png(tmp_path / "i.png", np.zeros((16, 16), np.uint8))
    _png(tmp_path / "l.png", lbl)
    with pytest.raises(images.ImageReadError, match="label l.png has class"):  # training names the file too
        images.check_labelled([(tmp_path / "i.png", tmp_path / "l.png")], 3)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def served_bundle(dst: Path) -> Path:
    """A tiny copy of the demo bundle with a ``models/model.pt`` of its own network (untrained weights: these
    tests are about what the server accepts, not about the segmentation)."""
    import torch
    from monai.bundle import ConfigParser

    tiny_bundle(dst)
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    (dst / "models").mkdir()
    torch.save({"model": net.state_dict()}, dst / "models" / "model.pt")
    return dst


def test_model_upload_is_validated_and_atomic(tmp_path):
    """Issue 21.5: an uploaded model replaces the served one only if it is a safe file that fits the bundle."""
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)
    import torch

    main = _load_app_module()
    bundle = served_bundle(tmp_path / "tpp_seg")
    dest = bundle / "models" / "model.pt"
    before = dest.read_bytes()
    good = torch.load(dest, weights_only=True)["model"]
    (tmp_path / "junk.pt").write_bytes(os.urandom(2000))
    torch.save({"x": _Marker(str(tmp_path / "PWNED"))}, tmp_path / "evil.pt")
    torch.save({"model": {k: v for k, v in good.items() if "peft_" not in k}}, tmp_path / "other.pt")
    for name, what in (("junk.pt", "not a weights-only"), ("evil.pt", "not a weights-only"),
                       ("other.pt", "do not fit the bundle's network_def")):
        with pytest.raises(main.ModelFileRefused, match=what):
            main.install_model_file(str(tmp_path / name), str(bundle))
        assert dest.read_bytes() == before and not (tmp_path / "PWNED").exists()
    new = {k: v + 1 if v.is_floating_point() else v for k, v in good.items()}
    torch.save(new, tmp_path / "new.pt")  # a bare state_dict is accepted too
    assert main.install_model_file(str(tmp_path / "new.pt"), str(bundle)) == dest.stat().st_mtime_ns
    assert dest.read_bytes() == (tmp_path / "new.pt").read_bytes()
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt"]  # no temp file left


def test_datastore_upload_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    """Issue 21.6: a copy that fails on a full disk answered 500 and left a truncated file in the datastore."""
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)
    import errno

    import monailabel.datastore.local as local

    main = _load_app_module()
    studies = _studies(tmp_path)
    store = main.SafeDatastore(str(studies), extensions=["*.png"], auto_reload=False, num_classes=3)
    old_label = (studies / "labels" / "final" / "img_0.png").read_bytes()
    new = tmp_path / "upload.png"
    lbl = np.zeros((32, 32), np.uint8)
    lbl[1:5, 1:5] = 2
    _png(new, lbl)
    real_copy = local.shutil.copy

    def full_disk_copy(src, dst):  # writes half the file, then the disk is full
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.shutil, "copy", full_disk_copy)
    with pytest.raises(safety.RequestError, match="disk is full") as e:
        store.save_label("img_0", str(new), "final", {})
    assert e.value.status == 507 and (studies / "labels" / "final" / "img_0.png").read_bytes() == old_label
    with pytest.raises(safety.RequestError, match="disk is full"):
        store.add_image("img_9", str(new), {})
    assert not (studies / "img_9.png").exists() and "img_9" not in store.list_images()
    assert not list(studies.rglob("*.tpp-previous"))
    monkeypatch.setattr(local.shutil, "copy", real_copy)
    bad = tmp_path / "mask255.png"
    _png(bad, lbl * 100)
    with pytest.raises(safety.RequestError, match=r"label upload for image 'img_0': label has class value\(s\) \[200\]"):
        store.save_label("img_0", str(bad), "final", {})
    store.save_label("img_0", str(new), "final", {})
    assert np.array_equal(np.asarray(Image.open(studies / "labels" / "final" / "img_0.png")), lbl)
    assert json.loads((studies / "datastore_v2.json").read_text())["objects"]["img_0"]["labels"]["final"]


def test_stage_progress_counts_the_whole_run():
    """Issue 25.1: during TPP train_stats were empty (Slicer's bar sat at 1%)."""
    from types import SimpleNamespace

    from tpp_monai.label.progress import StageProgress

    seen = []
    p = StageProgress(seen.append, stage_epochs=3, total_epochs=5)
    for ep in (0, 1, 3):
        p(SimpleNamespace(state=SimpleNamespace(epoch=ep, output={"loss": 0.5})))
    assert [(s["stage"], s["epoch"], s["total_epochs"], s["stage_epoch"]) for s in seen] == \
        [("tpp", 0, 5, 0), ("tpp", 1, 5, 1), ("tpp", 3, 5, 3)]
    assert all("total_time" not in s and s["tpp_loss"] == 0.5 for s in seen)  # Slicer: total_time = finished


def test_train_subprocess_exits_when_its_server_is_gone(tmp_path):
    """Issue 21.12 for a server killed outright (no signal handler runs): its train subprocess stops itself."""
    import psutil
    import signal

    ready = tmp_path / "ready"
    grandchild = (f"import os, sys; sys.path.insert(0, {str(REPO)!r}); "
                  "from tpp_monai.label.safety import exit_when_orphaned; "
                  f"ppid = os.getppid(); open({str(ready)!r}, 'w').write(str(os.getpid())); "
                  "exit_when_orphaned(ppid, 0.1)")
    server = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(600)"])
    try:
        _wait_file = time.time()
        while not ready.exists() or not ready.read_text():
            assert time.time() - _wait_file < 120 and server.poll() is None, "the train stand-in did not start"
            time.sleep(0.2)
        train = psutil.Process(int(ready.read_text()))
        assert train.is_running()
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=20)
        gone, alive = psutil.wait_procs([train], timeout=30)
        assert not alive, "the train stand-in kept running after its server was killed"
    finally:
        if server.poll() is None:
            server.kill()


def test_task_view_hides_tracebacks_and_paths(tmp_path):
    task = {"id": "1", "status": "ERROR", "start_ts": "t", "request": {"model": "m", "epochs": 2, "bundle_path": str(tmp_path)},
            "details": ["[..] INFO (app:1) - Initializing App from: " + str(tmp_path / "app"),
                        "Traceback (most recent call last):", f'  File "{tmp_path}/x.py", line 3, in f',
                        f"[..] ERROR (main:9) - {safety.CLIENT_MARK}training failed: ValueError: bad {tmp_path}/l.png"]}
    view = safety.client_task_view(task, [str(tmp_path)])
    assert view["request"] == {"model": "m", "epochs": 2}
    assert view["details"] == ["training failed: ValueError: bad <server>/l.png"]
    assert str(tmp_path) not in json.dumps(view) and "Traceback" not in json.dumps(view)


def test_image_pixel_cap_reads_header_only(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (5000, 4000)).save(big)
    t0 = time.time()
    with pytest.raises(images.ImageTooLarge, match=r"5000 = 20000000 pixels .* limit of 1000000 pixels"):
        images.read_image_2d(big, max_pixels=1_000_000)
    assert time.time() - t0 < 2.0
    assert images.read_image_2d(big, max_pixels=None)[0].shape == (4000, 5000)


def _load_app_module():
    """apps/tpp_label/main.py as monailabel loads it (its folder on sys.path while it runs: ``lib`` imports)."""
    from monailabel.utils.others.class_utils import module_from_file

    return module_from_file("tpp_label_main_under_test", str(REPO / "apps" / "tpp_label" / "main.py"))


def test_train_task_failure_shows_reason_not_traceback(tmp_path, caplog):
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)
    main = _load_app_module()
    bundle = tiny_bundle(tmp_path / "tpp_seg")
    task = main.BundleTPPTrain("tpp_seg", str(bundle), {**main.DEFAULTS, "epochs": "1"}, log_dir=str(tmp_path / "logs"))

    class Store:  # a datastore whose one label has a class the bundle does not have
        def datalist(self):
            return [{"image": str(tmp_path / "a.png"), "label": str(tmp_path / "a_label.png")}]

        def list_images(self):
            return ["a"]

        def get_labeled_images(self, tag=None):
            return ["a"]

        def get_image_uri(self, i):
            return str(tmp_path / "a.png")

    _png(tmp_path / "a.png", np.zeros((32, 32), np.uint8))
    _png(tmp_path / "a_label.png", np.full((32, 32), 7, np.uint8))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
        task({"model": "tpp_seg", "tpp": False, "epochs": 1}, Store())
    client = [r.getMessage() for r in caplog.records if safety.CLIENT_MARK in r.getMessage()]
    assert any("training failed" in m and "label a_label.png has class value(s) [7]" in m for m in client), client
    assert not any("Traceback" in m or str(tmp_path) in m for m in client)
    assert "Traceback" in (tmp_path / "logs" / "train_errors.log").read_text()
    assert not (bundle / "models").exists()  # refused before the bundle ran
    caplog.clear()
    with pytest.raises(SystemExit):  # invalid parameters are refused in the task too (a request from the CLI)
        task({"model": "tpp_seg", "epochs": -1}, Store())
    assert any("epochs must be in" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ server (needs monailabel)
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)
    root = tmp_path_factory.mktemp("labelsec")
    studies, app, tmp = _studies(root), app_copy(root / "app"), root / "systmp"
    tmp.mkdir()
    bundle = served_bundle(root / "bundles" / "tpp_seg")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tpp_monai.label.serve", "--app", str(app), "--studies", str(studies),
           "--port", str(port), "--conf", "bundles", str(bundle), "--conf", "max_upload_mb", "1",
           "--conf", "cors_origins", OHIF]  # no --host: the default
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
           "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_TRACKING_ENABLED": "false"}
    url = f"http://127.0.0.1:{port}"
    with label_server(cmd, env, root, url, START_TIMEOUT) as proc:
        yield {"url": url, "root": root, "studies": studies, "tmp": tmp, "pid": proc.pid, "port": port,
               "model": bundle / "models" / "model.pt", "tmp_at_start": _files(tmp)}


def test_default_bind_is_loopback(srv):
    import psutil

    listening = [c.laddr for c in psutil.Process(srv["pid"]).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    assert srv["port"] in {a.port for a in listening}


def test_plain_monailabel_command_does_not_listen_on_all_interfaces(tmp_path):
    """``monailabel start_server`` without --host would bind 0.0.0.0: the app stops it before it listens."""
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)
    app_copy(tmp_path / "app")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(tmp_path / "app"),
           "--studies", str(_studies(tmp_path)), "--port", str(port), "--conf", "bundles", str(tiny_bundle(tmp_path / "tpp_seg"))]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=START_TIMEOUT)
    assert out.returncode != 0, out.stdout[-2000:]
    log = out.stdout + out.stderr
    assert "would listen on 0.0.0.0" in log and "--host 127.0.0.1" in log and "Uvicorn running" not in log, log[-3000:]


def test_traversal_refused_and_nothing_written_outside(srv):
    u, root, studies = srv["url"], srv["root"], srv["studies"]
    outside_before = {p for p in _files(root) if not p.startswith(SERVER_OWN)}
    studies_before = _files(studies)
    label = (studies / "labels" / "final" / "img_0.png").read_bytes()
    attacks = [
        ("put", "/datastore/label", {"image": "img_0", "tag": "../../escape_tag"}, "label"),
        ("put", "/datastore/label", {"image": "img_0", "tag": str(root / "escape_abs")}, "label"),
        ("put", "/datastore/label", {"image": "../escape_img", "tag": "final"}, "label"),
        ("put", "/datastore/image", {"image": "../escape_new"}, "file"),
        ("put", "/datastore/image", {"image": ".."}, "file"),
        ("get", "/datastore/label", {"label": "../img_0", "tag": "final"}, None),
        ("get", "/datastore/label", {"label": "img_0", "tag": "../final"}, None),
        ("delete", "/datastore/label", {"id": "img_0", "tag": "../../labels"}, None),
        ("delete", "/datastore/image", {"id": "../studies"}, None),
    ]
    for method, path, params, field in attacks:
        files = {field: ("img_0.png", label, "image/png")} if field else None
        r = requests.request(method, u + path, params=params, files=files, timeout=HTTP_TIMEOUT)
        assert r.status_code == 400, (path, params, r.status_code, r.text)
        assert "not a plain name" in r.json()["detail"], r.text
    assert not list(root.rglob("escape*")) and not (root / "escape_abs").exists()
    assert {p for p in _files(root) if not p.startswith(SERVER_OWN)} == outside_before
    assert _files(studies) - {"datastore_v2.json", ".lock"} == studies_before - {"datastore_v2.json", ".lock"}
    # a plain tag still works (the guard is not a blanket refusal)
    r = requests.put(u + "/datastore/label", params={"image": "img_2", "tag": "review"},
                     files={"label": ("img_2.png", label, "image/png")}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and (studies / "labels" / "review" / "img_2.png").is_file(), r.text


def test_infer_reads_only_datastore_or_uploads(srv):
    u, root = srv["url"], srv["root"]
    existing = _png(root / "outside.png", np.zeros((32, 32), np.uint8))
    answers = set()
    for p in (existing, root / "missing.png", "/etc/hostname", "/no/such/file.png", "../outside.png"):
        for kw in ({"params": {"image": str(p), "output": "json"}},  # ?image=<path>
                   {"params": {"image": "img_0", "output": "json"}, "data": {"params": json.dumps({"image": str(p)})}}):
            r = requests.post(f"{u}/infer/tpp_seg", timeout=HTTP_TIMEOUT, **kw)
            answers.add((r.status_code, r.text))
        r = requests.post(f"{u}/infer/wsi/tpp_seg", params={"image": str(p)}, timeout=HTTP_TIMEOUT)  # probes paths too
        answers.add((r.status_code, r.text))
    assert len(answers) == 1, answers  # one answer, whether the file exists or not
    status, text = answers.pop()
    assert status == 400 and "server paths are not accepted" in text and str(root) not in text
    r = requests.post(f"{u}/infer/tpp_seg", params={"image": "img_1", "output": "json"}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and r.json()["shape"] == [32, 32], r.text
    assert r.json()["trained"] is True and r.json()["model_mtime_ns"] == srv["model"].stat().st_mtime_ns
    r = requests.post(f"{u}/infer/tpp_seg", params={"image": "no_such_id", "output": "json"}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 404 and "server paths are not accepted" in r.json()["detail"]
    with open(existing, "rb") as f:  # an upload is fine
        r = requests.post(f"{u}/infer/tpp_seg", params={"output": "json"}, files={"file": ("x.png", f, "image/png")},
                          timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    with open(existing, "rb") as f:  # and so is a session (3D Slicer uploads a local volume as one)
        sid = requests.put(f"{u}/session/", files={"files": ("x.png", f, "image/png")}, timeout=HTTP_TIMEOUT).json()
    r = requests.post(f"{u}/infer/tpp_seg", params={"session_id": sid["session_id"], "output": "json"},
                      timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and r.json()["shape"] == [32, 32], r.text
    r = requests.post(f"{u}/infer/tpp_seg", params={"session_id": "../../x", "output": "json"}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 400 and "session id" in r.json()["detail"], r.text


def test_failed_uploads_leave_no_temp_files_and_sizes_are_capped(srv, tmp_path):
    u = srv["url"]
    good = (srv["studies"] / "img_0.png").read_bytes()
    huge = tmp_path / "huge.png"  # the case: a ~160 KB PNG of 13000 x 13000 pixels (took 39 s and 5.2 GB)
    Image.new("L", (13000, 13000)).save(huge)
    corrupt = b"\x89PNG\r\n\x1a\n" + b"not a png" * 20

    def post(files, **kw):
        return requests.post(f"{u}/infer/tpp_seg", params={"output": "json", **kw.pop("params", {})}, files=files,
                             timeout=HTTP_TIMEOUT, **kw)

    t0 = time.time()
    r = post({"file": ("huge.png", huge.read_bytes(), "image/png")})
    took = time.time() - t0
    assert r.status_code == 413 and "limit of 67108864 pixels" in r.json()["detail"], r.text
    assert took < 10, took
    r = requests.put(f"{u}/datastore/image", files={"file": ("huge.png", huge.read_bytes(), "image/png")},
                     timeout=HTTP_TIMEOUT)
    assert r.status_code == 413 and "pixels" in r.json()["detail"], r.text
    r = post({"file": ("big.png", b"\0" * (1024 * 1024 + 10), "image/png")})  # body over --conf max_upload_mb 1
    assert r.status_code == 413 and "limit of 1048576 bytes" in r.json()["detail"], r.text
    r = post({"file": ("c.png", corrupt, "image/png")})
    assert r.status_code == 400 and "cannot read" in r.json()["detail"] and str(srv["root"]) not in r.text
    r = post({"file": ("g.png", good, "image/png")}, data={"params": "{not json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"], r.text
    r = requests.put(f"{u}/datastore/label", params={"image": "img_0", "tag": "../x"},
                     files={"label": ("l.png", good, "image/png")}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 400
    r = requests.put(f"{u}/datastore/label", params={"image": "img_0", "tag": "final"},
                     files={"label": ("l.png", corrupt, "image/png")}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 400 and "label upload" in r.json()["detail"], r.text
    r = requests.put(f"{u}/datastore/image/info", params={"image": "img_0"}, data={"info": "[1,"}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"], r.text
    assert requests.get(f"{u}/logs/", timeout=HTTP_TIMEOUT).status_code == 403  # the log holds the tracebacks
    assert _files(srv["tmp"]) == srv["tmp_at_start"]  # every upload of the failed requests is gone


def test_bad_train_params_refused_before_training(srv):
    u, model = srv["url"], srv["model"]
    mtime = model.stat().st_mtime_ns
    for params, what in (({"epochs": -1}, "epochs must be in"), ({"lr": "abc"}, "lr must be"),
                         ({"batch_size": 0}, "batch_size"), ({"epochs": 1, "max_epochs": 3}, "unknown train parameter")):
        r = requests.post(f"{u}/train/tpp_seg", json=params, timeout=HTTP_TIMEOUT)
        assert r.status_code == 400 and what in r.json()["detail"], r.text
    r = requests.post(f"{u}/train/", json={"tpp_seg": {"epochs": -1}}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 400 and "epochs" in r.json()["detail"], r.text
    r = requests.get(f"{u}/train/", timeout=HTTP_TIMEOUT)
    assert r.status_code == 404  # nothing was started
    assert model.stat().st_mtime_ns == mtime


def test_reload_keeps_the_guards(srv):
    u = srv["url"]
    assert requests.post(f"{u}/reload", timeout=HTTP_TIMEOUT).status_code == 200  # monailabel rebuilds the app
    r = requests.put(f"{u}/datastore/label", params={"image": "img_0", "tag": "../../escape_reload"},
                     files={"label": ("l.png", (srv["studies"] / "img_0.png").read_bytes(), "image/png")},
                     timeout=HTTP_TIMEOUT)
    assert r.status_code == 400 and "not a plain name" in r.json()["detail"], r.text
    r = requests.post(f"{u}/train/tpp_seg", json={"epochs": 0}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 400 and "epochs" in r.json()["detail"], r.text
    assert not list(srv["root"].rglob("escape*")) and _files(srv["tmp"]) == srv["tmp_at_start"]


# ------------------------------------------------ issue 21 (2, 3, 5, 6, 10, 13, 14) on the server
def test_browsers_get_no_cross_origin_access_and_host_is_checked(srv):
    u, port = srv["url"], srv["port"]
    for method, path in (("GET", "/datastore/?output=all"), ("POST", "/activelearning/first"), ("GET", "/info/")):
        r = requests.request(method, u + path, headers={"Origin": "https://evil.example"}, timeout=HTTP_TIMEOUT)
        assert r.status_code == 403 and "cors_origins" in r.json()["detail"], (path, r.status_code, r.text)
        assert not any(k.lower().startswith("access-control") for k in r.headers), r.headers
    for m in ("PUT", "DELETE"):  # preflights of the requests that replace the model or delete data
        r = requests.options(u + "/model/tpp_seg", headers={"Origin": "https://evil.example",
                                                            "Access-Control-Request-Method": m}, timeout=HTTP_TIMEOUT)
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, r.headers
    for host in ("evil.example", f"evil.example:{port}", "attacker.test:80"):  # DNS rebinding
        r = requests.get(u + "/datastore/?output=all", headers={"Host": host}, timeout=HTTP_TIMEOUT)
        assert r.status_code == 400 and "DNS-rebinding" in r.json()["detail"], r.text
    r = requests.options(u + "/datastore/label", headers={"Origin": OHIF, "Access-Control-Request-Method": "PUT"},
                         timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == OHIF, r.headers
    r = requests.get(u + "/info/", headers={"Origin": OHIF}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == OHIF
    r = requests.get(u + "/info/", headers={"Origin": u, "Host": f"127.0.0.1:{port}"}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text  # the server's own pages
    assert requests.get(f"http://localhost:{port}/info/", timeout=HTTP_TIMEOUT).status_code == 200


def test_infer_label_param_model_upload_and_obscure_requests_get_4xx(srv, tmp_path):
    u, model = srv["url"], srv["model"]
    answers = set()
    for p in ("/etc/hostname", "/no/such/file", str(srv["studies"] / "img_0.png")):  # exists or not: one answer
        r = requests.post(f"{u}/infer/tpp_seg", params={"image": "img_0", "output": "json"},
                          data={"params": json.dumps({"label": p})}, timeout=HTTP_TIMEOUT)
        answers.add((r.status_code, r.text))
    assert len(answers) == 1 and answers.pop()[0] == 400
    r = requests.post(f"{u}/infer/tpp_seg", params={"image": "img_0", "output": "json"},
                      files={"label": ("l.png", (srv["studies"] / "labels" / "final" / "img_0.png").read_bytes())},
                      timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text  # an uploaded label is fine

    before = model.read_bytes()
    r = requests.put(f"{u}/model/tpp_seg", files={"file": ("m.pt", b"any bytes")}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 403 and "allow_model_upload" in r.json()["detail"], r.text
    assert requests.delete(f"{u}/model/tpp_seg", timeout=HTTP_TIMEOUT).status_code == 403
    assert model.read_bytes() == before

    good = (srv["studies"] / "img_0.png").read_bytes()
    mp = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'

    def chunked():  # no content-length: the cap is found while reading
        yield mp
        for _ in range(24):
            yield b"\0" * 65536
        yield b"\r\n--xx--\r\n"

    for what, call, status, text in (
            ("no input", lambda: requests.post(f"{u}/infer/tpp_seg", timeout=HTTP_TIMEOUT), 400, "no input"),
            ("truncated multipart", lambda: requests.put(f"{u}/datastore/?image=zz", data=mp + good[:100],
             headers={"content-type": "multipart/form-data; boundary=xx"}, timeout=HTTP_TIMEOUT), 422, "file"),
            ("NUL in image id", lambda: requests.post(f"{u}/infer/tpp_seg", params={"image": "a\x00b"},
                                                      timeout=HTTP_TIMEOUT), 400, "server paths are not accepted"),
            ("NUL in strategy", lambda: requests.post(f"{u}/activelearning/fi\x00rst", json={}, timeout=HTTP_TIMEOUT),
             404, "no active-learning strategy"),
            ("NUL in session id", lambda: requests.get(f"{u}/session/a\x00b", timeout=HTTP_TIMEOUT), 400, "session id"),
            ("/proxy/dicom", lambda: requests.get(f"{u}/proxy/dicom/qido/studies", timeout=HTTP_TIMEOUT), 404,
             "no DICOMweb server"),
            ("/logs/gpu", lambda: requests.get(f"{u}/logs/gpu", timeout=HTTP_TIMEOUT), 403, "authentication"),
            ("chunked oversize", lambda: requests.post(f"{u}/infer/tpp_seg", data=chunked(), timeout=HTTP_TIMEOUT,
             headers={"content-type": "multipart/form-data; boundary=xx"}), 413, "limit of 1048576 bytes")):
        r = call()
        assert r.status_code == status and text in r.text, (what, r.status_code, r.text)

    nan = np.zeros((32, 32, 1), np.float32)
    nan[5, 5] = np.nan
    import nibabel as nib

    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan_slice.nii.gz"))
    for r in (requests.put(f"{u}/datastore/?image=nan_slice", timeout=HTTP_TIMEOUT,
                           files={"file": ("nan_slice.nii.gz", (tmp_path / "nan_slice.nii.gz").read_bytes())}),
              requests.post(f"{u}/infer/tpp_seg", params={"output": "json"}, timeout=HTTP_TIMEOUT,
                            files={"file": ("nan_slice.nii.gz", (tmp_path / "nan_slice.nii.gz").read_bytes())})):
        assert r.status_code == 400 and "NaN or Inf" in r.json()["detail"], r.text
    assert not list(srv["studies"].glob("nan_slice*"))

    sid = requests.put(f"{u}/session/", files={"files": ("x.png", good, "image/png")}, timeout=HTTP_TIMEOUT)
    assert sid.status_code == 200 and str(srv["root"]) not in sid.text and "/" not in json.dumps(
        sid.json()["session_info"]), sid.text
    r = requests.get(f"{u}/session/{sid.json()['session_id']}", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and str(srv["root"]) not in r.text and r.json()["image"] == "x.png", r.text


# --------------------------------------------- issue 25.1: everything 3D Slicer does, with MONAI Label's client
def _wait(what, pred, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_slicer_calls_through_monailabel_client(srv, tmp_path):
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    c = MONAILabelClient(srv["url"], tmpdir=str(tmp_path), client_id="user-xyz")  # as the Slicer plugin makes it
    info = c.info()
    assert "tpp_seg" in info["models"] and "tpp_seg" in info["trainers"]
    sample = c.next_sample("first", {})
    assert sample["id"] and "path" not in sample
    img = _png(tmp_path / "case_7.png", (np.random.default_rng(7).random((32, 32)) * 255).astype(np.uint8))
    assert c.upload_image(str(img), "case_7")["image"] == "case_7"
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255  # a 0/255 mask: refused at upload, naming the image and the fix
    bad = _png(tmp_path / "case_7_label.png", mask)
    with pytest.raises(MONAILabelClientException, match=r"case_7.*class value\(s\) \[255\].*divide the mask by 255"):
        c.save_label("case_7", str(bad), tag="final")
    good = _png(tmp_path / "case_7_ok.png", mask // 255)
    c.save_label("case_7", str(good), tag="final", params={"label_info": [{"name": "soft_tissue", "idx": 1}]})
    assert np.array_equal(np.asarray(Image.open(srv["studies"] / "labels" / "final" / "case_7.png")), mask // 255)
    out, res = c.infer("tpp_seg", "case_7", {})
    assert res["shape"] == [32, 32] and np.asarray(Image.open(out)).shape == (32, 32)

    before = srv["model"].stat().st_mtime_ns
    task = c.train_start("tpp_seg", {**info["trainers"]["tpp_seg"]["config"], "tpp_epochs": 400, "epochs": 1})
    assert task["status"] in ("SUBMITTED", "RUNNING"), task

    t_start = int(time.time())

    def tpp_progress():  # this run's stats (start_ts), one TPP epoch done
        st = c.info().get("train_stats", {}).get("tpp_seg") or {}
        return st if st.get("stage") == "tpp" and st.get("epoch", 0) >= 1 and st["start_ts"] >= t_start else None

    st = _wait("TPP progress in train_stats", tpp_progress, TRAIN_START_TIMEOUT)
    assert st["total_epochs"] == 401 and st["stage_epochs"] == 400 and "total_time" not in st
    assert 0 < 100 * st["epoch"] / st["total_epochs"] < 100  # what Slicer's progress bar shows (not stuck at 1%)
    assert c.train_status(check_if_running=True)
    stopped = c.train_stop()
    assert stopped["status"] == "STOPPED", stopped
    assert not c.train_status(check_if_running=True)
    time.sleep(2)
    assert srv["model"].stat().st_mtime_ns == before


@pytest.mark.slow
def test_stopping_the_server_stops_its_training(srv):
    """Issue 21.12 (runs last: it stops the module's server). Stopped with SIGTERM while training runs: the
    train subprocess ends with the server and never replaces the model."""
    import psutil
    import signal

    u, before = srv["url"], srv["model"].stat().st_mtime_ns
    r = requests.post(f"{u}/train/tpp_seg", json={"tpp_epochs": 400, "epochs": 1},
                      timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    server = psutil.Process(srv["pid"])
    children = _wait("the train subprocess", lambda: server.children(recursive=True), TRAIN_START_TIMEOUT)
    time.sleep(3)  # under way (it runs for minutes: 400 TPP epochs)
    assert all(c.is_running() for c in children)
    os.kill(srv["pid"], signal.SIGTERM)
    gone, alive = psutil.wait_procs([server, *children], timeout=60)
    for p in alive:  # the bug's orphan: do not leave it training on the test machine
        p.kill()
    assert not alive, f"still running after the server was stopped: {alive}"
    time.sleep(2)
    assert srv["model"].stat().st_mtime_ns == before
