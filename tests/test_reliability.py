"""Issue 16: nothing lost on a crash, no NaN model saved, clear errors.

Each test reproduces one case of the issue (it fails on the code before the fix). Tiny models
(ViT-Tiny, depth 1-2, 32 px), random or synthetic data, a few iterations.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_interrupted
import torch
from ignite.engine import Events

from tpp_monai.backbones.vit import build_vit
from tpp_monai.safe_io import CheckpointMismatch
from tpp_monai.engines.optim import build_optimizer
from tpp_monai.engines.tpp_trainer import RESUME_NAME, TPPTrainer
from tpp_monai.peft import apply_peft, target_state_dict
from tpp_monai.pretext.mae import MAEPretext
from tpp_monai.runlock import LOCK_NAME, OutputFolderLocked

ROOT = Path(__file__).resolve().parents[1]
IMG, PATCH = 32, 8
SMALL_DEC = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)
PY_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def adapter_task(seed: int = 0) -> MAEPretext:
    torch.manual_seed(seed)
    vit = build_vit("tiny", depth=1, img_size=IMG, patch_size=PATCH)
    apply_peft(vit, "adapter", {"bottleneck": 4})
    return MAEPretext(vit, **SMALL_DEC)


def images(n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 3, IMG, IMG, generator=g)


class Crash(Exception):
    pass


def tpp_run(out: Path, epochs: int = 3, crash_at: int | None = None, seed: int = 5, resume="auto", every_iters=None):
    """3 batches per epoch over a shuffled DataLoader with its own generator (as tpp_pretrain builds it)."""
    task = adapter_task()
    opt = build_optimizer(task, lr=1e-2)
    loader = torch.utils.data.DataLoader(images(), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    tr = TPPTrainer("cpu", epochs, loader, task, opt, out, schedule={"lr": 1e-2, "warmup_epochs": 1}, seed=seed,
                    resume=resume, tensorboard=False, checkpoint_every_iters=every_iters, checkpoint_every_epochs=1)
    return tr, run_interrupted(tr, crash_at, Crash)


def params(tr: TPPTrainer) -> dict[str, torch.Tensor]:
    return {**target_state_dict(tr.task.backbone), **{f"head.{k}": v for k, v in tr.task.head_state_dict().items()}}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff == 0.0, f"max abs diff {diff}"


# ------------------------------------------------------------------ item 3: TPP resume is exact
@pytest.mark.parametrize("crash_at,every_iters", [(4, None), (5, 2)])
def test_tpp_resume_equals_uninterrupted_run_bit_for_bit(tmp_path, crash_at, every_iters):
    """Killed after an epoch (resume at its end) or inside one (resume mid-pass): same result, bit for bit.
    Before the fix the shuffle order restarted from the loader's seed (max diff ~1e-2)."""
    ref, _ = tpp_run(tmp_path / "ref", every_iters=every_iters)
    tpp_run(tmp_path / "run", crash_at=crash_at, every_iters=every_iters)
    resumed, start = tpp_run(tmp_path / "run", every_iters=every_iters)  # default: resume when compatible
    assert start == (3 if every_iters is None else 4) and resumed.state.iteration == 9
    assert_bit_equal(params(ref), params(resumed))


def test_tpp_resume_refuses_other_settings_and_missing_file(tmp_path):
    tpp_run(tmp_path / "run", crash_at=4)
    with pytest.raises(CheckpointMismatch, match=r"seed: saved 5 vs now 6.*--resume false"):
        tpp_run(tmp_path / "run", seed=6)
    with pytest.raises(CheckpointMismatch, match="max_epochs: saved 3 vs now 4"):
        tpp_run(tmp_path / "run", epochs=4)
    with pytest.raises(FileNotFoundError, match="No resume state"):
        tpp_run(tmp_path / "other", resume=True)
    # the refusals left the folder unlocked and the state untouched: a matching run still resumes
    _, start = tpp_run(tmp_path / "run")
    assert start == 3


