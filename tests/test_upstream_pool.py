"""The unlabelled upstream pool (tpp_monai.data.upstream_pool): tiles, sources, no downstream domain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tpp_monai.data import upstream_pool as up

ROOT = Path(__file__).resolve().parents[1]


def test_tiles_grid_levels_sizes_and_blank_tiles_dropped():
    img = np.zeros((200, 100), np.float32)
    img[:, :] = np.linspace(0, 1, 100)[None]  # a ramp: every tile has contrast
    t = up.tiles(img, (1, 2), size=32)
    assert len(t) == 2 * (1 + 4) and all(x.shape == (32, 32) for x in t)  # two squares along the long side
    np.testing.assert_allclose(t[0].mean(), img[:100].mean(), atol=1e-5)  # area resampling keeps the mean
    blank = np.full((64, 64), 0.5, np.float32)
    assert up.tiles(blank, (1, 2), size=16) == []


def test_pool_excludes_the_downstream_domain():
    assert not any(s.startswith(("MR", "emri", "693", "eCT", "liver")) for s in up.POOL_DICOMS)  # no MR, no CT


@pytest.fixture(scope="module")
def pool():
    from tpp_monai.data.demo_data import RegistryUnreachable

    try:
        return up.build_upstream_pool(ROOT / up.DEFAULT_POOL, verbose=False)
    except RegistryUnreachable as e:
        pytest.skip(f"the upstream pool cannot be built, a package registry is unreachable: {e}")


def test_built_pool_manifest_and_images(pool):
    man = json.loads((pool / "manifest.json").read_text())
    assert 200 <= man["counts"]["invesalius"] <= 2 * 108  # two windows of 108 slices, blank tiles dropped
    assert man["counts"]["pydicom-data"] > 150 and up.pool_is_complete(pool, 128)
    entries = json.loads((pool / "unlabelled.json").read_text())["unlabelled"]
    assert len(entries) == sum(man["counts"].values())
    from PIL import Image

    for e in entries[::40]:
        a = np.asarray(Image.open(pool / e["image"]))
        assert a.shape == (128, 128) and a.dtype == np.uint8 and a.std() > 3
