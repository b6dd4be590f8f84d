import csv
import json
from pathlib import Path

from conftest import load_script

from tpp_monai.benchmark.grid import cell_path, expand_cells, markdown_table, run_grid

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "backbone": {"size": "tiny", "img_size": 16, "patch_size": 8, "depth": 1},
    "methods": ["ln_tuning", {"name": "adapter", "config": {"bottleneck": 4}}],
    "datasets": [{"name": "synthetic", "num_classes": 2, "n_train": 16, "n_val": 8}],
    "seeds": [0],
    "tpp": [False],
    "metric": "acc",
    "train": {"iterations": 2, "batch_size": 8},
}


def _script():
    return load_script("benchmark_grid")


def test_grid_resumes_and_writes_reports(tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    out = tmp_path / "out"
    cells = expand_cells(SPEC)
    assert [c.cell_id for c in cells] == ["0000__ln_tuning__synthetic__notpp__s0", "0001__adapter__synthetic__notpp__s0"]
    # "interrupted" run: only the first cell finished (as a --cell job)
    assert _script().main(["--spec", str(spec_path), "--out", str(out), "--cell", "0"]) == 0
    first = cell_path(out, cells[0])
    assert first.is_file() and not cell_path(out, cells[1]).exists()
    mtime = first.stat().st_mtime_ns
    # rerun the whole grid: only the missing cell runs
    ran = run_grid(spec_path, out, log=lambda s: None)
    assert ran == [cells[1].cell_id]
    assert first.stat().st_mtime_ns == mtime
    assert run_grid(spec_path, out, log=lambda s: None) == []  # nothing left
    # a deleted cell file is recomputed, the other is kept
    cell_path(out, cells[1]).unlink()
    assert run_grid(spec_path, out, log=lambda s: None) == [cells[1].cell_id]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["ln_tuning", "adapter"]
    assert all(r["status"] == "ok" and 0 <= float(r["score"]) <= 100 for r in rows)
    assert 0 < float(rows[0]["param_percent"]) < float(rows[1]["param_percent"]) < 100
    md = (out / "results.md").read_text()
    assert "| ln_tuning |" in md and "±" in md
    for png in ("perf_vs_params.png", "perf_vs_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_tpp_cells_use_the_pluggable_hook_and_unsupported_are_recorded(tmp_path):
    spec = {**SPEC, "methods": [{"name": "adapter", "config": {"bottleneck": 4}}, "full"], "tpp": [True]}
    calls = []

    def hook(backbone, cell, spec_, images, work_dir):
        from tpp_monai.peft import apply_peft

        calls.append((cell.method, tuple(images.shape)))
        apply_peft(backbone, cell.method, {"bottleneck": 4})

    run_grid(spec, tmp_path, tpp_hook=hook, log=lambda s: None)
    assert calls == [("adapter", (16, 3, 16, 16))]
    rows = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.json")}
    assert rows["adapter"]["status"] == "ok" and rows["adapter"]["tpp"] is True
    assert rows["full"]["status"] == "unsupported"
    assert "unsupported" in markdown_table(list(rows.values()), "acc")


def test_default_tpp_hook_runs_tpp_pretrain(tmp_path):
    spec = {**SPEC, "methods": [{"name": "adapter", "config": {"bottleneck": 4}}], "tpp": [True],
            "tpp_train": {"iterations": 1, "batch_size": 8, "pretext_config": {"decoder_dim": 16, "decoder_depth": 1}}}
    assert len(run_grid(spec, tmp_path, log=lambda s: None)) == 1
    row = json.loads(next((tmp_path / "cells").glob("*.json")).read_text())
    assert row["status"] == "ok", row["error"]
    assert list((tmp_path / "work").rglob("*.pt")) or list((tmp_path / "work").iterdir())


def test_spec_expansion_order_and_per_method_train_overrides():
    spec = json.loads((ROOT / "benchmarks" / "specs" / "tiny_grid.json").read_text())
    cells = expand_cells(spec)
    n = len(spec["methods"]) * len(spec["datasets"]) * len(spec["tpp"]) * len(spec["seeds"])
    assert [c.index for c in cells] == list(range(n))
    assert (cells[0].method, cells[0].tpp, cells[0].seed) == ("linear", False, 0)
    full = [c for c in cells if c.method == "full"]
    assert full and all(c.train == {"lr": 3e-4} for c in full)
    assert len({c.cell_id for c in cells}) == n


def test_backbone_checkpoint_is_loaded(tmp_path):
    import torch

    from tpp_monai.backbones.vit import build_vit
    from tpp_monai.benchmark.grid import build_backbone

    torch.manual_seed(7)
    vit = build_vit("tiny", img_size=16, patch_size=8, depth=1)
    torch.save({"model": vit.state_dict()}, tmp_path / "mae.pth")
    spec = {**SPEC, "backbone": {**SPEC["backbone"], "checkpoint": str(tmp_path / "mae.pth")}}
    loaded = build_backbone(spec)
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), loaded.state_dict().values()))
