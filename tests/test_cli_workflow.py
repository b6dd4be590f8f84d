"""Own data through the front door: ``tpp-monai prepare | tpp | train | evaluate | infer``, the refusals of bad
input (multi-class masks in a binary bundle, a segmentation datalist in a classification bundle), the fine-tuning
log, and the figures the bundles write (curves, confusion matrix, overlays)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_bundles import make_qata, parser_for  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
CLI_TINY = ["--vit_size", "tiny", "--vit_overrides", "{'depth': 2}", "--image_size", "32", "--backbone_ckpt", "",
            "--num_workers", "0", "--batch_size", "4"]


def seg_folder(root: Path, n: int = 10, values=(255,), size: int = 40) -> Path:
    """``root/images/*.png`` + ``root/masks/*_mask.png``: a bright square per image, drawn with ``values``."""
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 60, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for k, v in enumerate(values):
            y = 4 + 12 * k
            img[y:y + 10, 6 + i:20 + i] = 200
            mask[y:y + 10, 6 + i:20 + i] = v
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}_mask.png")
    return root


def cls_folder(root: Path, classes=("benign", "tumour"), n: int = 6) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((24, 24), 40 + 150 * c + i, np.uint8)).save(root / name / f"{name}{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ prepare
def test_help_lists_the_2d_workflow(capsys):
    from tpp_monai.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("prepare", "tpp", "train", "evaluate", "infer"):
        assert f"    {cmd} " in out, cmd
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "monai.bundle.run" in out and "train.json" in out and "--no-tpp" in out and "models/model.pt" in out


def test_prepare_classification_folder(tmp_path):
    from tpp_monai.cli import main

    src = cls_folder(tmp_path / "imgs")
    assert main(["prepare", str(src), "--out", str(tmp_path / "dl.json")]) == 0
    dl = json.loads((tmp_path / "dl.json").read_text())
    assert dl["task"] == "cls" and dl["class_names"] == ["benign", "tumour"]
    # per class: ceil(0.2 * 6) = 2 test, then ceil(0.25 * 4) = 1 validation, 3 training
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [6, 2, 4]
    for split in ("training", "validation", "test"):
        assert sorted({e["label"] for e in dl[split]}) == [0, 1]
        for e in dl[split]:
            assert Path(e["image"]).parent.name == dl["class_names"][e["label"]]
    images = [e["image"] for s in ("training", "validation", "test") for e in dl[s]]
    assert len(set(images)) == 12


def test_prepare_segmentation_folder_counts_classes_and_refuses_non_indices(tmp_path, capsys):
    from tpp_monai.cli import main
    from tpp_monai.data.datalist import prepare_folder

    dl = prepare_folder(seg_folder(tmp_path / "bin"))
    assert dl["task"] == "seg" and dl["class_names"] == ["background", "class_1"]
    assert all(Path(e["label"]).name == Path(e["image"]).stem + "_mask.png" for e in dl["training"])
    three = prepare_folder(seg_folder(tmp_path / "three", values=(1, 2)))
    assert three["class_names"] == ["background", "class_1", "class_2"]
    drawn = seg_folder(tmp_path / "drawn", values=(128, 255))
    assert main(["prepare", str(drawn), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "[0, 128, 255]" in err and "--binarize" in err and "drawn/masks/case" in err
    assert not (tmp_path / "x.json").exists()
    assert main(["prepare", str(drawn), "--out", str(tmp_path / "x.json"), "--binarize"]) == 0
    dl = json.loads((tmp_path / "x.json").read_text())
    m = np.asarray(Image.open(dl["training"][0]["label"]))
    assert set(np.unique(m)) == {0, 1} and "masks_binary" in dl["training"][0]["label"]
    (drawn / "masks" / "case03_mask.png").unlink()
    assert main(["prepare", str(drawn), "--out", str(tmp_path / "y.json")]) == 2
    assert "missing mask for image" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ refusals
def test_multiclass_mask_in_a_binary_bundle_is_refused(tmp_path):
    from tpp_monai.data.transforms import ImageFileError, seg_transforms

    src = seg_folder(tmp_path / "three", n=1, values=(1, 2))
    item = {"image": str(src / "images" / "case00.png"), "label": str(src / "masks" / "case00_mask.png")}
    with pytest.raises(Exception) as ei:
        seg_transforms(train=False, image_size=32, in_channels=3, num_classes=2)(item)
    chain, e = [], ei.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    err = next((c for c in chain if isinstance(c, ImageFileError)), None)
    assert err is not None, chain
    assert "case00_mask.png" in str(err) and "[1, 2]" in str(err) and "--num_classes 3" in str(err)
    out = seg_transforms(train=False, image_size=32, in_channels=3, num_classes=3)(item)
    assert set(torch.unique(out["label"]).tolist()) == {0, 1, 2}
    one = seg_folder(tmp_path / "one", n=1, values=(255,))
    ok = seg_transforms(train=False, image_size=32, in_channels=3, num_classes=2)(
        {"image": str(one / "images" / "case00.png"), "label": str(one / "masks" / "case00_mask.png")})
    assert set(torch.unique(ok["label"]).tolist()) == {0, 1}


def test_segmentation_datalist_in_a_classification_bundle_is_refused(tmp_path):
    from tpp_monai.bundle import BundleDataError, load_datalist

    data = make_qata(tmp_path)
    datalist = data / "datalist.json"
    with pytest.raises(BundleDataError, match="mask path .*this bundle classifies") as ei:
        load_datalist(datalist, "training", task="cls")
    assert str(datalist) in str(ei.value) and "glas_adapter_tpp" in str(ei.value)
    assert len(load_datalist(datalist, "training", task="seg")) == 8
    cls_dl = tmp_path / "cls.json"
    cls_dl.write_text(json.dumps({"training": [{"image": "a.png", "label": 1}]}))
    with pytest.raises(BundleDataError, match="this bundle segments"):
        load_datalist(cls_dl, "training", task="seg")
    # the bundle's own config refuses it before any training step
    p = parser_for("mhist", bundle_root=str(tmp_path / "w"), datalist=str(datalist))
    with pytest.raises(Exception) as ei:
        p.get_parsed_content("train#datalist")
    assert "this bundle classifies" in repr(ei.value) or "this bundle classifies" in str(ei.value.__cause__)


def test_fine_tuning_with_tpp_does_not_log_without_tpp(tmp_path, caplog):
    from tpp_monai.peft.target_checkpoint import save_target_checkpoint

    net = parser_for("mhist", bundle_root=str(tmp_path), tpp_ckpt="").get_parsed_content("network_def")
    ckpt = tmp_path / "tpp_target_params.pt"
    save_target_checkpoint(ckpt, net.backbone, {"pretext": "mae", "iteration": 2})
    with caplog.at_level(logging.INFO):
        parser_for("mhist", bundle_root=str(tmp_path), tpp_ckpt=str(ckpt)).get_parsed_content("network")
    text = caplog.text
    assert "WITHOUT TPP" not in text and "loaded TPP target parameters" in text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        parser_for("mhist", bundle_root=str(tmp_path), tpp_ckpt="").get_parsed_content("network")
    assert caplog.text.count("WITHOUT TPP") == 1


# ------------------------------------------------------------------------------------------------ figures
def test_learning_curves_plot_exactly_the_logged_numbers(tmp_path):
    from tpp_monai.bundle import LearningCurves

    logs = tmp_path / "logs"
    logs.mkdir()
    losses = [{"stage": "train", "kind": "loss", "iteration": i, "loss": 1.0 / i} for i in range(1, 7)]
    metrics = [{"stage": "validation", "kind": "metrics", "epoch": e, "iteration": 3 * e, "dice": 0.2 * e,
                "hd95": 9.0 / e} for e in (1, 2)]
    (logs / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in losses))
    (logs / "val_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    LearningCurves(logs / "train_log.jsonl", logs / "val_log.jsonl", tmp_path / "figures")()
    assert (tmp_path / "figures" / "curves.png").read_bytes()[:8] == PNG
    rows = list(csv.DictReader((tmp_path / "figures" / "curves.csv").read_text().splitlines()))
    assert [(int(r["iteration"]), float(r["value"])) for r in rows if r["kind"] == "loss"] == \
        [(r["iteration"], r["loss"]) for r in losses]
    got = {(r["name"], int(r["epoch"])): float(r["value"]) for r in rows if r["kind"] == "metric"}
    assert got == {(k, m["epoch"]): m[k] for m in metrics for k in ("dice", "hd95")}


def test_confusion_matrix_counts_equal_the_predictions(tmp_path):
    from ignite.engine import Engine

    from tpp_monai.bundle import EvaluationFigures

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        probs = torch.softmax(torch.randn(5, 3, generator=g), 1)
        labels = torch.randint(0, 3, (5,), generator=g)
        batches.append([{"image": torch.zeros(3, 4, 4), "pred": p, "label": lab} for p, lab in zip(probs, labels)])
    engine = Engine(lambda e, b: b)
    EvaluationFigures(tmp_path, "cls", 3, ["a", "b", "c"]).attach(engine)
    engine.run(batches, max_epochs=1)
    want = np.zeros((3, 3), int)
    for b in batches:
        for it in b:
            want[int(it["label"]), int(it["pred"].argmax())] += 1
    rows = list(csv.reader((tmp_path / "confusion_matrix.csv").read_text().splitlines()))
    assert rows[0] == ["true \\ predicted", "a", "b", "c"] and [r[0] for r in rows[1:]] == ["a", "b", "c"]
    assert np.array_equal(np.array([[int(v) for v in r[1:]] for r in rows[1:]]), want) and want.sum() == 15
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_own_folder_prepare_tpp_train_evaluate_infer(tmp_path, capsys):
    """README "Your own data", CI-sized: a folder of PNG images + masks through all five commands."""
    from tpp_monai.cli import main

    src = seg_folder(tmp_path / "my_images")
    new = tmp_path / "new_images"
    new.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40), 90 + i, np.uint8)).save(new / f"new{i}.png")
    work, dl = tmp_path / "work", tmp_path / "work" / "datalist.json"
    common = ["--datalist", str(dl), "--workdir", str(work), *CLI_TINY]
    assert main(["prepare", str(src), "--out", str(dl)]) == 0
    assert main(["tpp", *common, "--tpp_epochs", "1", "--tpp_epoch_length", "2", "--tpp_batch_size", "4"]) == 0
    assert (work / "models" / "tpp_target_params.pt").is_file()
    capsys.readouterr()
    assert main(["train", *common, "--num_iterations", "4", "--val_interval", "1"]) == 0
    out = capsys.readouterr()
    assert "python -m monai.bundle run" in out.out and "glas_adapter_tpp" in out.out
    assert (work / "models" / "model.pt").is_file()
    # the curve's numbers are the logged ones
    rows = list(csv.DictReader((work / "figures" / "curves.csv").read_text().splitlines()))
    logged = [json.loads(ln) for ln in (work / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [float(r["value"]) for r in rows if r["kind"] == "loss"] == [r["loss"] for r in logged]
    val = [json.loads(ln) for ln in (work / "logs" / "val_log.jsonl").read_text().splitlines()]
    assert [float(r["value"]) for r in rows if r["name"] == "dice"] == [r["dice"] for r in val] and val
    assert (work / "figures" / "curves.png").read_bytes()[:8] == PNG
    assert (work / "figures" / "validation" / "overlay_0.png").read_bytes()[:8] == PNG
    assert main(["evaluate", *common]) == 0
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"dice", "hd95"} and 0 <= metrics["dice"] <= 1
    n_test = len(json.loads(dl.read_text())["test"])
    assert sorted(p.name for p in (work / "eval").glob("overlay_*.png")) == [f"overlay_{i}.png" for i in range(n_test)]
    assert main(["infer", "--workdir", str(work), "--input-dir", str(new), *CLI_TINY]) == 0
    masks = sorted((work / "predictions").glob("*_seg.png"))
    assert [m.name for m in masks] == ["new0_seg.png", "new1_seg.png"]
    assert np.asarray(Image.open(masks[0])).shape == (40, 40)


def test_prepare_keeps_given_splits_and_binarised_masks_apart(tmp_path):
    from tpp_monai.data.datalist import prepare_folder

    for split, n in (("train", 6), ("test", 2)):
        seg_folder(tmp_path / "data" / split, n=n, values=(128, 255))
    dl = prepare_folder(tmp_path / "data", binarize=True, mask_out=tmp_path / "bin")
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [4, 2, 2]  # val: ceil(0.2 * 6) of train
    assert all("/data/test/" in e["image"] for e in dl["test"])
    labels = [e["label"] for s in ("training", "validation", "test") for e in dl[s]]
    assert len(set(labels)) == 8 and all(set(np.unique(np.asarray(Image.open(m)))) <= {0, 1} for m in labels)
    assert str(tmp_path / "bin" / "test" / "masks" / "case00_mask.png") in labels
