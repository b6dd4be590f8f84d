"""No code runs from a crafted nnU-Net checkpoint, on any path that makes nnU-Net load one (issue 21, item 1).

Each test puts a payload (a pickle whose ``__reduce__`` would create a marker file) where nnU-Net will load a
checkpoint, runs the path, and asserts that the marker never appears and that the error names the file and
the opt-in. The CLI runs in this process; ``os.execve`` is replaced by running the same console script's
entry point in-process (what the exec would start), so an unguarded exec shows as a marker, not a lost pytest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset990_Safe"
CONFIG = "3d_fullres"


class Payload:
    """Stands for code a crafted checkpoint runs when unpickled: creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _plans(size: int = 16) -> dict:
    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [size] * 3, "median_image_size_in_voxels": [size] * 3, "spacing": [1.0, 1.0, 1.0],
           "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
           "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
           "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
           "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8],
                                            "conv_op": "torch.nn.modules.conv.Conv3d",
                                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1],
                                            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                            "nonlin_kwargs": {"inplace": True}},
                            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
           "batch_dice": False}
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1.0] * 3,
            "original_median_shape_after_transp": [size] * 3, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {CONFIG: cfg},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                                                                  "percentile_00_5": -1.0, "percentile_99_5": 1.0,
                                                                  "std": 1.0}}}


