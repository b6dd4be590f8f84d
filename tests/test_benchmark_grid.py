"""The benchmark grid (tpp_monai.benchmark.grid, scripts/benchmark_grid.py): every cell is a bundle run."""

import csv
import json
from pathlib import Path

import pytest
from conftest import load_script

from tpp_monai.benchmark.grid import cell_path, cell_study_spec, expand_cells, markdown_table, run_grid

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "mhist_adapter_tpp"

SPEC = {
    "bundle": "bundles/mhist_adapter_tpp",
    "overrides": {"vit_size": "tiny", "image_size": 16, "vit_overrides": {"patch_size": 8, "depth": 1},
                  "pretext_config": {"decoder_dim": 16, "decoder_depth": 1}},
    "methods": [{"name": "adapter", "config": {"bottleneck": 4}}, "full", "sh_peft"],
    "datasets": [{"name": "synthetic", "num_classes": 2, "n_train": 16, "n_val": 8}],
    "seeds": [0],
    "tpp": [False, True],
    "metric": "acc",
    "train": {"iterations": 2, "batch_size": 8, "lr": 1e-3},
    "tpp_train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0},
}
IDS = ["0000__adapter__synthetic__notpp__s0", "0001__adapter__synthetic__tpp__s0", "0002__full__synthetic__notpp__s0",
       "0003__full__synthetic__tpp__s0", "0004__sh_peft__synthetic__notpp__s0", "0005__sh_peft__synthetic__tpp__s0"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The tiny grid, run as a user would: first one cell as a --cell job, then the rest by a rerun."""
    tmp = tmp_path_factory.mktemp("grid")
    spec_path, out = tmp / "spec.json", tmp / "out"
    spec_path.write_text(json.dumps(SPEC))
    cells = expand_cells(SPEC)
    assert load_script("benchmark_grid").main(["--spec", str(spec_path), "--out", str(out), "--cell", "0"]) == 0
    first_only = sorted(p.name for p in (out / "cells").glob("*.json"))
    mtime = cell_path(out, cells[0]).stat().st_mtime_ns
    ran = run_grid(spec_path, out, log=lambda s: None)
    return {"spec": spec_path, "out": out, "cells": cells, "first_only": first_only, "ran": ran,
            "first_kept": cell_path(out, cells[0]).stat().st_mtime_ns == mtime}


def _rows(out):
    return {r["cell"]: r for r in (json.loads(p.read_text()) for p in (out / "cells").glob("*.json"))}


@pytest.mark.slow
def test_grid_resumes_and_writes_reports(grid):
    out, cells = grid["out"], grid["cells"]
    assert [c.cell_id for c in cells] == IDS
    assert grid["first_only"] == [IDS[0] + ".json"]  # the --cell job ran only its cell
    assert grid["ran"] == IDS[1:] and grid["first_kept"]  # the rerun ran the missing cells only
    assert run_grid(grid["spec"], out, log=lambda s: None) == []  # nothing left
    cell_path(out, cells[5]).unlink()  # a deleted cell file is recomputed, the others are kept
    assert run_grid(grid["spec"], out, log=lambda s: None) == [IDS[5]]
    rows = {r["cell"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert [r["method"] for r in rows.values()] == ["adapter"] * 2 + ["full"] * 2 + ["sh_peft"] * 2
    ok = [IDS[0], IDS[1], IDS[2]]
    assert all(rows[i]["status"] == "ok" and 0 <= float(rows[i]["score"]) <= 100 for i in ok), rows
    assert all(rows[i]["score"] == rows[i]["acc"] for i in ok)  # the spec's metric
    # the bundle's own network: full fine-tuning trains everything, the adapter a small part
    assert 0 < float(rows[IDS[0]]["param_percent"]) < 10 and float(rows[IDS[2]]["param_percent"]) == 100.0
    head = 2 * 192 + 192 * 2 + 2  # ViT-tiny's fc_norm and the 2-class linear head
    n = {i: (int(rows[i]["trainable"]), int(rows[i]["total"])) for i in ok}
    assert n[IDS[0]] == n[IDS[1]] and n[IDS[0]][1] - n[IDS[2]][1] == n[IDS[0]][0] - head  # the adapters are added
    assert [rows[i]["status"] for i in IDS[3:]] == ["unsupported"] * 3
    sh = _rows(out)[IDS[4]]
    assert "not run by the bundles" in sh["error"] and "SH-PEFT" in sh["error"]
    md = (out / "results.md").read_text()
    assert "| adapter | ✓ |" in md and "±" in md and "unsupported" in md
    assert "| adapter | synthetic | 1 |" in md  # the paired TPP effect (one seed)
    for png in ("perf_vs_params.png", "perf_vs_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


def _bundle_run(files, **overrides):
    """What a user runs: ``python -m monai.bundle run --config_file <files> --<id> <value> ...``."""
    from monai.bundle import run

    cfg = BUNDLE / "configs"
    run(config_file=[str(cfg / f) for f in files], meta_file=str(cfg / "metadata.json"),
        logging_file=str(cfg / "logging.conf"), **overrides)


@pytest.mark.slow
def test_grid_cells_give_the_metrics_of_the_equivalent_bundle_runs(grid, tmp_path):
    """A grid cell (= a study arm, tpp_monai.study.run_arm) and the bundle's own train.json then evaluate.json
    (after tpp_pretrain.json for TPP) with the same overrides and seed give the same metrics, exactly."""
    import torch

    from tpp_monai.peft.target_checkpoint import read_target_checkpoint

    out = grid["out"]
    rows = _rows(out)
    datalist = out / "data" / "synthetic" / "datalist.json"
    common = dict(dataset_dir=str(datalist.parent), datalist=str(datalist), peft_method="adapter",
                  peft_config={"bottleneck": 4}, vit_size="tiny", image_size=16, vit_overrides={"patch_size": 8, "depth": 1},
                  pretext_config={"decoder_dim": 16, "decoder_depth": 1}, num_classes=2,
                  class_names=["class_0", "class_1"], backbone_ckpt="", seed=0, num_workers=0)
    fine_tune = dict(num_iterations=2, batch_size=8, lr=1e-3, val_interval=1)  # 1 epoch of 2 batches: validated at its end
    tpp_root = tmp_path / "tpp"
    _bundle_run(["train.json", "tpp_pretrain.json"], bundle_root=str(tpp_root), **common, pretext="mae",
                tpp_epochs=1, tpp_batch_size=8, tpp_warmup_epochs=0)
    tpp_ckpt = tpp_root / "models" / "tpp_target_params.pt"
    grid_tpp = out / "work" / IDS[1] / "tpp" / "seed0" / "models" / "tpp_target_params.pt"
    a, b = read_target_checkpoint(tpp_ckpt)["state_dict"], read_target_checkpoint(grid_tpp)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same TPP stage
    finals = {}
    for cell, tpp in ((IDS[0], ""), (IDS[1], str(tpp_ckpt))):
        root = tmp_path / cell
        _bundle_run(["train.json"], bundle_root=str(root), **common, **fine_tune, tpp_ckpt=tpp)
        _bundle_run(["train.json", "evaluate.json"], bundle_root=str(root), **common, **fine_tune,
                    eval_split="validation")
        m = json.loads((root / "eval" / "metrics.json").read_text())
        for k in ("acc", "auc", "f1"):
            assert rows[cell][k] == 100 * float(m[k]), (cell, k, rows[cell][k], m[k])
        obj = torch.load(root / "models" / "model.pt", weights_only=True)
        finals[cell] = obj.get("model", obj)
    # the TPP cell fine-tuned from the pre-trained target parameters, not from the adapter's own init
    up = [k for k in finals[IDS[0]] if k.endswith("peft_adapter.up.weight")]
    assert up and not all(torch.equal(finals[IDS[0]][k], finals[IDS[1]][k]) for k in up)


def test_spec_expansion_order_and_per_method_train_overrides():
    spec = json.loads((ROOT / "benchmarks" / "specs" / "tiny_grid.json").read_text())
    cells = expand_cells(spec)
    n = len(spec["methods"]) * len(spec["datasets"]) * len(spec["tpp"]) * len(spec["seeds"])
    assert [c.index for c in cells] == list(range(n))
    assert (cells[0].method, cells[0].tpp, cells[0].seed) == ("linear", False, 0)
    full = [c for c in cells if c.method == "full"]
    assert full and all(c.train == {"lr": 3e-4} for c in full)
    assert len({c.cell_id for c in cells}) == n


def test_cell_spec_is_the_bundle_overrides_of_a_study_arm(tmp_path):
    """A cell's settings reach the bundle under the bundle's own ids; ids the grid sets per cell are refused."""
    spec = {**SPEC, "backbone_ckpt": "mae.pth", "device": "cpu",
            "methods": [{"name": "lora", "config": {"r": 2}, "train": {"lr": 5e-4}, "overrides": {"weight_decay": 0.0}}]}
    cell = expand_cells(spec)[1]
    s = cell_study_spec(cell, spec, tmp_path)
    assert (s.peft_method, s.lr, s.iterations, s.batch_size, s.val_every, s.backbone_ckpt) == ("lora", 5e-4, 2, 8, 2, "mae.pth")
    assert (s.tpp_epochs, s.tpp_batch_size, s.tpp_warmup_epochs, s.pretext, s.seeds, s.fractions) == (1, 8, 0, "mae", (0,), (1.0,))
    assert s.overrides["peft_config"] == {"r": 2} and s.overrides["weight_decay"] == 0.0
    assert s.overrides["eval_split"] == "validation" and s.overrides["device"] == "$torch.device('cpu')"
    assert Path(s.bundle) == BUNDLE and Path(s.work) == tmp_path / "work" / cell.cell_id
    assert s.common()["vit_overrides"] == {"patch_size": 8, "depth": 1} and s.common()["num_classes"] == 2
    lists = json.loads(Path(s.datalist).read_text())
    assert [len(lists[k]) for k in ("training", "validation", "test")] == [16, 8, 8]
    assert "peft_config" not in cell_study_spec(expand_cells(SPEC)[2], SPEC, tmp_path).overrides  # full: the bundle's
    with pytest.raises(ValueError, match=r"overrides \['seed'\].*'seeds'"):
        cell_study_spec(cell, {**spec, "overrides": {"seed": 3}}, tmp_path)
    with pytest.raises(ValueError, match=r"'train' has \['epochs'\]"):
        cell_study_spec(cell, {**spec, "train": {"epochs": 3}}, tmp_path)


def test_synthetic_dataset_is_learnable_png_written_once(tmp_path):
    import numpy as np
    from PIL import Image

    from tpp_monai.benchmark.grid import write_synthetic_dataset

    dl = write_synthetic_dataset(tmp_path, num_classes=4, n_train=12, n_val=4, image_size=8, seed=3, noise=0.0)
    lists = json.loads(dl.read_text())
    assert lists["test"] == lists["validation"] and len(lists["training"]) == 12
    for e in lists["training"]:
        img = np.asarray(Image.open(tmp_path / e["image"]))  # (8, 8, 3) uint8
        c = e["label"]
        r, col = (c % 4 // 2) * 4, (c % 4 % 2) * 4
        bright = np.zeros((8, 8, 3), bool)
        bright[r:r + 4, col:col + 4, c % 3] = True
        assert img.dtype == np.uint8 and (img[bright] == 188).all() and (img[~bright] == 128).all()
    mtime = dl.stat().st_mtime_ns
    assert write_synthetic_dataset(tmp_path, 4, 12, 4, 8, 3, 0.0) == dl and dl.stat().st_mtime_ns == mtime
    write_synthetic_dataset(tmp_path, 4, 12, 4, 8, seed=4, noise=0.0)  # other settings: rewritten
    assert dl.stat().st_mtime_ns != mtime


def test_report_has_the_studys_paired_statistic():
    from tpp_monai.reporting import mean_std, paired_difference

    rows = [{"cell": f"c{i}", "index": i, "method": "adapter", "dataset": "d", "seed": s, "tpp": t, "status": "ok",
             "score": v, "param_percent": 1.0, "memory_mb": 2.0}
            for i, (s, t, v) in enumerate([(0, False, 50.0), (1, False, 60.0), (2, False, 55.0),
                                           (0, True, 54.0), (1, True, 59.0), (2, True, 58.0)])]
    md = markdown_table(rows, "f1")
    m, sd = mean_std([54.0, 59.0, 58.0])
    assert f"| adapter | ✓ | 1.00 | 2.0 | {m:.2f} ± {sd:.2f} |" in md
    d = paired_difference([50.0, 60.0, 55.0], [54.0, 59.0, 58.0])
    assert f"| adapter | d | 3 | {d.mean:+.2f} | [{d.lo:+.2f}, {d.hi:+.2f}] | 2/3 |" in md and d.mean == pytest.approx(2.0)
