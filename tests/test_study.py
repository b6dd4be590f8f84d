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
    from tpp_monai.reporting import bootstrap_mean_ci

    lo, hi = bootstrap_mean_ci([4.0, -1.0, 3.0])  # the seeded percentile bootstrap of the paired differences
    assert r["ci"] == pytest.approx((lo, hi)) and -1.0 <= lo < 2.0 < hi <= 4.0
    table = markdown_table(rows)
    assert (f"| 10% | 10 | 55.00 +- 5.00 | 57.00 +- 2.65 | +2.00 +- 2.65 | [{lo:+.2f}, {hi:+.2f}] | "
            "+4.00, -1.00, +3.00 | 2/3 |") in table
    assert "| 100% | 100 | 80.00 +- 0.00 | 81.00 +- 0.00 | +1.00 +- 0.00 | [+1.00, +1.00] | +1.00 | 1/1 |" in table
    pooled = __import__("tpp_monai.study", fromlist=["pooled"]).pooled(res, "dice")
    assert pooled.n == 4 and pooled.mean == pytest.approx(7.0 / 4) and pooled.better == 3


def test_count_subsets_are_nested_balanced_and_checked(tmp_path):
    from tpp_monai.study import write_count_datalist

    src = tmp_path / "dl.json"
    src.write_text(json.dumps({"training": [{"image": f"{i}.png", "label": int(i % 4 == 0)} for i in range(40)],
                               "test": [{"image": "t.png", "label": 0}]}))
    subsets = {}
    for k in (1, 4):
        n = write_count_datalist(src, tmp_path / f"s{k}.json", k, seed=3, per_class=True)
        subsets[k] = json.loads((tmp_path / f"s{k}.json").read_text())["training"]
        assert n == 2 * k and sorted(e["label"] for e in subsets[k]) == [0] * k + [1] * k  # k of each class
    assert {e["image"] for e in subsets[1]} <= {e["image"] for e in subsets[4]}  # nested
    assert write_count_datalist(src, tmp_path / "a.json", 5, seed=3) == 5  # without per_class: 5 entries
    with pytest.raises(ValueError, match=r"label count 11 must be in \[1, 10\].*per class"):
        write_count_datalist(src, tmp_path / "b.json", 11, seed=0, per_class=True)  # only 10 positives


def test_vit_overrides_may_set_the_patch_size():
    """The setting's backbone (b1d4ae2: 'got multiple values for keyword argument patch_size')."""
    import warnings

    from tpp_monai.bundle.networks import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = build_backbone("", size="tiny", img_size=64, vit_overrides={"depth": 1, "patch_size": 8})
    assert vit.patch_size == 8 and vit.pos_embed.shape[1] in (64, 65)


def test_study_quick_end_to_end_and_resumable(cache, tmp_path):
    """The protocol's study (tumour-crop classification, label counts per class) at CI size, then resumed."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "scripts/study.py", "--quick", "--out", str(out), "--work", str(work), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "study.md").read_text()
    rows = re.findall(r"^\| [\d.]+% \| (\d+) \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \+- ([\d.]+) \| ([+-][\d.]+) \+- "
                      r"([\d.]+) \| \[([+-][\d.]+), ([+-][\d.]+)\] \| ([^|]+) \| (\d)/(\d) \|$", md, flags=re.M)
    auc_rows = rows[:2]
    assert [int(r[0]) for r in auc_rows] == [2, 4], md  # --quick: 1 and 2 labelled crops per class
    for r in auc_rows:
        vals = [float(x) for x in r[1:7]]
        assert all(math.isfinite(v) for v in vals) and 0 <= vals[0] <= 100 and 0 <= vals[2] <= 100
        assert float(r[3]) - float(r[1]) == pytest.approx(float(r[5]), abs=0.02)  # mean diff = diff of means
        assert float(r[7]) <= float(r[5]) <= float(r[8])  # the interval holds the mean difference
        assert int(r[11]) == 2 and 0 <= int(r[10]) <= 2  # two seeds, paired
    assert "Pooled over every label count (4 pairs)" in md
    arms = json.loads((out / "results.json").read_text())["arms"]
    assert len(arms) == 8 and {a["init"] for a in arms} == {"random", "tpp"}
    assert all(math.isfinite(a["auc"]) and math.isfinite(a["acc"]) for a in arms)
    for png in ("convergence.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 1000
    done = sorted(work.glob("arms/*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    proc2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
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
    from tpp_monai.peft.target_checkpoint import save_target_checkpoint
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


def test_final_model_file_loads_with_the_bundle_checkpoint_loader(tmp_path):
    """The study tests the final model (not the validation-selected model.pt): the file it writes loads
    with the evaluate stage's CheckedCheckpointLoader, into an equal network."""
    import torch
    from ignite.engine import Engine

    from tpp_monai.bundle.handlers import CheckedCheckpointLoader
    from tpp_monai.study import save_final_model

    torch.manual_seed(0)
    net, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    p = save_final_model(net, tmp_path / "models" / "final_model.pt")
    CheckedCheckpointLoader(load_path=str(p), load_dict={"model": other})(Engine(lambda e, b: None))
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def _fake_upstream_run(fail: bool):
    """A stand-in for the bundle's upstream MAE stage: writes the files it writes, or fails half-way."""
    def run(cfg_dir, files, title="", quiet=False, **kw):
        root = Path(kw["bundle_root"])
        (root / "logs" / "upstream").mkdir(parents=True, exist_ok=True)
        (root / "logs" / "upstream" / "tpp_log.jsonl").write_text(
            "".join(json.dumps({"kind": "loss", "iteration": i + 1, "loss": 1.0 - i / 100}) + "\n" for i in range(20)))
        if fail:
            raise RuntimeError("killed half-way")
        (root / "models").mkdir(parents=True, exist_ok=True)
        (root / "models" / "backbone_mae.pt").write_bytes(b"new")
        return 1.0
    return run


