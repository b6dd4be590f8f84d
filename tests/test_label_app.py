"""MONAI Label app (apps/tpp_label) served for real on 127.0.0.1 with a datastore of real CT slices.

Starts ``monailabel start_server`` in a subprocess (random free loopback port, bounded waits,
always killed), then: /info/, /infer/tpp_seg on a real head-CT slice (mask shape and labels),
a short /train/tpp_seg (TPP with MAE on every datastore image + PEFT fine-tuning on the labelled
ones, polled until done), the model file replaced and the next /infer reporting the new version,
and bad requests (unknown model, corrupt image) answered with an HTTP error and a message while
the server keeps serving.

The server tests need the optional extra (install commands in apps/tpp_label/README.md) and are
skipped with the reason when ``monailabel`` is not importable; the library tests (image
orientation across PNG/NIfTI, model file round trip and backbone check) always run.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import label_server
import torch
from PIL import Image

from tpp_monai.checkpoint import CheckpointMismatch
from tpp_monai.data import demo_data as dd
from tpp_monai.label import seg2d

try:
    import requests  # a monailabel dependency; only the server tests use it
except ImportError:  # pragma: no cover
    requests = None

HAVE_MONAILABEL = importlib.util.find_spec("monailabel") is not None and requests is not None
NO_MONAILABEL = ("monailabel is not installed (optional extra: see apps/tpp_label/README.md for the install "
                 "commands); the server tests are skipped, the library tests still run")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "tpp_label"
N_IMAGES, N_LABELLED = 10, 6
START_TIMEOUT, TRAIN_TIMEOUT, HTTP_TIMEOUT = 180, 420, 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ library (runs without monailabel)
def test_png_and_slicer_nifti_line_up(cache, tmp_path):
    import nibabel as nib

    e = dd.load_datalist(cache, "datalist_headct.json")["training"][40]
    img, info = seg2d.read_image_2d(e["image"])
    lbl, _ = seg2d.read_image_2d(e["label"])
    assert info["format"] == "png" and img.shape == lbl.shape == (96, 96) and set(np.unique(lbl)) == {0, 1, 2}
    # a label as 3D Slicer saves it for that PNG: data[x, y, 0] = mask[y, x]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lbl.T[..., None]), np.eye(4)), str(tmp_path / "l.nii.gz"))
    back, ninfo = seg2d.read_image_2d(tmp_path / "l.nii.gz")
    assert ninfo["format"] == "nifti" and np.array_equal(back, lbl)
    seg2d.write_mask_2d(lbl, tmp_path / "w.nii.gz", ninfo)  # and the writer inverts it
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj)[..., 0], lbl.T)
    with pytest.raises(seg2d.ImageReadError, match="cannot read"):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        seg2d.read_image_2d(tmp_path / "bad.png")


def test_model_file_round_trip_and_backbone_check(cache, tmp_path):
    e = dd.load_datalist(cache, "datalist_headct.json")["training"][40]
    img, _ = seg2d.read_image_2d(e["image"])
    cfg = seg2d.Seg2DConfig(img_size=32, vit_overrides={"depth": 4})
    torch.manual_seed(0)
    model = seg2d.build_model(cfg).eval()
    seg2d.save_model(tmp_path / "m.pt", model, cfg, {"version": 3})
    obj = seg2d.read_model_file(tmp_path / "m.pt")
    assert obj["meta"]["version"] == 3 and not any(k.startswith("backbone.blocks.0.attn.qkv") for k in obj["state_dict"])
    loaded, cfg2, meta = seg2d.load_model(tmp_path / "m.pt")
    assert cfg2 == cfg and np.array_equal(seg2d.predict(model, img, cfg), seg2d.predict(loaded, img, cfg))
    with pytest.raises(CheckpointMismatch, match="another backbone"):
        seg2d.load_model(tmp_path / "m.pt", overrides={"init_seed": 1})


# ------------------------------------------------------------------------ server (needs monailabel)
@pytest.fixture(scope="module")
def server(cache, tmp_path_factory):
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)

    entries = dd.load_datalist(cache, "datalist_headct.json")["training"]
    step = max(1, len(entries) // N_IMAGES)
    picked = entries[::step][:N_IMAGES]
    root = tmp_path_factory.mktemp("label")
    studies, app, model_dir = root / "studies", root / "app", root / "model"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, e in enumerate(picked):  # real head-CT slices (96x96 uint8) + their bone / soft-tissue masks
        name = f"headct_{i:02d}.png"
        shutil.copy(e["image"], studies / name)
        if i < N_LABELLED:
            shutil.copy(e["label"], studies / "labels" / "final" / name)
    app.mkdir()
    shutil.copy(APP / "main.py", app / "main.py")  # start_server creates model/, logs/, bin/ in the app dir
    port = _free_port()
    # same as the ``monailabel start_server`` CLI (that shell wrapper runs whatever ``python`` is on PATH)
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "models", "tpp_seg", "--conf", "model_dir", str(model_dir), "--conf", "img_size", "64",
           "--conf", "vit_overrides", '{"depth": 4}', "--conf", "tpp_epochs", "1", "--conf", "epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_TRACKING_ENABLED": "false"}
    url = f"http://127.0.0.1:{port}"
    with label_server(cmd, env, root, url, START_TIMEOUT):
        yield {"url": url, "studies": studies, "model": model_dir / "tpp_seg.pt", "log": root / "server.log",
               "images": sorted(studies.glob("*.png"))}


def _infer(srv, image: Path, output: str = "image", model: str = "tpp_seg"):
    with open(image, "rb") as f:
        return requests.post(f"{srv['url']}/infer/{model}", params={"output": output},
                             files={"file": (image.name, f, "image/png")}, timeout=HTTP_TIMEOUT)


def _mask(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def test_info_lists_model_and_trainer(server):
    info = requests.get(f"{server['url']}/info/", timeout=HTTP_TIMEOUT).json()
    assert "tpp_seg" in info["models"] and "tpp_seg" in info["trainers"]
    m = info["models"]["tpp_seg"]
    assert m["type"] == "segmentation" and m["dimension"] == 2
    assert m["labels"] == {"soft_tissue": 1, "bone": 2}
    assert info["datastore"]["total"] == N_IMAGES and info["datastore"]["completed"] == N_LABELLED


def test_infer_train_reinfer(server):
    img = server["images"][-1]  # an unlabelled slice
    h, w = np.asarray(Image.open(img)).shape
    before = _infer(server, img, "json").json()
    assert before["trained"] is False and before["model_version"] == 0
    m0 = _mask(_infer(server, img))
    assert m0.shape == (h, w) and m0.dtype == np.uint8 and set(np.unique(m0)) <= {0, 1, 2}
    mtime0 = server["model"].stat().st_mtime_ns

    r = requests.post(f"{server['url']}/train/tpp_seg", json={"tpp_epochs": 1, "epochs": 2}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    t0, task = time.time(), None
    while time.time() - t0 < TRAIN_TIMEOUT:
        task = requests.get(f"{server['url']}/train/", timeout=HTTP_TIMEOUT).json()
        if task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert task and task.get("status") == "DONE", f"train did not finish: {task}\n{server['log'].read_text()[-3000:]}"
    details = "\n".join(task.get("details", []))

    meta = seg2d.read_model_file(server["model"])["meta"]
    assert server["model"].stat().st_mtime_ns != mtime0
    assert meta["trained"] and meta["version"] == 1 and meta["tpp"] and meta["pretext"] == "mae"
    assert meta["num_images"] == N_IMAGES and meta["num_labelled"] == N_LABELLED, details

    after = _infer(server, img, "json").json()
    assert after["trained"] is True and after["model_version"] == 1
    assert after["model_mtime_ns"] == server["model"].stat().st_mtime_ns
    m1 = _mask(_infer(server, img))
    assert m1.shape == (h, w) and set(np.unique(m1)) <= {0, 1, 2}
    assert not np.array_equal(m0, m1)  # the new weights are used
    stats = requests.get(f"{server['url']}/info/", timeout=HTTP_TIMEOUT).json()["train_stats"]["tpp_seg"]
    assert stats["version"] == 1


def test_bad_requests_then_still_serving(server):
    img = server["images"][0]
    r = _infer(server, img, model="no_such_model")
    assert 400 <= r.status_code < 600 and "no_such_model" in r.json()["detail"] and "tpp_seg" in r.json()["detail"]
    r = requests.post(f"{server['url']}/train/no_such_model", json={}, timeout=HTTP_TIMEOUT)
    assert 400 <= r.status_code < 600 and "no_such_model" in r.json()["detail"]

    bad = server["studies"].parent / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    r = _infer(server, bad)
    assert 400 <= r.status_code < 500, r.text
    assert "bad image" in r.json()["detail"] and "cannot read" in r.json()["detail"]

    m = _mask(_infer(server, img))  # still serving
    assert m.shape == np.asarray(Image.open(img)).shape
    assert requests.get(f"{server['url']}/info/", timeout=HTTP_TIMEOUT).status_code == 200
