"""MONAI Label app (apps/tpp_label) serving and training a real tpp-monai bundle, through MONAI Label's own tools.

The bundle is a tiny copy of ``bundles/demo_ct_adapter_tpp`` (its own knobs: ViT-Tiny depth 2, 32 px, one TPP
epoch; ``tests/label_helpers.py``). Checked: a bundle trained with ``monai.bundle run`` (in-process) is served
as is by the infer task (MONAI Label's ``BundleInferTask``): its ``models/model.pt`` is what the task loads and
the answer equals running the bundle's ``inference.json`` directly; and a real server on 127.0.0.1 driven by
``monailabel.client.MONAILabelClient`` (what 3D Slicer uses): /info, /infer refused before any training
(409, "train it first"), /activelearning/first, one /train round trip (``BundleTrainTask``: the bundle's
``tpp_pretrain.json`` on every datastore image, then ``train.json`` with a validation split) with MONAI Label's
train_stats keys, and the next /infer equal to the bundle's own inference of the published model; bad
requests are answered with a message while the server keeps serving.

The server tests need the optional extra (install commands in apps/tpp_label/README.md) and are skipped
with the reason when ``monailabel`` is not importable; the library tests always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import label_server
from label_helpers import app_copy, free_port, tiny_bundle
from PIL import Image

from tpp_monai.data import demo_data as dd
from tpp_monai.label import images

HAVE_MONAILABEL = importlib.util.find_spec("monailabel") is not None
NO_MONAILABEL = ("monailabel is not installed (optional extra: see apps/tpp_label/README.md for the install "
                 "commands); the server tests are skipped, the library tests still run")

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, N_LABELLED = 8, 5
START_TIMEOUT, TRAIN_TIMEOUT = 240, 900


# ------------------------------------------------------------------ library (runs without monailabel)
def test_png_and_slicer_nifti_line_up(cache, tmp_path):
    """Upload checks compare a PNG image with the NIfTI label 3D Slicer saves for it in the same pixel order."""
    import nibabel as nib

    e = dd.load_datalist(cache, "datalist_headct.json")["training"][40]
    img, info = images.read_image_2d(e["image"])
    lbl, _ = images.read_image_2d(e["label"])
    assert info["format"] == "png" and img.shape == lbl.shape == (96, 96) and set(np.unique(lbl)) == {0, 1, 2}
    # a label as 3D Slicer saves it for that PNG: data[x, y, 0] = mask[y, x]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lbl.T[..., None]), np.eye(4)), str(tmp_path / "l.nii.gz"))
    back, ninfo = images.read_image_2d(tmp_path / "l.nii.gz")
    assert ninfo["format"] == "nifti" and np.array_equal(back, lbl)
    images.check_labelled([(e["image"], tmp_path / "l.nii.gz")], 3)
    with pytest.raises(images.ImageReadError, match="cannot read"):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        images.read_image_2d(tmp_path / "bad.png")


def test_label_size_mismatch_is_refused_naming_both_files(tmp_path):
    """Checked before the bundle's TPP stage starts (the train task calls check_labelled first)."""
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "lbl.png")
    with pytest.raises(ValueError, match=r"lbl\.png is 40 x 40 pixels but its image .*img\.png is 40 x 50"):
        images.check_labelled([(tmp_path / "img.png", tmp_path / "lbl.png")], 3)


class _Pickled:  # not plain data: a weights-only load refuses it
    pass


def test_nnunet_fold_checks_before_serving(tmp_path):
    """The 3D task's model folder: clear errors naming the file and the fix, and no unpickling of a crafted file."""
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
    with pytest.raises(images.ImageTooLarge, match="8000 voxels is more than the limit of 7999"):
        nnunet3d.check_volume(vol, max_voxels=7999)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(images.ImageReadError, match="single-channel 3D volume"):
        nnunet3d.check_volume(tmp_path / "s.png")


# ------------------------------------------------------------------ the bundle's own inference, for comparison
def bundle_inference(bundle: Path, image: Path, out_dir: Path) -> np.ndarray:
    """``python -m monai.bundle run --config_file configs/inference.json`` on one image (in-process): its mask."""
    import monai.bundle

    (out_dir / "in").mkdir(parents=True)
    shutil.copy(image, out_dir / "in" / image.name)
    monai.bundle.run(run_id="run", meta_file=str(bundle / "configs" / "metadata.json"),
                     config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), datalist="",
                     input_dir=str(out_dir / "in"), infer_dir=str(out_dir / "pred"))
    (mask,) = sorted((out_dir / "pred").glob("*_seg.png"))
    return np.asarray(Image.open(mask))


