"""The 2D MONAI bundles: configs parse, network_def builds, metadata follows the spec, MONAI's own
verify_net_in_out / ckpt_export (TorchScript, traced) pass, and a few-iteration CPU run of
tpp_pretrain -> train -> evaluate -> inference works for one classification and one segmentation bundle.

Tiny overrides everywhere (ViT-Tiny, depth 2, 32 px); random backbones (no checkpoint download).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_prepare import MHIST_HEADER, _csv, _img  # noqa: E402  (fake official-layout builders)

#: the 2D CNN bundles (EfficientNet-Lite0 encoder, tests/test_bundles_effnet.py runs their stages)
CNN = {"effnet_seg": "tumour_crops_effnet_convadapter_tpp", "effnet_cls": "tumour_crops_cls_effnet_convadapter_tpp"}
BUNDLES = ["mhist", "oct_c8", "chestxray_pa", "glas", "qata", "demo_ct", *CNN]
SEG = {"glas", "qata", "demo_ct", "effnet_seg"}
NUM_CLASSES = {"mhist": 2, "oct_c8": 8, "chestxray_pa": 3, "glas": 2, "qata": 2, "demo_ct": 3, "effnet_seg": 2,
               "effnet_cls": 2}
TINY = {"vit_size": "tiny", "vit_overrides": {"depth": 2}, "image_size": 32, "backbone_ckpt": "", "tpp_ckpt": "",
        "num_workers": 0}
SPEC_FIELDS = ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
               "required_packages_version", "task", "description", "authors", "copyright", "network_data_format",
               "intended_use", "data_source", "references")


def folder(bundle: str) -> str:
    return CNN.get(bundle, f"{bundle}_adapter_tpp")


def cfg(bundle: str, name: str) -> str:
    return f"bundles/{folder(bundle)}/configs/{name}"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # bundle_root resolves to bundles/<name> from the repository root
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")


def parser_for(bundle: str, *files: str, **overrides):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([cfg(bundle, f) for f in (files or ("train.json",))])
    p.read_meta(cfg(bundle, "metadata.json"))
    for k, v in {**TINY, **overrides}.items():
        p[k] = v
    return p


@pytest.mark.parametrize("bundle", BUNDLES)
def test_configs_parse_and_network_def(bundle, tmp_path):
    files = ["train.json", "tpp_pretrain.json", "evaluate.json", "inference.json", "multi_gpu_train.json"]
    for f in files:
        assert (ROOT / cfg(bundle, f)).is_file(), f
    assert (ROOT / f"bundles/{folder(bundle)}/docs/README.md").is_file()
    for extra in (None, "tpp_pretrain.json", "evaluate.json", "inference.json", "multi_gpu_train.json"):
        p = parser_for(bundle, *(["train.json"] + ([extra] if extra else [])), bundle_root=str(tmp_path))
        p.parse()
        for key in ("network_def", "device", "dataset_dir", "bundle_root", "ckpt_dir", "initialize", "run", "finalize"):
            assert key in p, (extra, key)
    p = parser_for(bundle, bundle_root=str(tmp_path))
    net = p.get_parsed_content("network_def").eval()
    with torch.no_grad():
        y = net(torch.rand(2, 3, 32, 32))
    k = NUM_CLASSES[bundle]
    assert y.shape == ((2, k, 32, 32) if bundle in SEG else (2, k))
    # generated, self-contained: the shared snippet is copied in (scripts/generate_bundles.py), the
    # hyper-parameters are the bundle's own
    raw = json.loads((ROOT / cfg(bundle, "train.json")).read_text())
    if bundle in CNN:  # the bundle's own network (FlexibleUNet / pool + linear around the EfficientNet encoder)
        common = json.loads((ROOT / f"bundles/common/specs/{folder(bundle)}.json").read_text())["values"]
    else:
        common = json.loads((ROOT / f"bundles/common/{'seg' if bundle in SEG else 'cls'}.json").read_text())
    assert raw["network_def"] == common["network_def"]
    # engines and shared handlers come from supervised.json as nested dicts; train/validate#handlers stay literal
    # (empty) lists so that MONAI's --tracking can append its handlers (tests/test_mlflow_tracking.py)
    supervised = json.loads((ROOT / "bundles/common/supervised.json").read_text())
    assert raw["train"]["trainer"] == supervised["train"]["trainer"]
    assert raw["train"]["handlers"] == [] and raw["validate"]["handlers"] == []
    assert p["peft_method"] == ("conv_adapter" if bundle in CNN else "adapter")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_postprocessing_writes_masks_with_monai_saveimaged(bundle, tmp_path):
    """Model-zoo shape: segmentation masks are written by a MONAI ``SaveImaged`` at the end of the standalone
    inference.json's postprocessing (after argmax), into --infer_dir; classification keeps predictions.csv."""
    from monai.transforms import AsDiscreted, SaveImaged

    from tpp_monai.bundle import PredictionWriter

    p = parser_for(bundle, "inference.json", infer_dir=str(tmp_path / "out"), mask_ext=".nii.gz")
    steps = p.get_parsed_content("postprocessing").transforms
    savers = [t for t in steps if isinstance(t, SaveImaged)]
    writers = [h for h in p.get_parsed_content("handlers") if isinstance(h, PredictionWriter)]
    if bundle in SEG:
        assert len(savers) == 1 and steps[-1] is savers[0] and not writers
        assert any(isinstance(t, AsDiscreted) for t in steps[: steps.index(savers[0])])
        assert savers[0].saver.folder_layout.output_dir == str(tmp_path / "out")
        assert savers[0].saver.output_ext == ".nii.gz"
    else:
        assert not savers and len(writers) == 1 and writers[0].output_dir == tmp_path / "out"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_spec_fields(bundle):
    meta = json.loads((ROOT / cfg(bundle, "metadata.json")).read_text())
    for f in SPEC_FIELDS:
        assert f in meta, f
    assert meta["monai_version"] == "1.6.1" and meta["pytorch_version"] == "2.14.1"
    assert any("Target Parameter Pre-training" in r for r in meta["references"])
    inp = meta["network_data_format"]["inputs"]["image"]
    for f in ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
              "channel_def"):
        assert f in inp, f
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == NUM_CLASSES[bundle]
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out_and_torchscript_export(bundle, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    over = {**TINY, "bundle_root": str(tmp_path)}
    verify_net_in_out(net_id="network_def", meta_file=cfg(bundle, "metadata.json"),
                      config_file=cfg(bundle, "train.json"), device="cpu", **over)
    net = parser_for(bundle, bundle_root=str(tmp_path)).get_parsed_content("network_def").eval()
    with torch.no_grad():  # non-trivial target parameters so the export must carry them
        for n, prm in net.named_parameters():
            if "peft_" in n:
                prm.normal_(0, 0.02)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    # PEFT forward hooks cannot be scripted: export by tracing (use_trace + input_shape)
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt), meta_file=cfg(bundle, "metadata.json"),
                config_file=cfg(bundle, "train.json"), use_trace=True, input_shape=[1, 3, 32, 32], **over)
    loaded = torch.jit.load(str(ts))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