def test_bundle_tpp_stage_resumes_by_default(tmp_path, monkeypatch):
    """The bundle's TPP stage (shuffling DataLoader without generator) resumes a killed run exactly."""
    import warnings

    from monai.bundle import ConfigParser

    sys.path.insert(0, str(ROOT / "tests"))
    from test_bundles import TINY, make_mhist

    monkeypatch.chdir(ROOT)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")
    data = make_mhist(tmp_path)

    def trainer(root: Path):
        p = ConfigParser()
        p.read_config(["bundles/mhist_adapter_tpp/configs/train.json", "bundles/mhist_adapter_tpp/configs/tpp_pretrain.json"])
        over = {**TINY, "vit_overrides": {"depth": 1}, "dataset_dir": str(data), "bundle_root": str(root),
                "tpp_epochs": 3, "tpp_batch_size": 3, "tpp_warmup_epochs": 1}
        for k, v in over.items():
            p[k] = v
        assert p["resume"] == "auto"
        for x in p.get_parsed_content("initialize"):
            pass
        return p.get_parsed_content("tpp#trainer")

    ref = trainer(tmp_path / "ref")
    ref.run()
    crashed = trainer(tmp_path / "run")
    crashed.add_event_handler(Events.ITERATION_COMPLETED(once=crashed.state.epoch_length + 1), _raise_crash)
    with pytest.raises(Crash):
        crashed.run()
    resumed = trainer(tmp_path / "run")
    assert resumed.state.iteration == resumed.state.epoch_length  # continued after the saved epoch
    resumed.run()
    assert_bit_equal(params(ref), params(resumed))


def _raise_crash(engine):
    raise Crash()


# ------------------------------------------------------------------ item 4: one run per output folder
LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from tpp_monai.runlock import OutputLock
    lock = OutputLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_run_into_a_locked_folder_is_refused_naming_the_pid(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, env=PY_ENV, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderLocked, match=rf"PID {proc.pid}\b"):
            tpp_run(out)
        assert not (out / RESUME_NAME).exists()  # nothing of the other run was touched
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # the dead run's lock is stale: taken over, and released after the run
        tr, _ = tpp_run(out, epochs=1)
        assert tr.state.iteration == 3 and not (out / LOCK_NAME).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_bundle_finetuning_refuses_a_folder_in_use(tmp_path, monkeypatch):
    """Stage 3 of a bundle locks its models/ folder: a second run stops naming the first one's PID and
    leaves that run's files alone (before, both wrote model.pt and the logs)."""
    import warnings

    from monai.bundle import run

    sys.path.insert(0, str(ROOT / "tests"))
    from test_bundles import TINY, make_mhist

    monkeypatch.chdir(ROOT)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")
    data, work = make_mhist(tmp_path), tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "train_log.jsonl").write_text('{"the other run": 1}\n')
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(work / "models")], stdout=subprocess.PIPE,
                            env=PY_ENV, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(Exception) as ei:
            run(config_file=["bundles/mhist_adapter_tpp/configs/train.json"],
                meta_file="bundles/mhist_adapter_tpp/configs/metadata.json",
                **{**TINY, "vit_overrides": {"depth": 1}, "dataset_dir": str(data), "bundle_root": str(work),
                   "batch_size": 4, "num_iterations": 1})
        err = _find(ei.value, OutputFolderLocked)
        assert f"PID {proc.pid}" in str(err)
        assert not (work / "models" / "model.pt").exists()
        assert (work / "logs" / "train_log.jsonl").read_text() == '{"the other run": 1}\n'
    finally:
        proc.kill()
        proc.wait(10)


def test_lock_inside_one_process(tmp_path):
    """Another live thread's lock is refused; the same thread takes over the lock of its own crashed run."""
    import threading

    from tpp_monai.runlock import OutputLock

    tpp_run(tmp_path / "a", crash_at=1)
    crashed_lock = OutputLock(tmp_path / "b").acquire()  # a run that died with an exception, lock not released
    tr, _ = tpp_run(tmp_path / "b", epochs=1)  # same thread: taken over
    assert tr.state.iteration == 3 and not (tmp_path / "b" / LOCK_NAME).exists()
    crashed_lock.release()  # superseded: must not remove anything
    held, go = threading.Event(), threading.Event()

    def other():
        lock = OutputLock(tmp_path / "c").acquire()
        held.set()
        go.wait(30)
        lock.release()

    t = threading.Thread(target=other)
    t.start()
    try:
        held.wait(30)
        with pytest.raises(OutputFolderLocked, match="another thread"):
            tpp_run(tmp_path / "c")
    finally:
        go.set()
        t.join(30)