def _slices(cache: Path, n: int) -> list[dict]:
    entries = dd.load_datalist(cache, "datalist_headct.json")["training"]
    return entries[:: max(1, len(entries) // n)][:n]


@pytest.mark.slow
def test_bundle_trained_with_monai_bundle_run_is_served_as_is(cache, tmp_path):
    """``monai.bundle run`` (tpp_pretrain.json, then train.json) on the bundle; the label app's infer task then
    loads exactly its models/model.pt and answers exactly what the bundle's inference.json writes."""
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)
    import monai.bundle

    torch.set_num_threads(1)
    picked = _slices(cache, 6)
    dl = {"training": picked[:4], "validation": picked[4:], "test": []}
    (tmp_path / "datalist.json").write_text(json.dumps(dl))
    bundle = tiny_bundle(tmp_path / "demo_tiny", dataset_dir=cache)
    cfgs = bundle / "configs"
    common = {"meta_file": str(cfgs / "metadata.json"), "datalist": str(tmp_path / "datalist.json"),
              "bundle_root": str(bundle)}
    monai.bundle.run(run_id="run", config_file=[str(cfgs / "train.json"), str(cfgs / "tpp_pretrain.json")], **common)
    monai.bundle.run(run_id="run", config_file=str(cfgs / "train.json"), **common)
    model = bundle / "models" / "model.pt"
    assert model.is_file()

    from monailabel.utils.others.class_utils import module_from_file

    main = module_from_file("tpp_label_main_served_as_is", str(REPO / "apps" / "tpp_label" / "main.py"))
    task = main.BundleSegInfer("demo_tiny", str(bundle), {})
    assert task.is_valid() and task.dimension == 2 and task.labels == {"soft tissue": 1, "bone": 2}
    image = Path(picked[0]["image"])
    out, res = task({"image": str(image), "device": "cpu"})
    served = task._networks["cpu"][0].state_dict()  # BasicInferTask's cache: what it loaded
    saved = torch.load(model, weights_only=True)
    saved = saved.get("model", saved)
    assert served.keys() == saved.keys() and all(torch.equal(served[k], saved[k]) for k in saved)
    got = np.asarray(Image.open(out))
    want = bundle_inference(bundle, image, tmp_path / "direct")
    assert got.shape == want.shape == np.asarray(Image.open(image)).shape[:2] and np.array_equal(got, want)
    assert res["classes_present"] == sorted(np.unique(want).tolist())


# ------------------------------------------------------------------------ server (needs monailabel)
@pytest.fixture(scope="module")
def server(cache, tmp_path_factory):
    if not HAVE_MONAILABEL:
        pytest.skip(NO_MONAILABEL)
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, e in enumerate(_slices(cache, N_IMAGES)):  # real head-CT slices (96x96 uint8) + bone / soft-tissue masks
        name = f"headct_{i:02d}.png"
        shutil.copy(e["image"], studies / name)
        if i < N_LABELLED:
            shutil.copy(e["label"], studies / "labels" / "final" / name)
    bundle = tiny_bundle(root / "bundles" / "tpp_seg")  # no models/model.pt: never trained
    app = app_copy(root / "app")
    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "bundles", str(bundle),
           "--conf", "tpp_epochs", "1", "--conf", "epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_TRACKING_ENABLED": "false"}
    url = f"http://127.0.0.1:{port}"
    with label_server(cmd, env, root, url, START_TIMEOUT):
        client = MONAILabelClient(url, tmpdir=str(root / "client"), client_id="tester")
        (root / "client").mkdir()
        srv = {"url": url, "client": client, "studies": studies, "bundle": bundle, "root": root,
               "model": bundle / "models" / "model.pt", "log": root / "server.log",
               "images": sorted(studies.glob("*.png"))}
        srv["info_before"] = client.info()
        try:
            client.infer("tpp_seg", srv["images"][-1].stem, {})
            srv["infer_before"] = None
        except MONAILabelClientException as e:
            srv["infer_before"] = e.msg
        yield srv


@pytest.fixture(scope="module")
def trained(server):
    """One /train/tpp_seg round trip through the client (TPP + fine-tuning with a validation split)."""
    c = server["client"]
    task = c.train_start("tpp_seg", {"tpp_epochs": 1, "epochs": 2})
    assert task["status"] in ("SUBMITTED", "RUNNING"), task
    t0 = time.time()
    while time.time() - t0 < TRAIN_TIMEOUT:
        task = c.train_status()
        if task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(3)
    assert task.get("status") == "DONE", f"train did not finish: {task}\n{server['log'].read_text()[-3000:]}"
    return task