# ------------------------------------------------------------------------------------- tiny data
def make_mhist(root: Path) -> Path:
    from tpp_monai.data.datalist import prepare_mhist, write_datalist

    raw, rows = root / "mhist_raw", []
    for lab in ("HP", "SSA"):
        for part, n in (("train", 5), ("test", 2)):
            for i in range(n):
                name = f"MHIST_{lab}_{part}_{i:03d}.png"
                _img(raw / "images" / name, (30 * i + (120 if lab == "SSA" else 0)) % 250, size=(40, 40))
                rows.append([name, lab, 6 if lab == "SSA" else 1, part])
    _csv(raw / "annotations.csv", MHIST_HEADER, rows)
    write_datalist(root / "mhist" / "datalist.json", prepare_mhist(raw), verbose=False)
    return root / "mhist"


def make_qata(root: Path) -> Path:
    from tpp_monai.data.datalist import prepare_qata, write_datalist

    base = root / "qata_raw" / "QaTa-COV19-v2"
    for split, n in (("Train Set", 10), ("Test Set", 3)):
        for i in range(n):
            name = f"sub-S{i:03d}_{split[:2]}.png"
            _img(base / split / "Images" / name, 20 * i, mode="L", size=(48, 48))
            mask = np.zeros((48, 48), np.uint8)
            mask[8:20 + i, 10:30] = 255
            Image.fromarray(mask).save(_img(base / split / "Ground-truths" / f"mask_{name}", mode="L"))
    write_datalist(root / "qata" / "datalist.json", prepare_qata(base.parent), verbose=False)
    return root / "qata"


