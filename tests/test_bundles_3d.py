"""3D bundles (LiTS / KiTS, nnU-Net path): configs parse, metadata has the bundle-spec fields, the runner builds
the right nnU-Net commands and environments. The real nnU-Net run is tests/test_nnunet_trainer.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"lits_convadapter_tpp": (501, "LiTS", "liver"), "kits_convadapter_tpp": (502, "KiTS", "kidney")}
STAGES = {"tpp_pretrain": ["plan", "tpp"], "train": ["plan", "train"], "evaluate": ["evaluate"], "inference": ["predict"]}
SPEC_FIELDS = ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
               "required_packages_version", "task", "description", "authors", "copyright", "network_data_format",
               "intended_use", "data_source", "references")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # bundle macros are paths relative to the repository root
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))


def _parse(bundle, stage, **settings):
    p = ConfigParser()
    p.read_config(str(REPO / "bundles" / bundle / "configs" / f"{stage}.json"))
    for k, v in settings.items():
        p[f"settings::{k}"] = v
    p.parse()
    return p


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_spec_fields(bundle):
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    assert all(f in meta for f in SPEC_FIELDS), [f for f in SPEC_FIELDS if f not in meta]
    assert meta["monai_version"] == "1.6.1" and meta["pytorch_version"] == "2.14.1"
    assert meta["version"] in meta["changelog"] and meta["schema"].startswith("https://")
    assert meta["required_packages_version"]["nnunetv2"] == "2.8.1"
    refs = " ".join(meta["references"])
    assert "Target Parameter Pre-training" in refs and "STU-Net" in refs
    organ = BUNDLES[bundle][2]
    out = meta["network_data_format"]["outputs"]["pred"]
    assert out["channel_def"] == {"0": "background", "1": organ, "2": "tumour"} and out["num_channels"] == 3
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "CT"
    assert (REPO / "bundles" / bundle / "docs" / "README.md").is_file()


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("stage", STAGES)
def test_configs_parse_and_build_commands(bundle, stage, tmp_path):
    did, name, _ = BUNDLES[bundle]
    p = _parse(bundle, stage, device="cpu", dry_run=True, fold=2, pretrained_weights="small_ep4k.model",
               allow_pickle=True)
    runner = p.get_parsed_content("runner")
    assert runner.dataset_id == did and runner.dataset_name == name and runner.fold == 2
    assert runner.nnunet_raw == str(tmp_path / "raw")  # $nnUNet_raw wins over the default
    assert runner.nnunet_results == str(REPO / "data" / "nnUNet_results")  # defaults: absolute, under the repo
    assert runner.raw_dataset_dir == tmp_path / "raw" / f"Dataset{did}_{name}"
    cmds = runner.commands(STAGES[stage])
    assert [c[0] for c in cmds] == STAGES[stage]
    ran = p.get_parsed_content("run")  # dry run: prints, runs nothing
    assert list(ran) == STAGES[stage]
    for s, cmd, env in cmds:
        if s == "evaluate":
            assert cmd is None
            continue
        assert env["nnUNet_raw"] == str(tmp_path / "raw")
        assert env["nnUNet_extTrainer"].split(os.pathsep)[0] == str(REPO / "tpp_monai" / "nnunet")
        assert env["TPP_NNUNET_ALLOW_PICKLE"] == "1"
        assert not [k for k in env if k.startswith("TPP_NNUNET_") and k != "TPP_NNUNET_ALLOW_PICKLE"]
        if s == "plan":
            assert Path(cmd[0]).name == "nnUNetv2_plan_and_preprocess"
            assert cmd[1:] == ["-d", str(did), "-c", "3d_fullres", "-np", "4", "--verify_dataset_integrity"]
        elif s in ("tpp", "train"):  # settings are trainer variants: the TPP-only stage has its own results folder
            tr = "nnUNetTrainer_STUNet_TPPonly_ConvAdapter" if s == "tpp" else "nnUNetTrainer_STUNet_TPP_ConvAdapter"
            assert cmd[:4] == [sys.executable, "-m", "tpp_monai.cli", "nnunet-train"]
            assert cmd[4:] == [str(did), "3d_fullres", "2", "-tr", tr, "-p",
                               "nnUNetPlans", "-device", "cpu", "-pretrained_weights", "small_ep4k.model"]
        else:
            assert cmd[3] == "nnunet-predict"
            args = dict(zip(cmd[4::2], cmd[5::2]))
            assert args["-i"] == str(tmp_path / "raw" / f"Dataset{did}_{name}" / "imagesTs")
            assert args["-o"] == str(runner.fold_dir / "predictions") and args["-d"] == str(did)
            assert args["-tr"] == "nnUNetTrainer_STUNet_TPP_ConvAdapter" and args["-f"] == "2"


def test_bundles_share_everything_but_the_dataset():
    a, b = (REPO / "bundles" / "lits_convadapter_tpp" / "configs", REPO / "bundles" / "kits_convadapter_tpp" / "configs")
    for stage in STAGES:
        ta, tb = json.loads((a / f"{stage}.json").read_text()), json.loads((b / f"{stage}.json").read_text())
        assert {k: v for k, v in ta.items() if k not in ("dataset", "bundle_root")} == {
            k: v for k, v in tb.items() if k not in ("dataset", "bundle_root")}
        common = json.loads((REPO / "bundles" / "common" / "nnunet_tpp.json").read_text())
        assert {k: ta[k] for k in ("imports", "defaults", "runner", "network_defaults", "network_def")} == {
            k: common[k] for k in ("imports", "defaults", "runner", "network_defaults", "network_def")}
        recipe = json.loads((REPO / "bundles" / "common" / "recipes.json").read_text())["3d_nnunet"][f"{stage}.json"]
        assert ta["run"] == next(part["run"] for part in recipe if isinstance(part, dict))  # the stage's one own id
        assert ta["settings"] == {} and ta["network"] == {}  # command-line override slots


def test_runner_options_and_errors(tmp_path):
    from tpp_monai.nnunet.runner import NnUNetTPPRunner

    r = NnUNetTPPRunner(7, "Demo", tmp_path / "raw", tmp_path / "pre", tmp_path / "res", trainer="nnUNetTrainer_STUNet_FT",
                        continue_training=True, disable_tta=True, predict_input="in", predict_output="out")
    env = r.env(base={"nnUNet_extTrainer": "/other"})
    assert env["nnUNet_extTrainer"] == os.pathsep.join([str(REPO / "tpp_monai" / "nnunet"), "/other"])
    assert "TPP_NNUNET_ALLOW_PICKLE" not in env
    assert r.train_cmd()[-1] == "--c" and "-pretrained_weights" not in r.train_cmd()
    assert r.predict_cmd()[-1] == "--disable_tta" and r.predict_cmd()[5:8] == ["in", "-o", "out"]
    assert r.fold_dir == tmp_path / "res" / "Dataset007_Demo" / "nnUNetTrainer_STUNet_FT__nnUNetPlans__3d_fullres" / "fold_0"
    with pytest.raises(ValueError, match="needs a TPP trainer"):
        r.commands(["tpp"])
    with pytest.raises(ValueError, match="unknown stage"):
        r.commands(["plan", "fit"])
    with pytest.raises(ValueError, match="1..999"):
        NnUNetTPPRunner(1000, "X", "a", "b", "c")
    assert [s for s, *_ in r.commands(["evaluate", "plan", "train"])] == ["plan", "train", "evaluate"]  # run order
    with pytest.raises(TypeError):
        NnUNetTPPRunner(7, "Demo", "a", "b", "c", trainer_env={"TPP_NNUNET_LR": 1})  # settings are trainer variants now
    dec = NnUNetTPPRunner(7, "Demo", tmp_path / "raw", tmp_path / "pre", tmp_path / "res",
                          trainer="nnUNetTrainer_STUNet_TPP_ConvAdapterDec_large")
    assert dec.tpp_trainer == "nnUNetTrainer_STUNet_TPPonly_ConvAdapter_large"  # the decoder does not change TPP
    assert dec.tpp_file == (tmp_path / "res" / "Dataset007_Demo" / "nnUNetTrainer_STUNet_TPPonly_ConvAdapter_large__"
                            "nnUNetPlans__3d_fullres" / "fold_0" / "tpp_target_params.pt")


def _lits_case(r, labels, ref, pred, name="lits_0000"):
    import SimpleITK as sitk

    (r.raw_dataset_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    (r.fold_dir / "validation").mkdir(parents=True, exist_ok=True)
    (r.raw_dataset_dir / "dataset.json").write_text(json.dumps(
        {"labels": labels, "file_ending": ".nii.gz", "numTraining": 1, "channel_names": {"0": "CT"}}))
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(r.raw_dataset_dir / "labelsTr" / f"{name}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(pred), str(r.fold_dir / "validation" / f"{name}.nii.gz"))


def test_evaluate_stage_dice(tmp_path):
    """evaluate: nnU-Net's compute_metrics_on_folder on <fold>/validation against labelsTr; our mean Dice is
    nnU-Net's summary.json value (foreground_mean), per-label means are its per-label means."""
    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    from tpp_monai.nnunet.runner import NnUNetTPPRunner

    r = NnUNetTPPRunner(501, "LiTS", tmp_path / "raw", tmp_path / "pre", tmp_path / "res", device="cpu",
                        num_processes=1)
    labels = {"background": 0, "liver": 1, "tumour": 2}
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[0, :2] = 1  # 8 liver voxels
    ref[3, 0, :2] = 2  # 2 tumour voxels
    pred = ref.copy()
    pred[0, 0] = 0  # 4 liver voxels found
    _lits_case(r, labels, ref, pred, "lits_0000")
    ref2 = np.zeros((4, 4, 4), np.uint8)
    ref2[1] = 1  # 16 liver voxels, no tumour in either image (nnU-Net: NaN, skipped)
    pred2 = ref2.copy()
    pred2[1, 0] = 0  # 12 found
    _lits_case(r, labels, ref2, pred2, "lits_0001")
    s = r.run(["evaluate"])["evaluate"]
    liver = (2 * 4 / 12 + 2 * 12 / 28) / 2
    assert s["per_label"] == {"liver": pytest.approx(liver), "tumour": 1.0}
    assert s["mean_dice"] == pytest.approx((liver + 1) / 2) and s["n_cases"] == 2
    assert s["per_case"]["lits_0001.nii.gz"] == {"liver": pytest.approx(24 / 28)}  # tumour absent: skipped
    nn = load_summary_json(str(r.fold_dir / "nnunet_summary.json"))  # nnU-Net's own file, read its own way
    assert s["mean_dice"] == nn["foreground_mean"]["Dice"]
    assert s["per_label"] == {"liver": nn["mean"][1]["Dice"], "tumour": nn["mean"][2]["Dice"]}
    assert json.loads((r.fold_dir / "dice_summary.json").read_text())["mean_dice"] == s["mean_dice"]


