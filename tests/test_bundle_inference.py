"""Standalone configs/inference.json (MONAI model-zoo shape) and MONAI's own property checks.

From inside a copy of bundles/qata_adapter_tpp and bundles/mhist_adapter_tpp: a tiny model is trained from the
bundle's root, then ``python -m monai.bundle run --config_file configs/inference.json`` alone writes predictions
(segmentation masks of class indices at the input's size; classification CSV of probabilities summing to 1);
a zip of the trained folder unzipped elsewhere predicts a plain folder of new images (``--input_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_bundles import BUNDLES, SEG, TINY, folder, make_mhist, make_qata  # noqa: E402

PY = sys.executable
OUTPUTS = ("models", "logs", "eval", "predictions", "cache")


def _cli(over: dict) -> list[str]:
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in over.items()]


def _monai_run(folder: Path, config: str, over: dict) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "monai.bundle", "run", "--config_file", config, *_cli(over)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _train_copy(bundle: str, data: Path, dest: Path, monkeypatch) -> Path:
    """A copy of the bundle folder (outputs stay in tmp) trained for 2 iterations from its own root."""
    from monai.bundle import run

    folder = dest / bundle
    shutil.copytree(ROOT / "bundles" / bundle, folder, ignore=shutil.ignore_patterns(*OUTPUTS))
    monkeypatch.chdir(folder)
    torch.set_num_threads(1)
    run(config_file="configs/train.json", **{**TINY, "dataset_dir": str(data), "batch_size": 4, "num_iterations": 2})
    assert (folder / "models" / "model.pt").is_file()
    return folder


def test_segmentation_inference_alone_from_the_bundle_root_and_from_a_zip(tmp_path, monkeypatch):
    data = make_qata(tmp_path / "data")
    folder = _train_copy("qata_adapter_tpp", data, tmp_path / "copy", monkeypatch)
    assert set(json.loads((folder / "configs" / "inference.json").read_text())) >= {
        "imports", "bundle_root", "device", "network_def", "network", "preprocessing", "dataset", "dataloader",
        "inferer", "postprocessing", "handlers", "evaluator", "initialize", "run", "finalize"}
    over = {**TINY, "dataset_dir": str(data)}
    _monai_run(folder, "configs/inference.json", over)
    masks = sorted((folder / "predictions").glob("*_seg.png"))
    assert len(masks) == 3  # the test split
    for m in masks:
        arr = np.asarray(Image.open(m))
        assert arr.shape == (48, 48) and arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1}
    # zipped, unzipped elsewhere, new images in a plain folder (non-square: the mask keeps the image's H x W)
    archive = tmp_path / "qata.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.rglob("*"):
            if f.is_file() and f.relative_to(folder).parts[0] != "predictions":
                z.write(f, Path("qata_adapter_tpp") / f.relative_to(folder))
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "elsewhere")
    new = tmp_path / "new_images"
    new.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56), dtype=np.uint8)).save(new / "wide.png")
    Image.fromarray(rng.integers(0, 255, (60, 36), dtype=np.uint8)).save(new / "tall.png")
    (new / "notes.txt").write_text("not an image")
    there = tmp_path / "elsewhere" / "qata_adapter_tpp"
    _monai_run(there, "configs/inference.json", {**over, "input_dir": str(new), "dataset_dir": str(tmp_path / "nowhere")})
    got = {p.name: np.asarray(Image.open(p)).shape for p in (there / "predictions").glob("*_seg.png")}
    assert got == {"wide_seg.png": (40, 56), "tall_seg.png": (60, 36)}
    # --mask_ext .nii.gz: the same masks as NIfTI (MONAI's (H, W) order), nothing half-written left behind
    _monai_run(there, "configs/inference.json", {**over, "input_dir": str(new), "dataset_dir": str(tmp_path / "nowhere"),
                                                 "mask_ext": ".nii.gz", "infer_dir": str(tmp_path / "nii")})
    import nibabel as nib

    assert sorted(p.name for p in (tmp_path / "nii").iterdir()) == ["tall_seg.nii.gz", "wide_seg.nii.gz"]
    for stem in ("wide", "tall"):
        nii = np.asarray(nib.load(tmp_path / "nii" / f"{stem}_seg.nii.gz").dataobj)
        assert np.array_equal(nii, np.asarray(Image.open(there / "predictions" / f"{stem}_seg.png")))


def test_classification_inference_alone_writes_probabilities(tmp_path, monkeypatch):
    data = make_mhist(tmp_path / "data")
    folder = _train_copy("mhist_adapter_tpp", data, tmp_path / "copy", monkeypatch)
    _monai_run(folder, "configs/inference.json", {**TINY, "dataset_dir": str(data)})
    rows = (folder / "predictions" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,pred,prob_0,prob_1" and len(rows) == 1 + 4  # the test split: 2 HP + 2 SSA
    for row in rows[1:]:
        path, pred, *probs = row.split(",")
        p = [float(x) for x in probs]
        assert Path(path).is_file() and abs(sum(p) - 1) < 1e-4 and int(pred) == int(np.argmax(p))


def test_input_dir_errors_name_the_folder(tmp_path):
    from tpp_monai.bundle import BundleDataError, inference_inputs

    with pytest.raises(BundleDataError, match="not a folder"):
        inference_inputs("unused.json", "test", tmp_path / "missing")
    with pytest.raises(BundleDataError, match="no image file"):
        inference_inputs("unused.json", "test", tmp_path)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_property_checks_and_data_shape_with_inference_alone(bundle, tmp_path):
    """MONAI's TrainProperties / InferProperties (monai/bundle/properties.py): no required property missing;
    the zoo's verify_data_shape (verify_net_in_out) on inference.json alone."""
    from monai.bundle import ConfigWorkflow, verify_net_in_out

    cfg = ROOT / "bundles" / folder(bundle) / "configs"
    data = (make_qata if bundle in SEG else make_mhist)(tmp_path / "data")
    over = {**TINY, "bundle_root": str(tmp_path / "work"), "datalist": str(data / "datalist.json"), "train_cache": "none"}
    for config, kind in (("train.json", "train"), ("inference.json", "infer")):
        wf = ConfigWorkflow(config_file=str(cfg / config), workflow_type=kind, **over)
        wf.initialize()
        assert not wf.check_properties(), (config, wf.check_properties())
    verify_net_in_out(net_id="network_def", meta_file=str(cfg / "metadata.json"), config_file=str(cfg / "inference.json"),
                      device="cpu", **{**TINY, "bundle_root": str(tmp_path)})