def run_stage(bundle: str, extra: str | None, **over):
    from monai.bundle import run

    files = [cfg(bundle, "train.json")] + ([cfg(bundle, extra)] if extra else [])
    run(config_file=files, meta_file=cfg(bundle, "metadata.json"), **{**TINY, **over})


@pytest.mark.parametrize("bundle,maker", [("mhist", make_mhist), ("qata", make_qata)])
def test_pipeline_tpp_train_evaluate_inference(bundle, maker, tmp_path, capsys):
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint
    from tpp_monai.peft.api import target_state_dict

    data = maker(tmp_path)
    work = tmp_path / "work"
    over = dict(dataset_dir=str(data), bundle_root=str(work), batch_size=4)
    tpp_ckpt = str(work / "models" / "tpp_target_params.pt")
    # stage 2: TPP (MAE), 2 iterations
    run_stage(bundle, "tpp_pretrain.json", **over, tpp_epochs=1, tpp_epoch_length=2, tpp_batch_size=4)
    assert Path(tpp_ckpt).is_file()
    from tpp_monai.engines.tpp_report import read_report

    report = read_report(Path(tpp_ckpt).parent / "tpp_report.json")  # the TPP learning report, next to the file
    assert report["steps"] == report["total_steps"] == 2 and report["pretext"] == "mae" and report["complete"]
    assert report["targets"] and all(k.startswith("adapter.") for k in report["targets"])
    saved = read_target_checkpoint(tpp_ckpt)["state_dict"]
    assert saved and all("peft_" in k for k in saved)
    # stage 3 loads exactly those values into the network (before training)
    net = parser_for(bundle, **over, tpp_ckpt=tpp_ckpt).get_parsed_content("network")
    here = target_state_dict(net.backbone)
    assert set(here) == set(saved) and all(torch.equal(here[k].cpu(), saved[k]) for k in saved)
    fresh = parser_for(bundle, **over, tpp_ckpt="").get_parsed_content("network")
    assert not all(torch.equal(target_state_dict(fresh.backbone)[k].cpu(), saved[k]) for k in saved)
    # stage 3: 2 iterations of fine-tuning with the TPP checkpoint
    run_stage(bundle, None, **over, tpp_ckpt=tpp_ckpt, num_iterations=2)
    assert (work / "models" / "model.pt").is_file()
    assert (work / "logs" / "train_log.jsonl").is_file()
    # evaluation prints and writes metrics
    capsys.readouterr()
    run_stage(bundle, "evaluate.json", **over)
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    keys = {"dice", "hd95"} if bundle == "qata" else {"acc", "auc", "f1"}
    assert set(metrics) == keys and all(np.isfinite(v) for v in metrics.values())
    assert "metrics:" in capsys.readouterr().out
    # inference writes files
    run_stage(bundle, "inference.json", **over)
    pred = work / "predictions"
    if bundle == "qata":
        masks = sorted(pred.glob("*_seg.png"))
        assert len(masks) == 3
        m = np.asarray(Image.open(masks[0]))
        assert m.shape == (48, 48) and set(np.unique(m)) <= {0, 1}  # at the input's size (model runs at 32)
    else:
        rows = (pred / "predictions.csv").read_text().splitlines()
        assert rows[0] == "path,pred,prob_0,prob_1" and len(rows) == 5
        probs = [float(x) for x in rows[1].split(",")[2:]]
        assert abs(sum(probs) - 1) < 1e-4


def test_missing_tpp_checkpoint_is_a_clear_error(tmp_path):
    from tpp_monai.bundle import TPPCheckpointMissing

    p = parser_for("mhist", bundle_root=str(tmp_path), tpp_ckpt=str(tmp_path / "nope.pt"))
    with pytest.raises(Exception) as ei:
        p.get_parsed_content("network")
    chain, e = [], ei.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    err = next((c for c in chain if isinstance(c, TPPCheckpointMissing)), None)
    assert err is not None, chain
    msg = str(err)
    assert "nope.pt" in msg and "tpp_pretrain.json" in msg and '--tpp_ckpt ""' in msg
