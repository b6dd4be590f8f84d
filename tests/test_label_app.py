"""MONAI Label app (apps/tpp_label) served for real on 127.0.0.1 with a datastore of real CT slices.

Starts ``monailabel start_server`` in a subprocess (random free loopback port, bounded waits,
always killed; no ``--conf allow_untrained``), then: /info/ as 3D Slicer reads it (models, trainers
with their options, strategies first + random), /infer refused before any training (409, "train it
first"), /activelearning/first, one /train/tpp_seg round trip on BasicTrainTask (TPP with MAE on every
datastore image + PEFT fine-tuning with a validation split) with MONAI Label's train_stats keys, the
next /infer reporting the new version and equal to the published model with 4-flip TTA, PNG and
Slicer-style NIfTI answers lining up, and bad requests (unknown model, corrupt image) answered with an
HTTP error and a message while the server keeps serving.

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

from tpp_monai.safe_io import CheckpointMismatch
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


class _Pickled:  # not plain data: a weights-only load refuses it
    pass


def test_nnunet_fold_checks_before_serving(tmp_path):
    """The 3D task's model folder: clear errors naming the file and the fix, and no unpickling of a crafted file."""
    import json

    from tpp_monai.label import nnunet3d

    assert nnunet3d.parse_folds("0, 2") == (0, 2) and nnunet3d.parse_folds("all") == ("all",)
    with pytest.raises(nnunet3d.NnUNetFoldError, match="fold numbers or 'all'"):
        nnunet3d.parse_folds("zero")
    with pytest.raises(nnunet3d.NnUNetFoldError, match="dataset.json not found: point --conf nnunet_model_folder"):
        nnunet3d.NnUNetFold(tmp_path / "nope")
    (tmp_path / "plans.json").write_text("{}")
    ds = {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "lung": 1}, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(nnunet3d.NnUNetFoldError, match="2 input channels"):
        nnunet3d.NnUNetFold(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({**ds, "channel_names": {"0": "CT"}}))
    with pytest.raises(nnunet3d.NnUNetFoldError, match="fold_1/checkpoint_final.pth not found"):
        nnunet3d.NnUNetFold(tmp_path, "0,1")
    (tmp_path / "fold_0").mkdir()
    torch.save({"network_weights": {}, "trainer_name": _Pickled()}, tmp_path / "fold_0" / "checkpoint_final.pth")
    fold = nnunet3d.NnUNetFold(tmp_path, "0")
    assert fold.labels == {"lung": 1}
    with pytest.raises(nnunet3d.NnUNetFoldError, match="allow_pickle true"):
        fold.predictor()  # refused before nnU-Net's weights_only=False load could run pickled code
    vol = tmp_path / "v.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4)), str(vol))
    assert nnunet3d.check_volume(vol, max_voxels=8000) == (20, 20, 20)
    with pytest.raises(seg2d.ImageTooLarge, match="8000 voxels is more than the limit of 7999"):
        nnunet3d.check_volume(vol, max_voxels=7999)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(seg2d.ImageReadError, match="single-channel 3D volume"):
        nnunet3d.check_volume(tmp_path / "s.png")


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
        srv = {"url": url, "studies": studies, "model": model_dir / "tpp_seg.pt", "log": root / "server.log",
               "images": sorted(studies.glob("*.png"))}
        # before any training (no --conf allow_untrained): what /info and /infer say about the untrained model
        srv["model_before"] = srv["model"].exists()
        srv["info_before"] = requests.get(f"{url}/info/", timeout=HTTP_TIMEOUT).json()
        srv["infer_before"] = _infer(srv, srv["images"][-1], "json")
        yield srv


