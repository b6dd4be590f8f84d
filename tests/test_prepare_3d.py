"""LiTS / KiTS official layouts -> nnU-Net v2 raw format (tiny random NIfTI trees written with nibabel)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from tpp_monai.data.datalist import DatalistError  # noqa: E402
from tpp_monai.data.nnunet_raw import find_kits_cases, find_lits_cases, prepare_kits, prepare_lits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPE = (8, 9, 5)


def _nii(path: Path, data: np.ndarray, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine), str(path))


def _ct(seed, shape=SHAPE):
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)


def _seg(seed, values, shape=SHAPE):
    s = np.zeros(shape, np.uint8)
    flat = s.reshape(-1)
    for i, v in enumerate(values):
        flat[i * 7:(i + 1) * 7] = v
    return s


def lits_tree(root: Path, n1=(0, 1), n2=(28,)):
    """Official LiTS: 'Training Batch 1' and 'Training Batch 2' holding volume-N.nii and segmentation-N.nii."""
    for folder, ns in (("Training Batch 1", n1), ("Training Batch 2", n2)):
        for n in ns:
            _nii(root / folder / f"volume-{n}.nii", _ct(n))
            _nii(root / folder / f"segmentation-{n}.nii", _seg(n, [1, 2]))
    return root


def kits_tree(root: Path, cases=(0, 1, 2), values=(1, 2, 3)):
    """Official KiTS21/23: dataset/case_XXXXX/{imaging,segmentation}.nii.gz (KiTS19: data/ with 0/1/2)."""
    for n in cases:
        d = root / f"case_{n:05d}"
        _nii(d / "imaging.nii.gz", _ct(n))
        _nii(d / "segmentation.nii.gz", _seg(n, values))
    return root


def test_lits_layout_to_nnunet_raw(tmp_path):
    root = lits_tree(tmp_path / "LiTS")
    (root / "Training Batch 2" / "test-volume-0.nii").write_bytes(b"ignored")  # test volumes are not training cases
    out = prepare_lits(root, tmp_path / "raw", 501, "link", verbose=False)
    assert out == tmp_path / "raw" / "Dataset501_LiTS"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii"
    imgs = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert imgs == ["lits_0000_0000.nii", "lits_0001_0000.nii", "lits_0028_0000.nii"]
    labs = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert labs == ["lits_0000.nii", "lits_0001.nii", "lits_0028.nii"]
    link = out / "imagesTr" / "lits_0028_0000.nii"
    assert link.is_symlink() and link.resolve() == (root / "Training Batch 2" / "volume-28.nii").resolve()
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(link)).dataobj), _ct(28))
    # nnU-Net's own checker accepts the dataset
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(out), num_processes=1)


def test_lits_copy_and_script(tmp_path):
    root = lits_tree(tmp_path / "LiTS", n1=(3,), n2=())
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_lits.py"), "--root", str(root), "--out",
                        str(tmp_path / "raw"), "--dataset-id", "17", "--copy"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    f = tmp_path / "raw" / "Dataset017_LiTS" / "labelsTr" / "lits_0003.nii"
    assert f.is_file() and not f.is_symlink()
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(f)).dataobj), _seg(3, [1, 2]))


@pytest.mark.parametrize("cyst,expected,labels", [
    ("kidney", [0, 1, 2, 1], {"background": 0, "kidney": 1, "tumour": 2}),
    ("tumour", [0, 1, 2, 2], {"background": 0, "kidney": 1, "tumour": 2}),
    ("background", [0, 1, 2, 0], {"background": 0, "kidney": 1, "tumour": 2}),
    ("keep", [0, 1, 2, 3], {"background": 0, "kidney": 1, "tumour": 2, "cyst": 3}),
])
def test_kits21_cyst_mapping(tmp_path, cyst, expected, labels):
    root = kits_tree(tmp_path / "kits21" / "dataset", cases=(0, 7))
    out = prepare_kits(root, tmp_path / "raw", 502, cyst=cyst, verbose=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == labels and meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_00000_0000.nii.gz", "case_00007_0000.nii.gz"]
    assert (out / "imagesTr" / "case_00007_0000.nii.gz").is_symlink()
    lab = out / "labelsTr" / "case_00007.nii.gz"
    assert lab.is_symlink() == (cyst == "keep")  # remapped labels are written, never links to the originals
    got = np.asanyarray(nib.load(str(lab)).dataobj)
    src = _seg(7, [1, 2, 3])
    lut = np.array(expected)
    np.testing.assert_array_equal(got, lut[src])
    np.testing.assert_allclose(nib.load(str(lab)).affine, nib.load(str(root / "case_00007" / "segmentation.nii.gz")).affine)


def test_kits19_layout_and_unlabelled_test_cases(tmp_path):
    root = kits_tree(tmp_path / "kits19" / "data", cases=(0, 1), values=(1, 2))
    _nii(root / "case_00210" / "imaging.nii.gz", _ct(210))  # KiTS19 test case: no segmentation
    with pytest.raises(DatalistError, match=r"missing segmentation for .*case_00210.*imaging\.nii\.gz.*--skip-unlabelled"):
        find_kits_cases(root)
    assert [c.case_id for c in find_kits_cases(root, skip_unlabelled=True)] == ["case_00000", "case_00001"]
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_kits.py"), "--root", str(root.parent),
                        "--out", str(tmp_path / "raw"), "--skip-unlabelled"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "raw" / "Dataset502_KiTS" / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["labels"] == {"background": 0, "kidney": 1, "tumour": 2}


# ------------------------------------------------------------------------------------------------ errors
def test_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatalistError, match=r"no LiTS volumes .*empty"):
        find_lits_cases(tmp_path / "empty")
    with pytest.raises(DatalistError, match=r"no KiTS cases .*empty"):
        find_kits_cases(tmp_path / "empty")
    with pytest.raises(DatalistError, match="does not exist"):
        find_lits_cases(tmp_path / "nope")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_kits.py"), "--root", str(tmp_path / "empty"),
                        "--out", str(tmp_path / "raw")], capture_output=True, text=True)
    assert r.returncode == 1 and "no KiTS cases" in r.stderr and "Traceback" not in r.stderr


def test_missing_segmentation(tmp_path):
    root = lits_tree(tmp_path / "LiTS")
    (root / "Training Batch 1" / "segmentation-1.nii").unlink()
    with pytest.raises(DatalistError, match=r"missing segmentation for .*volume-1\.nii.*segmentation-1\.nii"):
        prepare_lits(root, tmp_path / "raw", verbose=False)
    assert not (tmp_path / "raw").exists()  # nothing written
    kroot = kits_tree(tmp_path / "kits", cases=(4,))
    (kroot / "case_00004" / "segmentation.nii.gz").unlink()
    with pytest.raises(DatalistError, match=r"missing segmentation for .*case_00004"):
        find_kits_cases(kroot)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_gzip"])
def test_corrupt_nifti(tmp_path, damage):
    root = kits_tree(tmp_path / "kits", cases=(0, 1))
    f = root / "case_00001" / "imaging.nii.gz"
    raw = gzip.decompress(f.read_bytes())
    if damage == "truncated":
        f.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif damage == "garbage":
        f.write_bytes(b"not a nifti file at all" * 20)
    else:
        f.write_bytes(f.read_bytes()[:200])  # cut gzip stream
    with pytest.raises(DatalistError, match=r"unreadable/corrupt image NIfTI: .*case_00001.imaging\.nii\.gz"):
        prepare_kits(root, tmp_path / "raw", verbose=False)
    assert not (tmp_path / "raw").exists()


def test_corrupt_segmentation(tmp_path):
    root = lits_tree(tmp_path / "LiTS", n1=(5,), n2=())
    seg = root / "Training Batch 1" / "segmentation-5.nii"
    seg.write_bytes(seg.read_bytes()[:400])
    with pytest.raises(DatalistError, match=r"unreadable/corrupt segmentation NIfTI: .*segmentation-5\.nii"):
        prepare_lits(root, tmp_path / "raw", verbose=False)


def test_shape_mismatch(tmp_path):
    root = lits_tree(tmp_path / "LiTS", n1=(2,), n2=())
    _nii(root / "Training Batch 1" / "segmentation-2.nii", np.zeros((8, 9, 6), np.uint8))
    with pytest.raises(DatalistError, match=r"shape mismatch .*volume-2\.nii \(8, 9, 5\).*segmentation-2\.nii \(8, 9, 6\)"):
        prepare_lits(root, tmp_path / "raw", verbose=False)


def test_unexpected_label_values(tmp_path):
    root = lits_tree(tmp_path / "LiTS", n1=(0,), n2=())
    _nii(root / "Training Batch 1" / "segmentation-0.nii", _seg(0, [1, 3]))  # 3 is not a LiTS label
    with pytest.raises(DatalistError, match=r"unexpected label values \[3\] in .*segmentation-0\.nii"):
        prepare_lits(root, tmp_path / "raw", verbose=False)
    kroot = kits_tree(tmp_path / "kits", cases=(0,), values=(1, 5))
    with pytest.raises(DatalistError, match=r"unexpected label values \[5\] in .*case_00000.segmentation\.nii\.gz"):
        prepare_kits(kroot, tmp_path / "raw2", verbose=False)


def test_duplicate_case(tmp_path):
    root = lits_tree(tmp_path / "LiTS", n1=(1,), n2=(1,))
    with pytest.raises(DatalistError, match=r"duplicate LiTS (volume|segmentation) 1: .*Training Batch 1.*Training Batch 2"):
        find_lits_cases(root)