@pytest.mark.slow
def test_untrained_bundle_is_refused_and_listed_for_training(server):
    info = server["info_before"]
    assert "tpp_seg" in info["trainers"] and "tpp_seg" not in info["models"] and not server["model"].exists()
    assert set(info["strategies"]) == {"first", "random"} and "stunet3d" not in info["models"]
    # the bundle's metadata channel_def; MONAI Label's /info gives each label's class index
    assert info["labels"] == {"soft tissue": 1, "bone": 2}
    cfg = info["trainers"]["tpp_seg"]["config"]  # what 3D Slicer offers and sends back with /train
    assert cfg["val_split"] == 0.2 and cfg["epochs"] == 2 and cfg["tpp_epochs"] == 1 and cfg["pretext"] == "mae"
    assert info["datastore"]["total"] == N_IMAGES and info["datastore"]["completed"] == N_LABELLED
    msg = server["infer_before"]
    assert msg and "409" in msg and "not been trained yet" in msg and "/train/tpp_seg" in msg, msg


@pytest.mark.slow
def test_activelearning_first_returns_first_unlabelled(server):
    c = server["client"]
    s = c.next_sample("first", {})
    assert s["id"] == f"headct_{N_LABELLED:02d}" and "path" not in s  # ids, not server paths
    assert c.next_sample("random", {})["id"] in {p.stem for p in server["images"][N_LABELLED:]}


@pytest.mark.slow
def test_train_round_trip_stats_and_reinfer(server, trained, tmp_path):
    c = server["client"]
    log = server["log"].read_text()
    assert "TPP (mae) on 8 images, 1 epoch(s)" in log and "4 labelled image(s) for training, 1 for validation" in log
    assert (server["bundle"] / "models" / "tpp_target_params.pt").is_file()  # the TPP hand-over, the bundle's own
    info = c.info()
    assert "tpp_seg" in info["models"]  # listed once the bundle has its model, without a restart
    m = info["models"]["tpp_seg"]
    assert m["type"] == "segmentation" and m["dimension"] == 2 and m["labels"] == {"soft tissue": 1, "bone": 2}
    stats = info["train_stats"]["tpp_seg"]
    # epochs counted over the whole run (1 TPP + 2 fine-tuning: Slicer's bar), fine-tuning's own in stage_epoch(s)
    assert stats["epoch"] == stats["total_epochs"] == 3 and stats["stage"] == "done"
    assert stats["stage_epoch"] == stats["stage_epochs"] == 2 and stats["tpp_epochs_done"] == 1
    assert stats["num_images"] == N_IMAGES and stats["num_train"] == 4 and stats["num_val"] == 1
    assert stats["tpp"] is True and stats["pretext"] == "mae" and "total_time" in stats
    assert 0.0 <= stats["best_metric"] <= 1.0 and stats["best_metric"] == stats["eval"]["best_metric"]
    assert stats["eval"]["key_metric_name"] == "dice" and stats["model_mtime_ns"] == server["model"].stat().st_mtime_ns

    img = server["images"][-1]  # an unlabelled slice
    out, res = c.infer("tpp_seg", img.stem, {})
    assert res["trained"] is True and res["model_mtime_ns"] == server["model"].stat().st_mtime_ns
    got = np.asarray(Image.open(out))
    want = bundle_inference(server["bundle"], img, tmp_path / "direct")  # the published model, the bundle's way
    assert got.shape == want.shape == np.asarray(Image.open(img)).shape and np.array_equal(got, want)


@pytest.mark.slow
def test_bad_requests_then_still_serving(server, trained):
    from monailabel.client.client import MONAILabelClientException

    c = server["client"]
    with pytest.raises(MONAILabelClientException, match="no_such_model.*tpp_seg"):
        c.infer("no_such_model", server["images"][0].stem, {})
    with pytest.raises(MONAILabelClientException, match="no_such_model"):
        c.train_start("no_such_model", {})
    bad = server["root"] / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    with pytest.raises(MONAILabelClientException, match="40[0-9].*bad image.*cannot read"):
        c.infer("tpp_seg", "", {}, file=str(bad))
    out, _ = c.infer("tpp_seg", server["images"][0].stem, {})  # still serving
    assert np.asarray(Image.open(out)).shape == np.asarray(Image.open(server["images"][0])).shape