@pytest.fixture(scope="module")
def trained(server):
    """One /train/tpp_seg round trip (TPP + PEFT with a validation split), polled until done."""
    r = requests.post(f"{server['url']}/train/tpp_seg", json={"tpp_epochs": 1, "epochs": 2}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    t0, task = time.time(), None
    while time.time() - t0 < TRAIN_TIMEOUT:
        task = requests.get(f"{server['url']}/train/", timeout=HTTP_TIMEOUT).json()
        if task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert task and task.get("status") == "DONE", f"train did not finish: {task}\n{server['log'].read_text()[-3000:]}"
    return task


def _infer(srv, image: Path, output: str = "image", model: str = "tpp_seg"):
    with open(image, "rb") as f:
        return requests.post(f"{srv['url']}/infer/{model}", params={"output": output},
                             files={"file": (image.name, f, "image/png")}, timeout=HTTP_TIMEOUT)


def _mask(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def test_info_lists_models_trainers_and_strategies(server):
    info = requests.get(f"{server['url']}/info/", timeout=HTTP_TIMEOUT).json()
    assert "tpp_seg" in info["models"] and "tpp_seg" in info["trainers"]
    assert set(info["strategies"]) == {"first", "random"}
    m = info["models"]["tpp_seg"]
    assert m["type"] == "segmentation" and m["dimension"] == 2
    assert m["labels"] == {"soft_tissue": 1, "bone": 2}
    assert "stunet3d" not in info["models"]  # the 3D task is listed only with --conf nnunet_model_folder
    cfg = info["trainers"]["tpp_seg"]["config"]  # what 3D Slicer offers and sends back with /train
    assert cfg["val_split"] == 0.2 and cfg["epochs"] == 2 and cfg["tpp_epochs"] == 1
    assert info["datastore"]["total"] == N_IMAGES and info["datastore"]["completed"] == N_LABELLED


def test_untrained_model_is_refused(server):
    """No model file and no --conf allow_untrained: /infer says to train first instead of serving random weights."""
    assert "tpp_seg" in server["info_before"]["models"] and not server["model_before"]  # listed, no file written
    r = server["infer_before"]
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "not been trained yet" in detail and "/train/tpp_seg" in detail and "allow_untrained true" in detail


def test_activelearning_first_returns_first_unlabelled(server):
    r = requests.post(f"{server['url']}/activelearning/first", json={}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == f"headct_{N_LABELLED:02d}" and "path" not in r.json()  # ids, not server paths
    r = requests.post(f"{server['url']}/activelearning/random", json={}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and r.json()["id"] in {p.stem for p in server["images"][N_LABELLED:]}, r.text


def test_train_round_trip_stats_and_reinfer(server, trained):
    details = "\n".join(trained.get("details", []))
    meta = seg2d.read_model_file(server["model"])["meta"]
    assert meta["trained"] and meta["version"] == 1 and meta["tpp"] and meta["pretext"] == "mae"
    assert meta["num_images"] == N_IMAGES and meta["num_labelled"] == N_LABELLED, details
    assert meta["num_val"] > 0 and meta["num_train"] + meta["num_val"] == N_LABELLED  # val_split 0.2: 5 + 1
    assert "TPP report: loss" in server["log"].read_text()  # the TPP learning report's line in the train log

    # train_stats as MONAI Label's BasicTrainTask writes them (what 3D Slicer shows), plus ours
    stats = requests.get(f"{server['url']}/info/", timeout=HTTP_TIMEOUT).json()["train_stats"]["tpp_seg"]
    # epochs counted over the whole run (1 TPP + 2 fine-tuning: Slicer's bar), fine-tuning's own in stage_epoch(s)
    assert stats["epoch"] == stats["total_epochs"] == 3 and stats["version"] == 1 and stats["stage"] == "done"
    assert stats["stage_epoch"] == stats["stage_epochs"] == 2 and stats["tpp_epochs_done"] == 1
    h, m, sec = (int(v) for v in stats["total_time"].split(":"))
    assert 3600 * h + 60 * m + sec >= 0 and stats["total_seconds"] > 0
    assert 0.0 <= stats["best_metric"] <= 1.0 and stats["best_metric"] == stats["eval"]["best_metric"]
    assert 0.0 <= stats["eval"]["metrics"]["val_mean_dice"] <= 1.0 and stats["eval"]["key_metric_name"] == "val_mean_dice"
    assert 0.0 <= stats["train"]["metrics"]["train_mean_dice"] <= 1.0
    assert stats["num_val"] == meta["num_val"] and stats["published_epoch"] == stats["eval"]["best_metric_epoch"]

    img = server["images"][-1]  # an unlabelled slice
    h, w = np.asarray(Image.open(img)).shape
    after = _infer(server, img, "json").json()
    assert after["trained"] is True and after["model_version"] == 1
    assert after["model_mtime_ns"] == server["model"].stat().st_mtime_ns
    m1 = _mask(_infer(server, img))
    assert m1.shape == (h, w) and m1.dtype == np.uint8 and set(np.unique(m1)) <= {0, 1, 2}

    # the server's answer is the published model with the bundles' 4-flip TTA, at the input's size
    from tpp_monai.bundle.inferers import FlipTTAInferer

    model, cfg, _ = seg2d.load_model(server["model"])
    arr, _ = seg2d.read_image_2d(img)
    with torch.no_grad():
        probs = FlipTTAInferer()(seg2d.to_model_input(arr, cfg.img_size, cfg.in_chans)[None], model)
    probs = torch.nn.functional.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
    assert np.array_equal(m1, probs.argmax(1)[0].numpy().astype(np.uint8))


def test_png_and_slicer_nifti_answers_line_up(server, trained, tmp_path):
    """3D Slicer sends a PNG as a (x, y, 1) NIfTI: the answer, read back the same way, is the PNG's answer."""
    import nibabel as nib

    img = server["images"][-1]
    png_mask = _mask(_infer(server, img))
    arr = np.asarray(Image.open(img))
    nii = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.T[..., None]), np.diag([0.5, 0.5, 1, 1])), str(nii))
    with open(nii, "rb") as f:
        r = requests.post(f"{server['url']}/infer/tpp_seg", params={"output": "image"},
                          files={"file": ("slice.nii.gz", f, "application/gzip")}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    (tmp_path / "out.nii.gz").write_bytes(r.content)
    out = nib.load(str(tmp_path / "out.nii.gz"))
    assert np.allclose(out.affine, np.diag([0.5, 0.5, 1, 1]))
    assert np.array_equal(np.asarray(out.dataobj)[..., 0].T, png_mask)


def test_bad_requests_then_still_serving(server, trained):
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
