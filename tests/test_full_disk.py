"""A full disk leaves nothing that breaks a later run, and says so naming the file (issue 21, items 6, 13, 14).

A full disk is the real kernel answer: the temporary file's descriptor is ``/dev/full``, whose every write
fails with ENOSPC (torch's zip writer then reports ``unexpected pos``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def _full_disk(monkeypatch, tmp_path: Path) -> list[str]:
    """Make the atomic writer's next temporary files land on /dev/full; returns their names."""
    import tempfile

    made = []
    real = tempfile.mkstemp

    def mkstemp(prefix="", suffix="", dir=None):  # noqa: A002
        fd, name = real(prefix=prefix, suffix=suffix, dir=dir)
        os.close(fd)
        made.append(name)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return made


def test_torch_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    from tpp_monai.safe_io import DiskFullError, atomic_save

    path = atomic_save({"w": torch.ones(3)}, tmp_path / "model.pt")
    made = _full_disk(monkeypatch, tmp_path)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*model\.pt") as ei:
        atomic_save({"w": torch.zeros(100_000)}, path)
    cause = ei.value.__cause__  # what torch / Python alone say: "unexpected pos 704 vs 598" or a bare ENOSPC
    assert "unexpected pos" in str(cause) or getattr(cause, "errno", None) == 28
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))  # previous file intact
    assert made and not any(os.path.exists(m) for m in made)  # no temporary file left


def test_prepare_datalist_leaves_no_tmp_on_a_full_disk(tmp_path, monkeypatch):
    from tpp_monai.safe_io import DiskFullError
    from tpp_monai.data.datalist import write_datalist

    out = tmp_path / "datalist.json"
    _full_disk(monkeypatch, tmp_path)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*datalist\.json"):
        write_datalist(out, {"training": [{"image": "a.png", "label": 0}], "validation": [], "test": []}, verbose=False)
    assert sorted(os.listdir(tmp_path)) == []  # neither out.tmp nor a half-written datalist


def _cache_items(tmp_path: Path, n: int = 3) -> list[dict]:
    from PIL import Image

    items = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(p)
        items.append({"image": str(p)})
    return items


def _transform():
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), ScaleIntensityd("image")])


def test_truncated_disk_cache_entry_is_rebuilt_with_a_warning(tmp_path):
    from tpp_monai.data.cache import cached_dataset

    items, cache = _cache_items(tmp_path), tmp_path / "cache"
    first = [cached_dataset(items, _transform(), cache="disk", cache_dir=cache)[i]["image"] for i in range(3)]
    entries = sorted(cache.glob("*.pt"))
    assert len(entries) == 3
    for e, cut in zip(entries[:2], (0.5, 0.02)):  # half an archive (zip error), a few bytes (EOFError)
        e.write_bytes(e.read_bytes()[: max(1, int(cut * e.stat().st_size))])
    with pytest.warns(UserWarning, match=r"MONAI disk-cache entry .*\.pt is unreadable .*rebuilding it") as rec:
        again = [cached_dataset(items, _transform(), cache="disk", cache_dir=cache)[i]["image"] for i in range(3)]
    assert sum("rebuilding" in str(w.message) for w in rec) == 2
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(first, again))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        third = [cached_dataset(items, _transform(), cache="disk", cache_dir=cache)[i]["image"] for i in range(3)]
    assert not [w for w in rec if "disk-cache" in str(w.message)]  # rebuilt entries read back cleanly
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(first, third))
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))


def test_disk_cache_on_a_full_disk_goes_on_without_the_entry(tmp_path, monkeypatch):
    from tpp_monai.data.cache import cached_dataset

    items, cache = _cache_items(tmp_path, 1), tmp_path / "cache"
    cache.mkdir()
    _full_disk(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match=r"entry not written .*disk full while writing"):
        x = cached_dataset(items, _transform(), cache="disk", cache_dir=cache)[0]["image"]
    assert tuple(x.shape) == (1, 8, 8) and sorted(os.listdir(cache)) == []
