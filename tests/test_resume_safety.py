"""Resume safety of the TPP stage: a run on changed training images (same count) is refused instead of
returning the old result; a resumed bundle TPP run logs every iteration once; temporary files that a killed
atomic writer left are removed on the next write of the same file."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_reliability import Crash, _find, _raise_crash, adapter_task, images  # noqa: E402

from tpp_monai.safe_io import CheckpointMismatch, atomic_save, remove_stale_tmps  # noqa: E402
from tpp_monai.engines.optim import build_optimizer  # noqa: E402
from tpp_monai.engines.tpp_trainer import TPPTrainer  # noqa: E402


def _tensor_run(out: Path, data: torch.Tensor, resume="auto") -> TPPTrainer:
    task = adapter_task()
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    tr = TPPTrainer("cpu", 1, loader, task, build_optimizer(task, lr=1e-2), out, schedule={"lr": 1e-2, "warmup_epochs": 0},
                    seed=5, resume=resume, tensorboard=False)
    tr.run()
    return tr


def test_finished_tpp_on_changed_in_memory_images_is_refused(tmp_path):
    x = images()
    _tensor_run(tmp_path, x)
    assert _tensor_run(tmp_path, x).state.iteration == 3  # same images: the finished run is kept
    changed = x.clone()
    changed[0, 0, 0, 0] += 0.5
    with pytest.raises(CheckpointMismatch, match=r"data: saved '12 items \(in memory\).*training images are not"):
        _tensor_run(tmp_path, changed)
    assert _tensor_run(tmp_path, changed, resume=False).state.iteration == 3  # --resume false trains again


@pytest.fixture
def bundle_tpp(tmp_path, monkeypatch):
    from monai.bundle import ConfigParser
    from test_bundles import TINY, make_mhist

    monkeypatch.chdir(ROOT)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")
    data = make_mhist(tmp_path)

    def trainer(root: Path, **over):
        p = ConfigParser()
        p.read_config(["bundles/mhist_adapter_tpp/configs/train.json", "bundles/mhist_adapter_tpp/configs/tpp_pretrain.json"])
        for k, v in {**TINY, "vit_overrides": {"depth": 1}, "dataset_dir": str(data), "bundle_root": str(root),
                     "tpp_epochs": 2, "tpp_batch_size": 4, "tpp_warmup_epochs": 1, **over}.items():
            p[k] = v
        for _ in p.get_parsed_content("initialize"):
            pass
        return p.get_parsed_content("tpp#trainer")

    return trainer, data


def _logged_iterations(root: Path) -> list[int]:
    return [json.loads(x)["iteration"] for x in (root / "logs" / "tpp_log.jsonl").read_text().splitlines()
            if x.strip() and json.loads(x).get("kind") == "loss"]


def test_bundle_tpp_refuses_changed_images_and_logs_each_iteration_once(bundle_tpp, tmp_path):
    trainer, data = bundle_tpp
    root = tmp_path / "run"
    crashed = trainer(root)
    n = crashed.state.epoch_length
    crashed.add_event_handler(Events.ITERATION_COMPLETED(once=n + 1), _raise_crash)  # last save: end of epoch 1
    with pytest.raises(Crash):
        crashed.run()
    assert _logged_iterations(root) == list(range(1, n + 2))
    resumed = trainer(root)
    resumed.run()
    assert resumed.state.iteration == 2 * n
    assert _logged_iterations(root) == list(range(1, 2 * n + 1))  # iteration n + 1 logged once, not twice
    # the same count of training images, one of them changed: refused, naming the images
    first = json.loads((data / "datalist.json").read_text())["training"][0]["image"]
    path = Path(first) if Path(first).is_absolute() else data / first
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(path)
    os.utime(path, (time.time() + 5, time.time() + 5))
    with pytest.raises(Exception) as ei:  # MONAI wraps the trainer's error in its instantiation error
        trainer(root)
    msg = str(_find(ei.value, CheckpointMismatch))
    assert re.search(r"tpp_resume.pt.*data: saved '8 items \(8 files\).*training images are not those of that run"
                     r".*--resume false", msg), msg
    assert trainer(root, resume=False).state.iteration == 0  # starting over is still possible


def test_atomic_write_removes_a_killed_writers_tmp_files(tmp_path):
    import subprocess

    target = tmp_path / "tpp_resume.pt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = time.time() - 60
    orphan = tmp_path / f".tpp_resume.pt.pid{dead.pid}.abc123_x.tmp"  # SIGKILLed writer (dead PID)
    legacy = tmp_path / ".tpp_resume.pt.q1w2e3r4.tmp"  # an older version's name, no PID: an hour old
    young_legacy = tmp_path / ".tpp_resume.pt.zz9y8x7w.tmp"  # could be a live writer of an older version
    live = tmp_path / f".tpp_resume.pt.pid{os.getppid()}.a1b2c3d4.tmp"  # a live writer's file
    other = tmp_path / f".model.pt.pid{dead.pid}.a1b2c3d4.tmp"  # another target's: not ours to clean
    for f in (orphan, legacy, young_legacy, live, other):
        f.write_bytes(b"x" * 100)
        os.utime(f, (old, old))
    os.utime(legacy, (old - 3600, old - 3600))
    os.utime(young_legacy, (time.time(), time.time()))
    atomic_save({"a": torch.ones(2)}, target)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([target.name, young_legacy.name, live.name, other.name])
    assert remove_stale_tmps(tmp_path / "model.pt") == [other]
    assert torch.load(target)["a"].sum() == 2