def test_evaluate_honours_nnunet_ignore_label(tmp_path):
    """A dataset with nnU-Net's 'ignore' label: ignored voxels count nowhere and 'ignore' is no class (the old
    Dice re-implementation reported an 'ignore' Dice and counted ignored voxels as false positives)."""
    import numpy as np

    from tpp_monai.nnunet.runner import NnUNetTPPRunner

    r = NnUNetTPPRunner(501, "LiTS", tmp_path / "raw", tmp_path / "pre", tmp_path / "res", num_processes=1)
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[0, :2] = 1  # 8 liver voxels
    ref[2] = 3  # 16 ignored voxels
    pred = ref.copy()
    pred[2] = 1  # liver predicted where the reference is ignored: must not count
    _lits_case(r, {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}, ref, pred)
    s = r.evaluate()
    assert set(s["per_label"]) == {"liver", "tumour"}
    assert s["per_label"]["liver"] == 1.0 and s["per_label"]["tumour"] is None and s["mean_dice"] is None


def test_dice_script_calls_nnunet(tmp_path):
    """scripts/nnunet_dice_summary.py (kept for the README commands) reports nnU-Net's numbers; clear errors."""
    import numpy as np

    from tpp_monai.nnunet.runner import NnUNetTPPRunner

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import nnunet_dice_summary as script
    finally:
        sys.path.pop(0)
    r = NnUNetTPPRunner(501, "LiTS", tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[0] = 1
    ref[1, 0] = 2
    pred = ref.copy()
    pred[1, 0, :2] = 0  # tumour 2 of 4
    _lits_case(r, {"background": 0, "liver": 1, "tumour": 2}, ref, pred)
    out = tmp_path / "eval" / "dice.json"
    args = ["--pred", str(r.fold_dir / "validation"), "--ref", str(r.raw_dataset_dir / "labelsTr"),
            "--dataset-json", str(r.raw_dataset_dir / "dataset.json")]
    assert script.main(args + ["--out", str(out)]) == 0
    s = json.loads(out.read_text())
    nn = json.loads((tmp_path / "eval" / "nnunet_summary.json").read_text())
    assert s["per_label"] == {"liver": 1.0, "tumour": pytest.approx(4 / 6)} and s["mean_dice"] == nn["foreground_mean"]["Dice"]
    (r.raw_dataset_dir / "labelsTr" / "lits_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lits_0000.nii.gz .*labelsTr"):
        script.main(args)
    with pytest.raises(FileNotFoundError, match="no \\*.nii.gz predictions"):
        script.main(["--pred", str(tmp_path / "none")] + args[2:])


def test_monai_bundle_cli_dry_run():
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                        "bundles/kits_convadapter_tpp/configs/tpp_pretrain.json", "--meta_file",
                        "bundles/kits_convadapter_tpp/configs/metadata.json", "--settings::dry_run", "true",
                        "--settings::device", "cpu"], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stage plan:" in r.stdout and "nnUNetv2_plan_and_preprocess -d 502" in r.stdout
    assert "stage tpp:" in r.stdout and "-tr nnUNetTrainer_STUNet_TPPonly_ConvAdapter " in r.stdout
    assert "TPP_NNUNET_TPP_ONLY" not in r.stdout