# ------------------------------------------------------------------ item 1: model.pt survives a kill mid-save
SAVER_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from ignite.engine import Engine
    from pydoc import locate

    cfg = json.load(open(sys.argv[2]))
    handlers = cfg["validate"].get("default_handlers", []) + cfg["validate"]["handlers"]
    spec = next(h for h in handlers if "CheckpointSaver" in h["_target_"])
    target = spec["_target_"]
    cls = locate(target if "." in target else "monai.handlers." + target)
    net = torch.nn.Linear(1000, 4000)  # 16 MB: a save takes long enough to be killed inside it
    saver = cls(save_dir=sys.argv[1], save_dict={"model": net}, save_key_metric=True,
                key_metric_filename=spec["key_metric_filename"])
    engine = Engine(lambda e, b: None)
    engine.state.key_metric_name = "acc"
    v = float(sys.argv[3])
    while True:
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(v)
        engine.state.epoch = engine.state.iteration = int(v)
        engine.state.metrics = {"acc": v}
        saver.metrics_completed(engine)
        print("saved", v, flush=True)
        v += 1
""")


def test_model_pt_survives_sigkill_during_save(tmp_path):
    """A real subprocess saving models/model.pt with the bundles' saver (bundles/common/supervised.json)
    is SIGKILLed mid-save several times; the previous model always still loads, whole. Before the fix
    (MONAI CheckpointSaver, remove-then-write, atomic=False) model.pt was left empty or truncated."""
    import random

    rng = random.Random(0)
    model = tmp_path / "model.pt"
    cfg = ROOT / "bundles/common/supervised.json"
    version = 1
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SAVER_CHILD, str(tmp_path), str(cfg), str(version)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=PY_ENV, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("saved"), proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.4))  # kill inside one of the next saves
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        state = torch.load(model, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # ignite saves a one-entry save_dict unwrapped
        values = {float(t.flatten()[0]) for t in state.values()}
        assert len(values) == 1 and all(bool((t == t.flatten()[0]).all()) for t in state.values())
        assert state["weight"].shape == (4000, 1000)
        version = int(values.pop()) + 1000 * (trial + 1)  # later trials write larger metrics (they improve)


def test_saver_never_writes_a_non_finite_model(tmp_path):
    from tpp_monai.bundle.handlers import NonFiniteModelError, _AtomicDiskSaver

    saver = _AtomicDiskSaver(tmp_path, "model.pt")
    saver({"model": {"w": torch.ones(3)}}, "ignored.pt")
    before = (tmp_path / "model.pt").read_bytes()
    saver.remove("ignored.pt")  # ignite's remove-before-save is a no-op for a fixed name
    with pytest.raises(NonFiniteModelError, match=r"model\.w.*previous file is kept.*--lr"):
        saver({"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}}, "ignored.pt")
    assert (tmp_path / "model.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))


def test_metrics_and_predictions_are_written_atomically(tmp_path, monkeypatch):
    """A failure while writing metrics.json leaves the previous file (it was truncated first before)."""
    from ignite.engine import Engine

    from tpp_monai.bundle import save_metrics_json

    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"acc": 0.5}
    path = tmp_path / "metrics.json"
    save_metrics_json(engine, path)
    good = path.read_text()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    engine.state.metrics = {"acc": 0.9}
    with pytest.raises(OSError):
        save_metrics_json(engine, path)
    assert path.read_text() == good


# ------------------------------------------------------------------ item 2: no NaN model trained or saved
def test_finetuning_stops_on_nan_and_keeps_the_good_model(tmp_path, monkeypatch, recwarn):
    """Stage 3 with a NaN TPP checkpoint: a warning names the file, training stops with the likely causes,
    and the bundle's good models/model.pt is untouched (before: exit 0 and a NaN model.pt)."""
    import warnings

    from monai.bundle import ConfigParser, run

    from tpp_monai.peft.target_checkpoint import save_target_checkpoint

    sys.path.insert(0, str(ROOT / "tests"))
    from test_bundles import TINY, make_mhist

    monkeypatch.chdir(ROOT)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")
    data, work = make_mhist(tmp_path), tmp_path / "work"
    over = {**TINY, "vit_overrides": {"depth": 1}, "dataset_dir": str(data), "bundle_root": str(work),
            "batch_size": 4, "num_iterations": 2}
    files = ["bundles/mhist_adapter_tpp/configs/train.json"]
    run(config_file=files, meta_file="bundles/mhist_adapter_tpp/configs/metadata.json", **over)
    good = (work / "models" / "model.pt").read_bytes()
    p = ConfigParser()
    p.read_config(files)
    for k, v in over.items():
        p[k] = v
    backbone = p.get_parsed_content("network_def").backbone
    with torch.no_grad():
        for n, prm in backbone.named_parameters():
            if "peft_" in n:
                prm.fill_(float("nan"))
    bad = save_target_checkpoint(tmp_path / "nan_tpp.pt", backbone)
    with pytest.raises(Exception) as ei:
        run(config_file=files, meta_file="bundles/mhist_adapter_tpp/configs/metadata.json", **{**over, "tpp_ckpt": str(bad)})
    chain, e = [], ei.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    err = next((c for c in chain if isinstance(c, FloatingPointError)), None)
    assert err is not None, chain
    assert "loss is nan" in str(err) and "Likely causes" in str(err)
    assert any("nan_tpp.pt" in str(w.message) and "NaN" in str(w.message) for w in recwarn.list)
    assert (work / "models" / "model.pt").read_bytes() == good


