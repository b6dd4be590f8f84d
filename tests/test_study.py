"""The label-efficiency study (tpp_monai.study, scripts/study.py): subsets, statistics, table, resumability."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpp_monai.study import label_subset, markdown_table, summarise, write_subset_datalist

ROOT = Path(__file__).resolve().parents[1]


def test_label_subsets_are_seeded_nested_and_never_empty():
    entries = [{"image": f"{i}.png"} for i in range(74)]
    small, mid, full = (label_subset(entries, f, seed=1) for f in (0.1, 0.25, 1.0))
    assert [len(x) for x in (small, mid, full)] == [8, 19, 74]  # ceil(f * n)
    ids = lambda xs: {e["image"] for e in xs}  # noqa: E731
    assert ids(small) <= ids(mid) <= ids(full)  # nested: the 10% subset is inside the 25% subset
    assert label_subset(entries, 0.1, seed=1) == small  # deterministic
    assert ids(label_subset(entries, 0.1, seed=2)) != ids(small)  # the seed draws another subset
    assert len(label_subset(entries[:3], 0.1, seed=0)) == 1
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(entries, 0.0, seed=0)


def test_subset_datalist_keeps_evaluation_splits_and_absolute_paths(tmp_path):
    src = tmp_path / "data" / "datalist.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"training": [{"image": f"i{i}.png", "label": f"l{i}.png"} for i in range(10)],
                               "test": [{"image": "t.png", "label": "tl.png"}]}))
    n = write_subset_datalist(src, tmp_path / "out" / "dl.json", 0.25, seed=0)
    dl = json.loads((tmp_path / "out" / "dl.json").read_text())
    assert n == 3 and len(dl["training"]) == 3 and dl["test"] == [
        {"image": str(src.parent / "t.png"), "label": str(src.parent / "tl.png")}]
    assert all(Path(e["image"]).is_absolute() and e["image"].startswith(str(src.parent)) for e in dl["training"])


def _arm(f, s, init, dice):
    return {"fraction": f, "seed": s, "init": init, "n_labelled": int(100 * f), "dice": dice, "hd95": 100 - dice}


def test_summary_statistics_and_table_values():
    res = [_arm(0.1, 0, "random", 50.0), _arm(0.1, 0, "tpp", 54.0), _arm(0.1, 1, "random", 60.0),
           _arm(0.1, 1, "tpp", 59.0), _arm(0.1, 2, "random", 55.0), _arm(0.1, 2, "tpp", 58.0),
           _arm(1.0, 0, "random", 80.0), _arm(1.0, 0, "tpp", 81.0)]
    rows = summarise(res, "dice")
    r = rows[0]
    assert r["fraction"] == 0.1 and r["seeds"] == [0, 1, 2]
    assert r["random"] == pytest.approx((55.0, 5.0))  # sample std (ddof 1)
    assert r["tpp"][0] == pytest.approx(57.0) and r["tpp"][1] == pytest.approx(math.sqrt(7.0))
    assert r["diff_per_seed"] == pytest.approx([4.0, -1.0, 3.0]) and r["tpp_better"] == 2
    assert r["diff"][0] == pytest.approx(2.0) and r["diff"][1] == pytest.approx(math.sqrt(7.0))
    assert rows[1]["random"] == (80.0, 0.0) and rows[1]["tpp_better"] == 1
    hd = summarise(res, "hd95")[0]
    assert hd["tpp_better"] == 2  # lower HD95 is better: seeds 0 and 2
    table = markdown_table(rows)
    assert "| 10% | 10 | 55.00 +- 5.00 | 57.00 +- 2.65 | +2.00 +- 2.65 | +4.00, -1.00, +3.00 | 2/3 |" in table
    assert "| 100% | 100 | 80.00 +- 0.00 | 81.00 +- 0.00 | +1.00 +- 0.00 | +1.00 | 1/1 |" in table


def test_study_quick_end_to_end_and_resumable(cache, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "scripts/study.py", "--quick", "--out", str(out), "--work", str(work), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "study.md").read_text()
    rows = re.findall(r"^\| (\d+)% \| (\d+) \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \+- ([\d.]+) \| ([+-][\d.]+) \+- "
                      r"([\d.]+) \| ([^|]+) \| (\d)/(\d) \|$", md, flags=re.M)
    dice_rows = rows[:2]
    assert [r[0] for r in dice_rows] == ["25", "100"], md  # --quick: fractions 0.25, 1.0
    assert [int(r[1]) for r in dice_rows] == [18, 72]  # ceil(0.25 * 72) labelled slices, then all
    for r in dice_rows:
        vals = [float(x) for x in r[2:8]]
        assert all(math.isfinite(v) for v in vals) and 0 <= vals[0] <= 100 and 0 <= vals[2] <= 100
        assert float(r[4]) - float(r[2]) == pytest.approx(float(r[6]), abs=0.02)  # mean diff = diff of means
        assert int(r[10]) == 2 and 0 <= int(r[9]) <= 2  # two seeds, paired
    arms = json.loads((out / "results.json").read_text())["arms"]
    assert len(arms) == 8 and {a["init"] for a in arms} == {"random", "tpp"}
    assert all(math.isfinite(a["dice"]) and math.isfinite(a["hd95"]) for a in arms)
    for png in ("study_dice.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 1000
    done = sorted(work.glob("arms/*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    proc2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in done] == stamps  # finished arms are read back, not re-run
    assert "re-using" in proc2.stdout  # the cached upstream backbone
    assert json.loads((out / "results.json").read_text())["arms"] == arms  # same results, read back


def test_work_folder_with_other_settings_is_refused(tmp_path):
    from tpp_monai.study import StudySpec, check_resumable

    spec = StudySpec(bundle="b", dataset_dir="d", datalist="d/dl.json", work=str(tmp_path), iterations=10)
    (tmp_path / "spec.json").write_text(json.dumps(spec.__dict__))
    check_resumable(StudySpec(**{**spec.__dict__, "seeds": (0, 1, 2, 3)}))  # more seeds: allowed
    with pytest.raises(ValueError, match=r"iterations: 10 -> 20.*another --work"):
        check_resumable(StudySpec(**{**spec.__dict__, "iterations": 20}))


def test_target_norms_group_tensors_by_kind(tmp_path):
    import torch

    from tpp_monai.backbones.vit import VisionTransformer
    from tpp_monai.checkpoint import save_target_checkpoint
    from tpp_monai.peft import apply_peft
    from tpp_monai.study import target_norms

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    apply_peft(vit, "adapter", {"bottleneck": 4})
    with torch.no_grad():
        vit.blocks[0].mlp.peft_adapter.up.weight.fill_(1.0)  # 32 x 4 ones: norm sqrt(128)
    save_target_checkpoint(tmp_path / "t.pt", vit)
    norms = target_norms(tmp_path / "t.pt")
    assert set(norms) == {"down.weight", "down.bias", "up.weight", "up.bias"}
    assert norms["up.weight"] == pytest.approx(128 ** 0.5 / 2)  # block 1's up-projection is still zero
    assert norms["up.bias"] == 0.0


def test_bundle_without_upstream_stage_needs_a_backbone(tmp_path):
    from tpp_monai.study import StudySpec, ensure_upstream

    spec = StudySpec(bundle=str(ROOT / "bundles/qata_adapter_tpp"), dataset_dir="d", datalist="d/dl.json",
                     work=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--backbone_ckpt"):
        ensure_upstream(spec)
    assert ensure_upstream(StudySpec(**{**spec.__dict__, "backbone_ckpt": "ckpt.pth"})) == Path("ckpt.pth")
