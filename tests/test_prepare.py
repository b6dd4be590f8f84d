"""Dataset preparation on fake trees in the official layouts (tiny real image files)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tpp_monai.data.datalist import (
    DatalistError, cli_main, label_counts, prepare_chestxray_pa, prepare_glas, prepare_mhist, prepare_oct_c8,
    prepare_qata, split_holdout, split_fractions,
)


def _img(path, value=0, mode="RGB", size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((*size, 3) if mode == "RGB" else size, value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


MHIST_HEADER = ["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA", "Partition"]


@pytest.fixture
def mhist(tmp_path):
    rows = []
    for lab in ("HP", "SSA"):
        for part, n in (("train", 50), ("test", 5)):
            for i in range(n):
                name = f"MHIST_{lab}_{part}_{i:03d}.png"
                _img(tmp_path / "images" / name, i)
                rows.append([name, lab, 6 if lab == "SSA" else 1, part])
    _csv(tmp_path / "annotations.csv", MHIST_HEADER, rows)
    return tmp_path


def test_mhist_split(mhist, tmp_path):
    dl = prepare_mhist(mhist, seed=1)
    assert label_counts(dl["training"]) == {0: 40, 1: 40}
    assert label_counts(dl["validation"]) == {0: 10, 1: 10}
    assert label_counts(dl["test"]) == {0: 5, 1: 5}
    assert all("_train_" in e["image"] for e in dl["validation"])
    assert all(("_SSA_" in e["image"]) == (e["label"] == 1) for v in dl.values() for e in v)
    assert prepare_mhist(mhist, seed=1) == dl  # deterministic
    assert prepare_mhist(mhist, seed=2)["validation"] != dl["validation"]
    out = tmp_path / "dl" / "mhist.json"
    assert cli_main("MHIST", prepare_mhist, ["--root", str(mhist), "--out", str(out), "--seed", "1"]) == 0
    assert json.loads(out.read_text()) == dl


def test_mhist_errors(mhist, capsys):
    (mhist / "images" / "MHIST_HP_train_007.png").unlink()
    with pytest.raises(DatalistError, match="missing image: .*MHIST_HP_train_007.png"):
        prepare_mhist(mhist)
    (mhist / "images" / "MHIST_HP_train_007.png").write_bytes(b"not a png")
    with pytest.raises(DatalistError, match="corrupt image: .*MHIST_HP_train_007.png"):
        prepare_mhist(mhist)
    _csv(mhist / "annotations.csv", ["Image Name", "Label", "Partition"], [["a.png", "HP", "train"]])
    with pytest.raises(DatalistError, match=r"missing column\(s\) \['Majority Vote Label'"):
        prepare_mhist(mhist)
    assert cli_main("MHIST", prepare_mhist, ["--root", str(mhist), "--out", str(mhist / "x.json")]) == 2
    assert "Majority Vote Label" in capsys.readouterr().err
    assert not (mhist / "x.json").exists()


OCT = ("AMD", "CNV", "CSR", "DME", "DR", "DRUSEN", "MH", "NORMAL")


def test_oct_c8_official_split(tmp_path):
    base = tmp_path / "RetinalOCT_Dataset" / "RetinalOCT_Dataset"  # Kaggle zip nesting
    counts = {"train": 3, "val": 2, "test": 1}
    for split, n in counts.items():
        for c in OCT:
            for i in range(n):
                _img(base / split / c / f"{c.lower()}_{split}_{i}.jpg", i, mode="L")
    dl = prepare_oct_c8(tmp_path)
    assert label_counts(dl["training"]) == {k: 3 for k in range(8)}
    assert label_counts(dl["validation"]) == {k: 2 for k in range(8)}
    assert label_counts(dl["test"]) == {k: 1 for k in range(8)}
    assert all(f"/{OCT[e['label']]}/" in e["image"] for v in dl.values() for e in v)
    for f in (base / "val" / "MH").iterdir():
        f.unlink()
    with pytest.raises(DatalistError, match="empty class folder: .*val/MH"):
        prepare_oct_c8(tmp_path)


def test_chestxray_pa_70_10_20(tmp_path):
    for c, folder in (("covid", "COVID19"), ("normal", "normal"), ("pneumonia", "pneumonia")):
        for i in range(20):
            _img(tmp_path / "Data" / folder / f"{c}{i}.png", i, mode="L")
    dl = prepare_chestxray_pa(tmp_path, seed=3)
    assert label_counts(dl["training"]) == {0: 14, 1: 14, 2: 14}
    assert label_counts(dl["validation"]) == {0: 2, 1: 2, 2: 2}
    assert label_counts(dl["test"]) == {0: 4, 1: 4, 2: 4}
    # the paper's counts: 1525 per class -> 1067 / 153 / 305
    items = [{"image": str(i), "label": 0} for i in range(1525)]
    s = split_fractions(items, 0.7, 0.2, 0)
    assert [len(s[k]) for k in ("training", "validation", "test")] == [1067, 153, 305]


def test_holdout_counts_match_paper():
    mk = lambda n, lab: [{"image": f"{lab}{i}", "label": lab} for i in range(n)]  # noqa: E731
    _, va = split_holdout(mk(1545, 0) + mk(630, 1), 0.2, 0, key=lambda e: e["label"])
    assert len(va) == 435  # MHIST
    _, va = split_holdout(mk(37, "b") + mk(48, "m"), 0.2, 0, key=lambda e: e["label"])
    assert len(va) == 18  # GlaS


GLAS_HEADER = ["name", " patient ID", " grade (GlaS)", " grade (Sirinukunwattana et al. 2015)"]


def _glas(root):
    rows = []
    names = [f"train_{i}" for i in range(1, 21)] + ["testA_1", "testA_2", "testB_1", "testB_2"]
    for k, n in enumerate(names):
        _img(root / f"{n}.bmp", k)
        mask = np.zeros((8, 8), np.uint8)
        mask[1:3, 1:3], mask[5:7, 5:7] = 1, 2 + k  # two gland instances
        Image.fromarray(mask).save(root / f"{n}_anno.bmp")
        g = "benign" if k % 2 else "malignant"
        rows.append([n, k, f" {g}", " healthy" if g == "benign" else " adenomatous"])
    _csv(root / "Grade.csv", GLAS_HEADER, rows)


def test_glas(tmp_path):
    root = tmp_path / "Warwick QU Dataset (Released 2016_07_08)"
    root.mkdir()
    _glas(root)
    dl = prepare_glas(root, tmp_path / "masks", seed=0)
    assert len(dl["training"]) == 16 and len(dl["validation"]) == 4 and len(dl["test"]) == 4
    assert sorted(e["grade"] for e in dl["validation"]) == ["benign"] * 2 + ["malignant"] * 2
    assert all("test" in e["image"] for e in dl["test"])
    m = np.asarray(Image.open(dl["training"][0]["label"]))
    assert set(np.unique(m)) == {0, 1} and m.sum() == 8
    (root / "train_3.bmp").unlink()
    with pytest.raises(DatalistError, match="mask without image: .*train_3_anno.bmp"):
        prepare_glas(root, tmp_path / "masks")


def test_qata(tmp_path):
    root = tmp_path / "QaTa-COV19-v2"
    for split, n in (("Train Set", 10), ("Test Set", 3)):
        for i in range(n):
            name = f"sub-S{i:03d}_{split[:2]}.png"
            _img(root / split / "Images" / name, i, mode="L")
            mask = np.zeros((8, 8), np.uint8)
            mask[2:5, 2:5] = 255
            Image.fromarray(mask).save(_img(root / split / "Ground-truths" / f"mask_{name}", mode="L"))
    dl = prepare_qata(tmp_path, seed=0)
    assert [len(dl[k]) for k in ("training", "validation", "test")] == [8, 2, 3]
    assert all(e["label"].endswith("mask_" + e["image"].rsplit("/", 1)[1]) for v in dl.values() for e in v)
    (root / "Test Set" / "Ground-truths" / "mask_sub-S001_Te.png").unlink()
    with pytest.raises(DatalistError, match="missing mask for image .*sub-S001_Te.png"):
        prepare_qata(tmp_path)
