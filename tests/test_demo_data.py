"""Real demo data cache (pyradiomics + invesalius-examples slices): build or reuse, then check it.

The first run fetches ~50 MB from PyPI and Debian (about 25 s here); later runs reuse the cache.
Skipped only when a registry is unreachable.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tpp_monai.data import demo_data as dd



def _png(cache, rel):
    return np.asarray(Image.open(cache / rel))


def test_manifest_and_idempotent(cache):
    man = json.loads((cache / "manifest.json").read_text())
    assert man["sources"] == ["invesalius", "pyradiomics"] and man["size"] == 96
    assert dd.cache_is_complete(cache, 96)
    mtime = os.stat(cache / "manifest.json").st_mtime_ns
    dd.build_demo_cache(cache, size=96, verbose=False)  # complete: nothing rebuilt
    assert os.stat(cache / "manifest.json").st_mtime_ns == mtime
    assert not dd.cache_is_complete(cache, 64)  # other size -> would rebuild


def test_images_shapes_and_ranges(cache):
    pool = json.loads((cache / "unlabelled.json").read_text())["unlabelled"]
    assert len(pool) == 48 + 61 + 25 + 23 + 108
    for e in pool[::15]:
        a = _png(cache, e["image"])
        assert a.shape == (96, 96) and a.dtype == np.uint8
    mid = _png(cache, "images/headct_054.png")
    assert mid.min() == 0 and mid.max() >= 200 and mid.std() > 20  # windowed, not constant


def test_headct_segmentation(cache):
    dl = json.loads((cache / "datalist_headct.json").read_text())
    zs = {k: sorted(e["slice"] for e in v) for k, v in dl.items()}
    assert [len(zs[k]) for k in ("training", "validation", "test")] == [72, 12, 15]
    train = set(zs["training"])
    for k in ("validation", "test"):  # no evaluated slice is the neighbour of a training slice
        assert not {z - 1 for z in zs[k]} & train and not {z + 1 for z in zs[k]} & train, k
        assert min(zs[k]) < 108 / 3 and max(zs[k]) > 108 / 3, k  # evaluation spans the head, not one end
    empty = [e for e in dl["training"] if not _png(cache, e["label"]).any()]
    assert {e["slice"] for e in empty} >= {106, 107}  # the model sees the empty slices above the head
    seen = set()
    for e in dl["training"] + dl["validation"] + dl["test"]:
        seen |= set(np.unique(_png(cache, e["label"])).tolist())
    assert seen == {0, 1, 2}  # background, soft tissue, bone
    m = _png(cache, "labels/headct_050.png")
    img = _png(cache, "images/headct_050.png").astype(float)
    assert img[m == 2].mean() > img[m == 0].mean()  # bone brighter than air


def test_tumour_patient_split(cache):
    seg = json.loads((cache / "datalist_tumour.json").read_text())
    cls = json.loads((cache / "datalist_tumour_cls.json").read_text())
    for dl in (seg, cls):
        vols = {k: {e["volume"] for e in v} for k, v in dl.items()}
        assert vols == {"training": {"lung2", "brain1"}, "validation": {"brain2"}, "test": {"lung1"}}
    for v in seg.values():
        for e in v:
            m = _png(cache, e["label"])
            assert set(np.unique(m)) == {0, 1}
    assert {e["label"] for e in cls["training"]} == {0, 1}
    # classification labels agree with the masks
    with_mask = {e["image"] for v in seg.values() for e in v}
    assert all((e["label"] == 1) == (e["image"] in with_mask) for v in cls.values() for e in v)


def test_seg_transforms_on_cache(cache):
    from tpp_monai.data.transforms import cls_transforms, seg_transforms

    entry = dd.load_datalist(cache, "datalist_headct.json")["training"][40]
    for train in (False, True):
        out = seg_transforms(train=train, image_size=64, in_channels=3, num_classes=3)(entry)
        assert out["image"].shape == (3, 64, 64) and out["label"].shape == (1, 64, 64)
        assert set(out["label"].unique().tolist()) <= {0, 1, 2}
    out = seg_transforms(False, 64, in_channels=1, num_classes=3, normalize="none")(entry)
    assert out["image"].shape == (1, 64, 64) and 0 <= out["image"].min() and out["image"].max() <= 1
    c = dd.load_datalist(cache, "datalist_tumour_cls.json")["training"][0]
    out = cls_transforms(train=True, image_size=32, in_channels=3)(c)
    assert out["image"].shape == (3, 32, 32) and int(out["label"]) in (0, 1)


def test_unreachable_registry_is_reported(tmp_path):
    def offline(download_dir, verbose):
        raise dd.RegistryUnreachable("pip download pyradiomics==3.0.1 failed: connection refused")

    with pytest.raises(dd.RegistryUnreachable, match="connection refused"):
        dd.build_demo_cache(tmp_path / "c", sources=("pyradiomics",), verbose=False,
                            fetchers={"pyradiomics": offline})
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_tumour_crops_follow_the_masks_and_the_patient_split(cache):
    """The study's downstream task: crops around real tumour masks, split by patient, labels from the masks."""
    seg = json.loads((cache / "datalist_tumour_crops.json").read_text())
    cls = json.loads((cache / "datalist_tumour_crops_cls.json").read_text())
    assert [len(seg[k]) for k in ("training", "validation", "test")] == [18, 24, 24]
    for dl in (seg, cls):
        assert {k: {e["volume"] for e in v} for k, v in dl.items()} == {
            "training": {"lung2", "brain1"}, "validation": {"lung1", "brain2"}, "test": {"lung1", "brain2"}}
        assert dl["validation"] == dl["test"]
    for e in seg["training"] + seg["test"]:
        m = _png(cache, e["label"])
        assert m.shape == (dd.CROP_SIZE, dd.CROP_SIZE) and set(np.unique(m)) == {0, 1}, e
    assert len({e["image"] for e in seg["test"]}) == 24  # four different crops per test slice
    pos = {k: sum(e["label"] for e in v) for k, v in cls.items()}
    neg = {k: sum(1 - e["label"] for e in v) for k, v in cls.items()}
    assert (pos["training"], neg["training"], pos["test"], neg["test"]) == (18, 68, 24, 65)
    assert {e["image"] for e in cls["training"] if e["label"]} == {e["image"] for e in seg["training"]}
    # negatives come from tumour-free slices only
    tumour_slices = {(e["volume"], e["slice"]) for v in seg.values() for e in v}
    assert all((e["volume"], e["slice"]) not in tumour_slices for v in cls.values() for e in v if not e["label"])


def test_crop_offsets_are_seeded_and_bounded():
    offs = [dd._crop_offsets("lung1", z, k, 256) for z in range(10) for k in range(4)]
    assert offs == [dd._crop_offsets("lung1", z, k, 256) for z in range(10) for k in range(4)]  # deterministic
    assert len(set(offs)) > 30 and all(abs(dy) <= 64 and abs(dx) <= 64 for dy, dx in offs)
    vol = dd.Volume("lung9", np.zeros((3, 300, 300), np.float32), np.zeros((3, 300, 300), np.uint8), "ct_chest")
    vol.label[1, 140:160, 10:30] = 1  # tumour near the border: the crop is zero-padded, never empty of it
    (z, k, img, mask), = dd.tumour_crops(vol, vol.image, per_slice=1)
    assert z == 1 and img.shape == mask.shape == (dd.CROP_SIZE, dd.CROP_SIZE) and mask.sum() > 0