# ------------------------------------------------------------------ item 11: 16-bit PNGs keep their range
def _png16(path: Path, arr) -> Path:
    from PIL import Image

    Image.fromarray(arr.astype("uint16")).save(path)
    return path


def test_16bit_png_is_scaled_from_its_range_not_saturated(tmp_path):
    """A 12-bit X-ray stored as 16-bit PNG: before, 0..255 clipping made most pixels 1.0."""
    import numpy as np

    from tpp_monai.data.transforms import cls_transforms

    arr = np.tile(np.linspace(100, 4000, 64), (64, 1))
    p = _png16(tmp_path / "xray16.png", arr)
    x = cls_transforms(image_size=64, in_channels=1, normalize="none")({"image": str(p), "label": 0})["image"]
    assert float((x >= 0.999).float().mean()) < 0.05  # was ~0.97
    assert abs(float(x.min())) < 1e-6 and abs(float(x.max()) - 1) < 1e-6
    want = (arr - 100) / 3900
    assert np.allclose(x[0].numpy(), want, atol=1e-3)
    # a fixed window (bundle option intensity_range) for the whole dataset
    x = cls_transforms(image_size=64, in_channels=1, normalize="none", intensity_range=[0, 4095])(
        {"image": str(p), "label": 0})["image"]
    assert np.allclose(x[0].numpy(), arr / 4095, atol=1e-3)
    # 8-bit images keep the fixed 0..255 scaling (a dark 8-bit image stays dark)
    from PIL import Image

    Image.fromarray(np.full((16, 16), 51, np.uint8)).save(tmp_path / "dark8.png")
    x = cls_transforms(image_size=16, in_channels=1, normalize="none")({"image": str(tmp_path / "dark8.png"),
                                                                        "label": 0})["image"]
    assert torch.allclose(x, torch.full_like(x, 0.2))


def test_bundles_expose_the_intensity_window():
    import json

    for cfg in sorted(ROOT.glob("bundles/*_adapter_tpp/configs/train.json")):
        assert json.loads(cfg.read_text())["intensity_range"] == "auto", cfg
    for common in ("cls_train", "seg_train", "tpp_pretrain"):
        assert '"intensity_range": "@intensity_range"' in (ROOT / f"bundles/common/{common}.json").read_text()