# ---------------------------------------------------------------- network_def (MONAI's verify_net_in_out)
TINY_NET = ["--network::stunet_size", "small", "--network::patch_size", "[32,32,32]"]


def test_pool_op_kernel_sizes_for_patch():
    from tpp_monai.nnunet.bundle import pool_op_kernel_sizes_for_patch as pools

    assert pools([128, 128, 128]) == [[1, 1, 1]] + [[2, 2, 2]] * 5  # STU-Net's official strides
    assert pools([32, 32, 32]) == [[1, 1, 1]] + [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2  # the _debug trainers' plan
    assert pools([16, 64, 64]) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 1, 1]]  # 16 -> 4, 64 -> 4
    with pytest.raises(ValueError, match="positive"):
        pools([0, 32, 32])


@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_def_is_the_trainers_network(bundle):
    """network_def = what the nnU-Net trainer builds (same keys, same trainable set), sizes from bundle keys."""
    from tpp_monai.nnunet import trainers as T

    p = ConfigParser()
    p.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    assert p["network_defaults"] == json.loads((REPO / "bundles/common/nnunet_tpp.json").read_text())["network_defaults"]
    p["network"] = {"stunet_size": "small", "patch_size": [32, 32, 32]}
    net = p.get_parsed_content("network_def")
    ref = T.nnUNetTrainer_STUNet_ConvAdapter_small.build_network_architecture(
        None, {"pool_op_kernel_sizes": [[1, 1, 1]] + [[2, 2, 2]] * 3}, 1, 3, False)
    assert net.cfg == ref.cfg and net.cfg.size == "small" and net.cfg.dims[0] == 16
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert {n for n, q in net.named_parameters() if q.requires_grad} == {
        n for n, q in ref.named_parameters() if q.requires_grad}
    assert sum("peft_conv_adapter" in k for k in net.state_dict()) > 0 and not net.decoder.deep_supervision
    base = ConfigParser()
    base.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    assert base.get_parsed_content("network_defaults")["stunet_size"] == "base"  # default size
    with pytest.raises(ValueError, match="builds STU-Net-small"):
        from tpp_monai.nnunet.bundle import stunet_convadapter_network

        stunet_convadapter_network("base", trainer="nnUNetTrainer_STUNet_ConvAdapter_small")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out(bundle):
    """MONAI's own check with metadata's declared shapes (64*n, n=1) on the tiny variant, and it can fail (the
    default STU-Net-B: tests/test_zoo_ci.py, the zoo's full mode)."""
    from monai.bundle import verify_net_in_out

    b = REPO / "bundles" / bundle / "configs"
    tiny = {"network::stunet_size": "small", "network::patch_size": [32, 32, 32]}
    verify_net_in_out("network_def", meta_file=str(b / "metadata.json"), config_file=str(b / "inference.json"),
                      device="cpu", **tiny)
    with pytest.raises(ValueError, match="output channel number `3` doesn't match: `4`"):
        verify_net_in_out("network_def", meta_file=str(b / "metadata.json"), config_file=str(b / "inference.json"),
                          device="cpu", **tiny, **{"_meta_::network_data_format::outputs::pred::num_channels": 4})