def test_rebuilding_the_upstream_keeps_the_cached_backbone_until_the_new_one_is_complete(tmp_path, monkeypatch):
    """A rebuild with other settings that dies (killed, error) leaves the cached backbone and its loss log as
    they were (one was truncated by an aborted re-run before); a complete rebuild replaces them."""
    import tpp_monai.study as study

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "unlabelled.json").write_text("{}")
    spec = study.StudySpec(bundle=str(ROOT / "bundles/mhist_adapter_tpp"), dataset_dir="d", datalist="d/dl.json",
                           work=str(tmp_path / "w"), upstream_bundle=str(ROOT / "bundles/demo_ct_adapter_tpp"),
                           upstream_datalist=str(pool / "unlabelled.json"), upstream_dir=str(tmp_path / "up"),
                           upstream_epochs=3)
    up = tmp_path / "up"
    (up / "models").mkdir(parents=True)
    (up / "models" / "backbone_mae.pt").write_bytes(b"old")
    (up / "logs" / "upstream").mkdir(parents=True)
    (up / "logs" / "upstream" / "tpp_log.jsonl").write_text("old log\n")
    (up / "settings.json").write_text(json.dumps({"epochs": 1}))  # other settings: a rebuild is due
    monkeypatch.setattr(study, "run_bundle_stage", _fake_upstream_run(fail=True))
    with pytest.raises(RuntimeError, match="half-way"):
        study.ensure_upstream(spec, log=lambda m: None)
    assert (up / "models" / "backbone_mae.pt").read_bytes() == b"old"
    assert (up / "logs" / "upstream" / "tpp_log.jsonl").read_text() == "old log\n"
    monkeypatch.setattr(study, "run_bundle_stage", _fake_upstream_run(fail=False))
    ckpt = study.ensure_upstream(spec, log=lambda m: None)
    assert ckpt == up / "models" / "backbone_mae.pt" and ckpt.read_bytes() == b"new"
    assert json.loads((up / "settings.json").read_text()) == spec.upstream_settings()
    prov = json.loads((up / "provenance.json").read_text())
    assert prov["iterations"] == 20 and prov["loss_first_10pct"] == pytest.approx(1.0 - 0.005)
    assert not (tmp_path / "up.partial").exists() and not (tmp_path / "up.old").exists()
    messages = []
    assert study.ensure_upstream(spec, log=messages.append) == ckpt and "re-using" in messages[0]


def test_effnet_specs_follow_the_protocol_order_and_baselines_run_without_tpp(tmp_path):
    """Issue 24's study (PROTOCOL.md): per task the Conv-Adapter pairs at 8 then 2 labels, seed by seed, then each
    Dutt baseline at 8 labels with the "random" init only; every spec uses the real weights, DINO and 64 px."""
    from tpp_monai.study import EFFNET_SETTING, effnet_specs

    specs = effnet_specs(tmp_path, tmp_path / "cache", tmp_path / "w.pth", tmp_path / "work")
    assert [(t, m) for t, m, _ in specs] == [(t, m) for t in ("cls", "seg") for m in
                                               ("conv_adapter", "tsa", "norm_tuning", "bitfit", "ssf_cnn")]
    pair = specs[0][2]
    assert pair.arms()[:4] == [(8, 0, "random"), (8, 0, "tpp"), (8, 1, "random"), (8, 1, "tpp")]
    assert len(pair.arms()) == 2 * 5 * 2 and pair.arms()[-1] == (2, 4, "tpp")
    assert specs[5][2].counts == (8,) and pair.tpp_lr == 4e-4 and pair.pretext_config["out_dim"] == 4096
    base = specs[1][2]
    assert base.inits == ("random",) and base.arms() == [(8, s, "random") for s in range(5)]
    for _, m, sp in specs:
        assert sp.peft_method == m and sp.pretext == "dino" and sp.backbone_ckpt == str(tmp_path / "w.pth")
        assert sp.overrides == {"image_size": EFFNET_SETTING["image_size"]} and sp.iterations == 200
    assert specs[0][2].per_class and not specs[5][2].per_class
    assert specs[0][2].metrics[0] == "auc" and specs[5][2].metrics[0] == "dice"