# ------------------------------------------------------------------ item 12: image/label size mismatch refused
def test_segmentation_pair_of_different_sizes_is_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from tpp_monai.data.transforms import ImageFileError, seg_transforms

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(Exception) as ei:
        seg_transforms(image_size=32)({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "mask.png")})
    err = _find(ei.value, ImageFileError)
    assert "img.png" in str(err) and "mask.png" in str(err) and "(40, 50)" in str(err) and "(40, 40)" in str(err)


def test_prepare_qata_refuses_size_mismatch(tmp_path):
    import numpy as np
    from PIL import Image

    from tpp_monai.data.datalist import DatalistError, prepare_qata

    base = tmp_path / "QaTa-COV19-v2"
    for split in ("Train Set", "Test Set"):
        (base / split / "Images").mkdir(parents=True)
        (base / split / "Ground-truths").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.zeros((48, 48), np.uint8)).save(base / split / "Images" / f"x{i}.png")
            size = (40, 48) if (split, i) == ("Train Set", 1) else (48, 48)
            Image.fromarray(np.zeros(size, np.uint8)).save(base / split / "Ground-truths" / f"mask_x{i}.png")
    with pytest.raises(DatalistError, match=r"x1\.png is 48x48 but .*mask_x1\.png is 48x40"):
        prepare_qata(tmp_path)


def _find(exc: BaseException, cls: type) -> BaseException:
    e = exc
    while e is not None:
        if isinstance(e, cls):
            return e
        e = e.__cause__ or e.__context__
    raise AssertionError(f"no {cls.__name__} in the chain of {exc!r}")