def test_verify_net_in_out_cli():
    """The command line a user types (README), once."""
    b = "bundles/lits_convadapter_tpp/configs"
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
                        f"{b}/metadata.json", "--config_file", f"{b}/inference.json", "--device", "cpu",
                        "--network::stunet_size", "small", "--network::patch_size", "[32,32,32]"],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data shape of network is verified with no error" in r.stdout + r.stderr


def _fabricated_fold(r, trainer_cls, size=24):
    """A fold folder as nnU-Net's trainer leaves it (dataset.json, plans.json, checkpoint_final.pth), with a
    random-initialised network: enough for nnU-Net's predictor, no training (the real run is test_nnunet_trainer)."""
    import torch

    pools = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [size] * 3, "median_image_size_in_voxels": [size] * 3, "spacing": [1.0, 1.0, 1.0],
           "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
           "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
           "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
           "architecture": {"network_class_name": "STUNet", "arch_kwargs": {"strides": pools}, "_kw_requires_import": []},
           "batch_dice": False}
    plans = {"dataset_name": r.dataset_folder_name, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp":
             [1.0, 1.0, 1.0], "original_median_shape_after_transp": [size] * 3, "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": cfg},
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {"max": 500.0, "mean": 10.0, "median": 0.0,
                                                                   "min": -500.0, "percentile_00_5": -400.0,
                                                                   "percentile_99_5": 400.0, "std": 200.0}}}
    ds = {"labels": {"background": 0, "liver": 1, "tumour": 2}, "file_ending": ".nii.gz", "numTraining": 1,
          "channel_names": {"0": "CT"}}
    r.fold_dir.mkdir(parents=True)
    (r.fold_dir.parent / "plans.json").write_text(json.dumps(plans))
    (r.fold_dir.parent / "dataset.json").write_text(json.dumps(ds))
    torch.manual_seed(0)
    net = trainer_cls.build_network_architecture(None, {"pool_op_kernel_sizes": pools}, 1, 3, True)
    for m in net.modules():  # the Conv-Adapter starts as identity; move it so the test sees it run
        if hasattr(m, "alpha"):
            torch.nn.init.normal_(m.alpha)
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer_cls.__name__,
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               r.fold_dir / "checkpoint_final.pth")
    return net, plans["foreground_intensity_properties_per_channel"]["0"]