def test_resumability_check_accepts_a_stamp_written_before_a_field_was_added(tmp_path):
    """A work folder stamped before StudySpec gained ``inits`` is the same study (its default), not another."""
    import json
    from dataclasses import asdict

    from tpp_monai.study import StudySpec, check_resumable

    spec = StudySpec(bundle="b", dataset_dir="d", datalist="l", work=str(tmp_path))
    old = asdict(spec)
    old.pop("inits")
    (tmp_path / "spec.json").write_text(json.dumps(old))
    check_resumable(spec)  # no error
    other = StudySpec(bundle="b", dataset_dir="d", datalist="l", work=str(tmp_path), inits=("random",))
    with pytest.raises(ValueError, match="inits"):
        check_resumable(other)


def test_write_volume_datalist_keeps_the_volumes_and_makes_paths_absolute(tmp_path):
    """Version 3's task is version 2's datalist restricted to the MRI volumes, written beside the runs."""
    from tpp_monai.study import write_volume_datalist

    src = tmp_path / "cache" / "dl.json"
    src.parent.mkdir()
    src.write_text(json.dumps({
        "training": [{"image": "crops/a.png", "label": 1, "volume": "brain1"},
                     {"image": "crops/b.png", "label": 0, "volume": "lung2"}],
        "test": [{"image": "/abs/c.png", "label": 0, "volume": "brain2"}]}))
    out = write_volume_datalist(src, tmp_path / "work" / "dl_brain.json", ("brain1", "brain2"))
    d = json.loads(out.read_text())
    assert d["training"] == [{"image": str(src.parent.resolve() / "crops/a.png"), "label": 1, "volume": "brain1"}]
    assert d["test"] == [{"image": "/abs/c.png", "label": 0, "volume": "brain2"}]
    with pytest.raises(ValueError, match="no training entry of the volumes"):
        write_volume_datalist(src, tmp_path / "x.json", ("breast1",))


def test_tumour_crops_seg_setting_follows_its_protocol(tmp_path):
    """Version 4 (docs/results/study_tumour_crops_seg_v4_mri/PROTOCOL.md): the brain-MRI crops' tumour masks, the
    demo's segmentation bundle (MAE decoder trained in TPP), the paper's 1000 / 40 TPP epochs, counts 4, 1, 2, five
    seeds, Dice then HD95; the same cached upstream backbone as version 3's classification study."""
    from tpp_monai.study import tumour_crops_setting, tumour_crops_spec

    cache = tmp_path / "cache"
    cache.mkdir()
    entry = lambda v, i: {"image": f"crops/{v}_{i}.png", "label": f"crops/{v}_{i}_seg.png", "volume": v}  # noqa: E731
    lists = {"training": [entry("lung2", 0)] + [entry("brain1", i) for i in range(7)],
             "test": [entry("brain2", 0), entry("lung1", 0)]}
    for name in ("datalist_tumour_crops.json", "datalist_tumour_crops_cls.json"):
        (cache / name).write_text(json.dumps(lists))
    seg = tumour_crops_spec(ROOT, cache, tmp_path / "pool", tmp_path / "work", task="seg")
    cls = tumour_crops_spec(ROOT, cache, tmp_path / "pool", tmp_path / "work")
    assert Path(seg.bundle) == ROOT / "bundles/demo_ct_adapter_tpp" and Path(cls.bundle).name == "mhist_adapter_tpp"
    assert seg.metrics == ("dice", "hd95") and not seg.per_class and seg.counts == (4, 1, 2)
    assert seg.seeds == (0, 1, 2, 3, 4) and seg.tpp_epochs == 1000 and seg.tpp_warmup_epochs == 40
    assert seg.iterations == 300 and seg.lr == 1e-3 and seg.overrides["class_names"] == ["background", "tumour"]
    assert seg.upstream_dir == cls.upstream_dir and seg.upstream_settings() == cls.upstream_settings()
    d = json.loads(Path(seg.datalist).read_text())
    assert {e["volume"] for e in d["training"]} == {"brain1"} and len(d["training"]) == 7
    assert [e["volume"] for e in d["test"]] == ["brain2"]
    tpp = json.loads((Path(seg.bundle) / "configs" / "tpp_pretrain.json").read_text())
    assert tpp["decoder_mode"] == "inherit_trainable"  # the paper's segmentation TPP (Table 11)
    assert tumour_crops_setting(True, "seg")["metrics"] == ("dice", "hd95")
    with pytest.raises(ValueError, match="unknown tumour-crop task"):
        tumour_crops_setting(task="det")