# ------------------------------------------------------------------ item 13: errors name the file and the fix
@pytest.mark.parametrize("kind", ["random", "truncated", "empty"])
def test_corrupt_target_checkpoint_is_not_called_a_pickle(tmp_path, kind):
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint, save_target_checkpoint

    torch.manual_seed(0)
    vit = build_vit("tiny", depth=1, img_size=IMG, patch_size=PATCH)
    apply_peft(vit, "adapter", {"bottleneck": 4})
    good = save_target_checkpoint(tmp_path / "good.pt", vit).read_bytes()
    p = tmp_path / "tpp_target_params.pt"
    p.write_bytes({"random": os.urandom(3000), "truncated": good[: len(good) // 2], "empty": b""}[kind])
    with pytest.raises(RuntimeError) as ei:
        read_target_checkpoint(p)
    msg = str(ei.value)
    assert str(p) in msg and "allow_pickle" not in msg and "download it again" in msg
    assert {"random": "not a PyTorch checkpoint", "truncated": "truncated", "empty": "empty"}[kind] in msg


def test_pickled_checkpoint_still_gets_the_allow_pickle_advice(tmp_path):
    from tpp_monai.safe_io import safe_load

    p = tmp_path / "legacy.pth"
    torch.save({"args": argparse_namespace()}, p)
    with pytest.raises(RuntimeError, match="allow_pickle=True"):
        safe_load(p)


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1.0)


def test_corrupt_model_pt_in_evaluation_names_the_file(tmp_path):
    from ignite.engine import Engine

    from tpp_monai.bundle import CheckedCheckpointLoader

    net = torch.nn.Linear(2, 2)
    p = tmp_path / "model.pt"
    torch.save({"model": net.state_dict()}, p)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"model checkpoint .*model\.pt.*truncated.*Re-create"):
        CheckedCheckpointLoader(load_path=str(p), load_dict={"model": net})(Engine(lambda e, b: None))
    text = (ROOT / "bundles/common/evaluate.json").read_text() + (ROOT / "bundles/common/inference.json").read_text()
    assert text.count("tpp_monai.bundle.CheckedCheckpointLoader") == 2


@pytest.mark.parametrize("suffix", [".png", ".nii.gz"])
def test_truncated_image_error_names_the_file(tmp_path, suffix):
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from tpp_monai.data.transforms import ImageFileError, seg_transforms

    img = tmp_path / f"img{suffix}"
    if suffix == ".png":
        Image.fromarray((np.random.rand(64, 64, 3) * 255).astype(np.uint8)).save(img)
    else:
        nib.save(nib.Nifti1Image(np.random.rand(64, 64).astype(np.float32), np.eye(4)), img)
    img.write_bytes(img.read_bytes()[:200])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(Exception) as ei:
        seg_transforms(image_size=32)({"image": str(img), "label": str(tmp_path / "mask.png")})
    err = _find(ei.value, ImageFileError)
    assert str(img) in str(err) and "re-export or re-download" in str(err)


def test_label_value_out_of_range_names_the_file(tmp_path):
    import numpy as np
    from PIL import Image

    from tpp_monai.data.transforms import ImageFileError, seg_transforms

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    m = np.zeros((32, 32), np.uint8)
    m[4:8, 4:8], m[10:12, 10:12] = 2, 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    with pytest.raises(Exception) as ei:
        seg_transforms(image_size=32, num_classes=3)({"image": str(tmp_path / "img.png"),
                                                      "label": str(tmp_path / "mask.png")})
    err = _find(ei.value, ImageFileError)
    assert "mask.png" in str(err) and "[255" in str(err) and "0..2" in str(err)


# ------------------------------------------------------------------ item 14: nnunet-predict checks the checkpoint
def _nnunet_results(tmp_path: Path, payload: dict) -> tuple[list[str], Path]:
    res = tmp_path / "results"
    fold = res / "Dataset990_Demo" / "nnUNetTrainer_X__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    torch.save(payload, fold / "checkpoint_final.pth")
    (tmp_path / "raw" / "Dataset990_Demo").mkdir(parents=True)
    args = ["-i", "in", "-o", "out", "-d", "990", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_X"]
    return args, fold / "checkpoint_final.pth"


class Payload:
    """Stands for code a crafted checkpoint would run when unpickled."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_nnunet_checkpoint_check_refuses_a_pickled_checkpoint(tmp_path):
    """The pre-check the label app runs (tpp_monai.cli.check_checkpoints_weights_only); the CLI paths
    themselves are covered in tests/test_nnunet_safety.py."""
    import numpy as np

    pytest.importorskip("nnunetv2")

    from tpp_monai import cli

    args, ckpt = _nnunet_results(tmp_path, {"network_weights": {"w": torch.ones(2)}, "logging": {"ema": [np.float64(0.5)]},
                                            "init_args": {"device": torch.device("cpu")}, "evil": Payload()})
    err = cli.check_checkpoints_weights_only([str(ckpt)], pickle_hint="start the server with --conf allow_pickle true")
    assert str(ckpt) in err and "refused: it would import" in err and "os.system" in err
    # a genuine nnU-Net checkpoint (tensors, plain data, numpy numbers in its logs) passes
    torch.save({"network_weights": {"w": torch.ones(2)}, "logging": {"ema": [np.float64(0.5)]},
                "init_args": {"device": torch.device("cpu")}, "_best_ema": np.float64(0.4)}, ckpt)
    assert cli.check_checkpoints_weights_only([str(ckpt)]) is None


# ------------------------------------------------------------------ item 15: arguments are validated
def test_zero_lr_iterations_epochs_and_images_are_refused(tmp_path):
    from tpp_monai.bundle import epochs_for_iterations
    from tpp_monai.engines.optim import build_optimizer
    from tpp_monai.tpp import tpp_pretrain

    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="learning rate must be > 0, got 0"):
        build_optimizer(net, lr=0)
    with pytest.raises(ValueError, match="--num_iterations must be a positive"):
        epochs_for_iterations(0, 10)
    assert epochs_for_iterations(25, 10) == 3
    torch.manual_seed(0)
    vit = build_vit("tiny", depth=1, img_size=IMG, patch_size=PATCH)
    with pytest.raises(ValueError, match="tpp_pretrain got 0 images"):
        tpp_pretrain(vit, "adapter", "mae", torch.zeros(0, 3, IMG, IMG), output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        tpp_pretrain(build_vit("tiny", depth=1, img_size=IMG, patch_size=PATCH), "adapter", "mae", images(4),
                     lr=0.0, output_dir=tmp_path / "b", pretext_config=SMALL_DEC)
    with pytest.raises(ValueError, match="max_epochs must be a positive"):
        tpp_run(tmp_path / "c", epochs=0)
    assert not (tmp_path / "c" / LOCK_NAME).exists()