DATASET_JSON = {"labels": {"background": 0, "fg": 1}, "file_ending": ".nii.gz", "numTraining": 2,
                "channel_names": {"0": "CT"}}


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """nnU-Net's three folders with a (fabricated) trained fold of ``nnUNetTrainer`` and its preprocessed plans."""
    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "res"
    for var, d in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("nnUNet_compile", "0")
    for var in ("TPP_NNUNET_ALLOW_PICKLE", "nnUNet_extTrainer"):  # the CLI sets them: restored after the test
        monkeypatch.delenv(var, raising=False)
    (raw / DATASET).mkdir(parents=True)
    (raw / DATASET / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (pre / DATASET).mkdir(parents=True)
    (pre / DATASET / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    (pre / DATASET / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (pre / DATASET / "nnUNetPlans_3d_fullres").mkdir()  # the preprocessed data folder: one (empty) case file
    (pre / DATASET / "nnUNetPlans_3d_fullres" / "case_000.npz").write_bytes(b"")
    folder = res / DATASET / f"nnUNetTrainer__nnUNetPlans__{CONFIG}"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(_plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (tmp_path / "in").mkdir()
    threads = torch.get_num_threads()
    yield {"tmp": tmp_path, "fold": folder / "fold_0", "marker": tmp_path / "PWNED"}
    torch.set_num_threads(threads)  # nnU-Net's -device cpu sets the thread count


def _evil(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": {"w": torch.ones(2)}, "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": CONFIG}, "evil": Payload(marker)}, path)
    return path


def _genuine(path: Path) -> Path:
    """What nnU-Net's checkpoints hold: tensors, plain data, torch.device, numpy numbers in the logs."""
    torch.save({"network_weights": {"w": torch.ones(2)}, "logging": {"ema_fg_dice": [np.float64(0.5)]},
                "init_args": {"configuration": CONFIG, "device": torch.device("cpu")}, "_best_ema": np.float64(0.4),
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}, path)
    return path


def _exec_in_process(monkeypatch):
    """``os.execve(nnUNetv2_*)`` -> that console script's entry point here (same argv and environment)."""
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    from nnunetv2.run.run_training import run_training_entry

    entries = {"nnUNetv2_predict": predict_entry_point, "nnUNetv2_train": run_training_entry}

    def fake_execve(exe, argv, env):
        os.environ.update(env)
        monkeypatch.setattr(sys, "argv", [Path(exe).name, *argv[1:]])
        entries[Path(exe).name]()
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)


def _cli(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    from tpp_monai import cli

    _exec_in_process(monkeypatch)
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    except Exception as e:  # noqa: BLE001 - an unguarded run fails later, on the fake checkpoint's contents
        rc = f"raised {type(e).__name__}: {e}"
    return rc, capsys.readouterr().err


def _predict_args(d, *extra):
    return ["nnunet-predict", "-i", str(d["tmp"] / "in"), "-o", str(d["tmp"] / "out"), "-d", "990", "-c", CONFIG,
            "-tr", "nnUNetTrainer", *extra]


def _assert_refused(rc, err, ckpt: Path, marker: Path, opt_in: str):
    assert not marker.exists(), "code from the crafted checkpoint ran"
    assert rc == 2, (rc, err[-2000:])
    assert str(ckpt) in err and "os.system" in err and "refused" in err, err[-2000:]
    assert opt_in in err or "no opt-in" in err, err[-2000:]


@pytest.mark.parametrize("spelling", [["-device", "cpu"], ["-f", "00", "-device", "cpu"],
                                      ["-part_id", "0", "-num_parts", "1", "-device", "cpu"]],
                         ids=["device", "fold_00", "part_id"])
def test_nnunet_predict_never_unpickles_a_crafted_checkpoint(nnunet_dirs, monkeypatch, capsys, spelling):
    d = nnunet_dirs
    ckpt = _evil(d["fold"] / "checkpoint_final.pth", d["marker"])
    args = _predict_args(d, *spelling) if "-f" in spelling else _predict_args(d, "-f", "0", *spelling)
    rc, err = _cli(monkeypatch, capsys, args)
    _assert_refused(rc, err, ckpt, d["marker"], "--allow-pickle")


def test_nnunet_predict_allow_pickle_is_the_opt_in_and_genuine_checkpoints_pass(nnunet_dirs, monkeypatch):
    """A genuine nnU-Net checkpoint passes the guard; --allow-pickle loads a pickled one (trusted files only)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from tpp_monai.nnunet.safety import run_nnunet_entry

    d = nnunet_dirs
    seen = []

    def stop(self, folder, use_folds, checkpoint_name="checkpoint_final.pth"):  # what nnU-Net loads, then stop
        for f in use_folds:
            seen.append(torch.load(os.path.join(folder, f"fold_{int(f)}", checkpoint_name), weights_only=False))
        raise SystemExit(7)

    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder", stop)
    _genuine(d["fold"] / "checkpoint_final.pth")
    args = _predict_args(d, "-f", "0", "-device", "cpu")[1:]
    assert run_nnunet_entry("nnUNetv2_predict", args) == 7 and seen[-1]["_best_ema"] == 0.4
    _evil(d["fold"] / "checkpoint_final.pth", d["marker"])
    assert run_nnunet_entry("nnUNetv2_predict", args) == 2 and not d["marker"].exists()
    assert run_nnunet_entry("nnUNetv2_predict", args, allow_pickle=True) == 7 and d["marker"].exists()
    assert torch.load is not None and not getattr(torch.load, "_tpp_monai_guard", False)  # guard removed after use


@pytest.mark.parametrize("case", ["val", "continue", "pretrained"])
def test_nnunet_train_never_unpickles_a_crafted_checkpoint(nnunet_dirs, monkeypatch, capsys, case):
    """``--val`` loads checkpoint_final, ``--c`` checkpoint_latest (no final yet), ``-pretrained_weights`` any file:
    with nnU-Net's own trainer (no tpp-monai code in the trainer) each is refused before unpickling."""
    d = nnunet_dirs
    base = ["nnunet-train", "990", CONFIG, "0", "-tr", "nnUNetTrainer", "-device", "cpu"]
    if case == "val":
        ckpt, extra = _evil(d["fold"] / "checkpoint_final.pth", d["marker"]), ["--val"]
    elif case == "continue":
        ckpt, extra = _evil(d["fold"] / "checkpoint_latest.pth", d["marker"]), ["--c"]
    else:
        ckpt = _evil(d["tmp"] / "weights" / "pretrained.pth", d["marker"])
        extra = ["-pretrained_weights", str(ckpt)]
    rc, err = _cli(monkeypatch, capsys, [*base, *extra])
    _assert_refused(rc, err, ckpt, d["marker"], "--allow-pickle")


def test_nnunet_train_allow_pickle_trusts_only_the_pretrained_file(nnunet_dirs, monkeypatch, capsys):
    """--allow-pickle opts the -pretrained_weights file in, never nnU-Net's own checkpoints (--c)."""
    import nnunetv2.run.run_training as rt

    d = nnunet_dirs
    _evil(d["fold"] / "checkpoint_latest.pth", d["marker"])
    rc, err = _cli(monkeypatch, capsys, ["nnunet-train", "--allow-pickle", "990", CONFIG, "0", "-tr", "nnUNetTrainer",
                                         "-device", "cpu", "--c"])
    _assert_refused(rc, err, d["fold"] / "checkpoint_latest.pth", d["marker"], "--allow-pickle")
    loaded = []
    monkeypatch.setattr(rt, "load_pretrained_weights",
                        lambda net, fname, verbose=False: loaded.append(torch.load(fname, weights_only=False)["w"]))
    monkeypatch.setattr(rt.nnUNetTrainer, "run_training", lambda self: None)
    monkeypatch.setattr(rt.nnUNetTrainer, "perform_actual_validation", lambda self, npz=False: None)
    legacy = d["tmp"] / "legacy.model"
    import argparse

    torch.save({"w": torch.ones(3), "args": argparse.Namespace(lr=1.0)}, legacy)  # pickled, harmless
    monkeypatch.delenv("TPP_NNUNET_ALLOW_PICKLE")  # set by the --allow-pickle run (one process per CLI call in use)
    rc, err = _cli(monkeypatch, capsys, ["nnunet-train", "990", CONFIG, "0", "-tr", "nnUNetTrainer", "-device", "cpu",
                                         "-pretrained_weights", str(legacy)])
    assert rc == 2 and str(legacy) in err and "argparse.Namespace" in err and not loaded
    rc, err = _cli(monkeypatch, capsys, ["nnunet-train", "--allow-pickle", "990", CONFIG, "0", "-tr", "nnUNetTrainer",
                                         "-device", "cpu", "-pretrained_weights", str(legacy)])
    assert rc == 0 and len(loaded) == 1 and torch.equal(loaded[0], torch.ones(3)), err[-2000:]


def test_ddp_processes_are_guarded_too(monkeypatch):
    """-num_gpus > 1 spawns fresh processes: nnU-Net's run_ddp is replaced by a picklable wrapper that installs the
    guard in each of them (checked here by calling it as a spawned process would, with nnU-Net's run_ddp stubbed)."""
    import pickle

    import nnunetv2.run.run_training as rt

    from tpp_monai.nnunet import safety

    seen = []
    monkeypatch.setattr(rt, "run_ddp", lambda *a: seen.append(getattr(torch.load, "_tpp_monai_guard", False)))
    assert pickle.loads(pickle.dumps(safety.run_ddp_guarded)) is safety.run_ddp_guarded
    safety.run_ddp_guarded(0, "990", CONFIG, 0, "nnUNetTrainer", "nnUNetPlans", False, False, False, None, False,
                           False, 2)
    assert seen == [True] and not getattr(torch.load, "_tpp_monai_guard", False)


def test_bundle_inference_never_unpickles_a_crafted_checkpoint(nnunet_dirs):
    """lits/kits inference.json: the in-process nnUNetPredictor loads the fold weights-only."""
    from monai.bundle import ConfigParser

    from tpp_monai.nnunet.safety import UnsafeCheckpointError

    d = nnunet_dirs
    ckpt = _evil(d["fold"] / "checkpoint_final.pth", d["marker"])
    for bundle in ("lits_convadapter_tpp", "kits_convadapter_tpp"):
        p = ConfigParser()
        p.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
        p["dataset"]["id"], p["dataset"]["name"] = 990, "Safe"
        p["settings"] = {"device": "cpu", "trainer": "nnUNetTrainer", "num_processes": 1,
                         "nnunet_results": str(d["tmp"] / "res"), "predict_input": str(d["tmp"] / "in"),
                         "predict_output": str(d["tmp"] / "out")}
        with pytest.raises(RuntimeError) as ei:  # MONAI's "Failed to evaluate", caused by our refusal
            p.get_parsed_content("run")
        err = ei.value
        while err is not None and not isinstance(err, UnsafeCheckpointError):
            err = err.__cause__
        assert not d["marker"].exists() and err is not None, ei.value
        assert str(ckpt) in str(err) and "os.system" in str(err) and "refused" in str(err)


def test_stunet_trainer_load_checkpoint_is_weights_only(nnunet_dirs):
    """Our trainers' load_checkpoint (plain ``nnUNetv2_train -tr nnUNetTrainer_STUNet_*`` without our CLI)."""
    from tpp_monai.nnunet import trainers
    from tpp_monai.nnunet.safety import UnsafeCheckpointError

    d = nnunet_dirs
    plans = {**_plans(), "continue_training": True}  # get_trainer_from_args adds it
    tr = trainers.nnUNetTrainer_STUNet_ConvAdapter_debug(plans, CONFIG, 0, DATASET_JSON, torch.device("cpu"))
    evil = _evil(Path(tr.output_folder) / "checkpoint_latest.pth", d["marker"])
    with pytest.raises(UnsafeCheckpointError) as ei:
        tr.load_checkpoint(str(evil))
    assert not d["marker"].exists() and str(evil) in str(ei.value) and "os.system" in str(ei.value)