def test_inference_stage_runs_nnunet_predictor(tmp_path):
    """inference.json: nnU-Net's nnUNetPredictor with the fold's checkpoint writes NIfTI masks; they equal the
    argmax of network_def's forward (weights from the checkpoint) on nnU-Net's CT normalisation of the volume."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from tpp_monai.nnunet import trainers as T

    tr = "nnUNetTrainer_STUNet_TPP_ConvAdapter_debug"  # small STU-Net
    src, dst = tmp_path / "images", tmp_path / "masks"
    p = _parse("lits_convadapter_tpp", "inference", device="cpu", trainer=tr, num_processes=1,
               nnunet_results=str(tmp_path / "res"), predict_input=str(src), predict_output=str(dst))
    r = p.get_parsed_content("runner")
    with pytest.raises(FileNotFoundError, match="checkpoint_final.pth not found: run the train stage"):
        r.predict()
    net, props = _fabricated_fold(r, getattr(T, tr))
    rng = np.random.default_rng(0)
    img = rng.uniform(-600, 600, (24, 24, 24)).astype(np.float32)
    img[6:18, 6:18, 6:18] += 300.0
    src.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(img), str(src / "case_000_0000.nii.gz"))
    out = p.get_parsed_content("run")["predict"]
    assert [f.name for f in out] == ["case_000.nii.gz"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out[0])))
    # expected: network_def (no deep supervision) with the checkpoint's weights on clip -> z-score (CTNormalization)
    p["network"] = {"stunet_size": "small", "patch_size": [24, 24, 24]}
    ref_net = p.get_parsed_content("network_def").eval()
    ref_net.load_state_dict(torch.load(r.fold_dir / "checkpoint_final.pth", weights_only=False)["network_weights"])
    x = (np.clip(img, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
    with torch.no_grad():
        logits = ref_net(torch.from_numpy(x.astype(np.float32))[None, None])
    expected = logits.argmax(1)[0].numpy()
    assert mask.shape == (24, 24, 24) and len(np.unique(expected)) > 1
    # nnU-Net accumulates Gaussian-weighted logits in float16: near the tile border the weights (~1e-7) lose
    # precision, so a few border voxels differ (measured 99.0 % agreement overall); the centre agrees exactly
    c = slice(6, 18)
    assert np.array_equal(mask[c, c, c], expected[c, c, c]) and (mask == expected).mean() > 0.97
    with pytest.raises(FileNotFoundError, match="predict_input"):
        p["settings"]["predict_input"] = str(tmp_path / "missing")
        p.get_parsed_content("runner", lazy=False).predict()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_torchscript_export_by_tracing(bundle, tmp_path):
    """The zoo's verify_torchscript with MONAI's ckpt_export: Conv-Adapters are forward hooks, which
    TorchScript cannot script, so the export traces; the traced STU-Net accepts other 32*n sizes than the
    trace size (the tiny variant's 32*n; metadata declares 64*n for STU-Net-B) and equals the eager network."""
    from monai.bundle import ckpt_export

    b = REPO / "bundles" / bundle / "configs"
    tiny = {"network::stunet_size": "small", "network::patch_size": [32, 32, 32]}
    p = ConfigParser()
    p.read_config(str(b / "inference.json"))
    p["network"] = {"stunet_size": "small", "patch_size": [32, 32, 32]}
    net = p.get_parsed_content("network_def").eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.01 * torch.randn_like(prm))  # adapters are zero-init: make them matter
    torch.save(net.state_dict(), tmp_path / "model.pt")
    common = dict(net_id="network_def", ckpt_file=str(tmp_path / "model.pt"), meta_file=str(b / "metadata.json"),
                  config_file=str(b / "inference.json"), **tiny)
    # scripting fails on the adapter hooks (a second attempt in one process fails earlier, on TorchScript's
    # cache of the first attempt's Conv3d class)
    with pytest.raises(RuntimeError, match=r"[Hh]ook|redefine method: forward on class: .*Conv3d"):
        ckpt_export(filepath=str(tmp_path / "scripted.ts"), use_trace=False, **common)
    ckpt_export(filepath=str(tmp_path / "model.ts"), use_trace=True, input_shape=[1, 1, 32, 32, 32], **common)
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    for shape in ((32, 32, 32), (64, 32, 64)):
        x = torch.rand(1, 1, *shape)
        with torch.no_grad():
            want = net(x)
            got = ts(x)
        assert got.shape == (1, 3, *shape) and torch.allclose(got, want, atol=1e-5)
