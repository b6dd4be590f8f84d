"""Stage-3 fine-tuning resume and the bundles' top-level ``resume`` switch, with killed runs.

A bundle fine-tuning run killed at iteration k continues with ``resume`` True and ends where an
uninterrupted run ends: same iterations (every batch drawn exactly once, in the same order), same trainable
tensors, optimiser state and lr. Files written with other settings are refused; the TPP stage's switch
reaches its trainer from the command-line overrides. Tiny ViT (depth 1, 32 px), CPU.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import run_interrupted  # noqa: E402
from test_bundles import TINY, cfg, make_mhist  # noqa: E402

from tpp_monai.safe_io import CheckpointMismatch  # noqa: E402

BUNDLE = "mhist"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # bundle macros are relative to the repository root
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_mhist(tmp_path_factory.mktemp("data"))


def trainer(data: Path, root: Path, files=("train.json",), **over):
    """The bundle's trainer as ``monai.bundle run`` builds it (``initialize`` first), with a batch recorder."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([cfg(BUNDLE, f) for f in files])
    p.read_meta(cfg(BUNDLE, "metadata.json"))
    settings = {**TINY, "vit_overrides": {"depth": 1}, "dataset_dir": str(data), "bundle_root": str(root),
                "batch_size": 3, "num_iterations": 9, "save_interval": 2, "val_interval": 1, **over}
    for k, v in settings.items():
        p[k] = v
    for _ in p.get_parsed_content("initialize"):
        pass
    tr = p.get_parsed_content("tpp#trainer" if "tpp_pretrain.json" in files else "train#trainer")
    tr.evaluator = p.get_parsed_content("validate#evaluator")  # the same (cached) instance the trainer validates with
    if "tpp_pretrain.json" not in files:
        handlers = p.get_parsed_content("train#default_handlers")
        tr.resume_handler = next(h for h in handlers if type(h).__name__ == "FineTuneResume")
        tr.folder_lock = next(h for h in handlers if type(h).__name__ == "OutputFolderLock").lock
    tr.seen = []  # (iteration, checksum of the batch's images): proves no batch is lost or repeated

    @tr.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        items = engine.state.batch  # decollated by MONAI: one dict per image
        items = [items] if isinstance(items, dict) else items
        tr.seen.append((engine.state.iteration, [round(float(d["image"].double().sum()), 5) for d in items]))

    return tr


def trainable(tr) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.network.named_parameters() if p.requires_grad}


def _opt_tensors(opt) -> list[torch.Tensor]:
    return [t for st in opt.state_dict()["state"].values() for t in st.values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("stop_at", [4, 3])  # 4: mid-epoch (3 batches an epoch); 3: at an epoch end (after validation)
def test_killed_finetuning_resumes_to_the_uninterrupted_result(data, tmp_path, stop_at):
    ref = trainer(data, tmp_path / "ref")
    assert run_interrupted(ref, None) == 0 and ref.state.iteration == 9 and ref.state.epoch_length == 3
    crashed = trainer(data, tmp_path / "run")
    run_interrupted(crashed, stop_at + 1)  # killed after iteration stop_at + 1: the last save was at stop_at
    resume_file = tmp_path / "run" / "models" / "finetune_resume.pt"
    assert resume_file.is_file()
    resumed = trainer(data, tmp_path / "run", resume=True)
    run_interrupted(resumed, None)
    saved = stop_at - stop_at % 2  # save_interval 2
    assert resumed.seen[0][0] == saved + 1 and resumed.state.iteration == ref.state.iteration == 9
    # no lost or repeated iteration: the killed run's first `saved` batches + the resumed run's = the reference's
    assert crashed.seen[:saved] + resumed.seen == ref.seen
    a, b = trainable(ref), trainable(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(ref.optimizer.param_groups[0]["lr"], abs=1e-12)
    for x, y in zip(_opt_tensors(ref.optimizer), _opt_tensors(resumed.optimizer), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    # the best-model record survived the kill: the validator's best metric equals the uninterrupted run's
    assert resumed.evaluator.state.best_metric == ref.evaluator.state.best_metric
    assert resumed.evaluator.state.best_metric_epoch == ref.evaluator.state.best_metric_epoch
    state = torch.load(resume_file, weights_only=True)  # the final state, readable without pickles
    assert state["iteration"] == 9
    # the logs hold each iteration and each validation once, as the uninterrupted run's
    for name in ("train_log.jsonl", "val_log.jsonl"):
        got = [(r["kind"], r["iteration"]) for r in map(json.loads, (tmp_path / "run" / "logs" / name).open())]
        want = [(r["kind"], r["iteration"]) for r in map(json.loads, (tmp_path / "ref" / "logs" / name).open())]
        assert got == want and got, name


def test_resume_refuses_other_settings_and_a_missing_file(data, tmp_path):
    run_interrupted(trainer(data, tmp_path / "run"), 3)
    path = tmp_path / "run" / "models" / "finetune_resume.pt"
    with pytest.raises(CheckpointMismatch, match=rf"{path}.*lr: saved 0.0001 vs now 0.001.*--resume False"):
        trainer(data, tmp_path / "run", lr=1e-3).run()
    with pytest.raises(CheckpointMismatch, match=r"batch_size: saved 3 vs now 2"):
        trainer(data, tmp_path / "run", resume=True, batch_size=2).run()
    with pytest.raises(CheckpointMismatch, match=r"peft_method: saved 'adapter' vs now 'lora'"):
        trainer(data, tmp_path / "run", peft_method="lora").run()
    with pytest.raises(FileNotFoundError, match=r"--resume True but there is no fine-tuning resume state .*"
                                                r"other.*finetune_resume.pt"):
        trainer(data, tmp_path / "other", resume=True).run()
    # --resume False starts over (auto on a fresh folder too)
    fresh = trainer(data, tmp_path / "run", resume=False, lr=1e-3)
    assert run_interrupted(fresh, None) == 0 and fresh.seen[0][0] == 1


def test_finished_run_is_kept_with_true_retrained_with_auto_and_nan_is_never_saved(data, tmp_path):
    from tpp_monai.bundle import NonFiniteModelError

    done = trainer(data, tmp_path / "run")
    done.run()
    retrained = trainer(data, tmp_path / "run", lr=1e-3)  # auto + a finished run: a new run (other settings allowed)
    retrained.run()
    assert [i for i, _ in retrained.seen] == list(range(1, 10))
    done = trainer(data, tmp_path / "run", lr=1e-3)
    done.run()
    again = trainer(data, tmp_path / "run", lr=1e-3, resume=True)  # True: the finished run is kept as it is
    again.run()
    assert again.state.iteration == 9 and again.seen == []
    final = trainable(done)
    for k, v in trainable(again).items():  # the finished run's weights, loaded and left as they are
        assert torch.equal(v, final[k]), k
    # a NaN weight is never written: the previous resume state stays
    path = tmp_path / "run" / "models" / "finetune_resume.pt"
    good = path.read_bytes()
    with torch.no_grad():
        next(p for p in again.network.parameters() if p.requires_grad).fill_(float("nan"))
    again.state.iteration += 1
    with pytest.raises(NonFiniteModelError, match="not saving .*finetune_resume.pt"):
        again.resume_handler.save(again)
    assert path.read_bytes() == good


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def test_tpp_resume_switch_reaches_the_trainer_from_the_bundle_overrides(data, tmp_path, capsys):
    """TPP killed through the bundle config; ``monai.bundle run ... --resume False`` starts over and
    ``--resume True`` requires the file (the overrides go through MONAI's own ``run``, as on the command line)."""
    from monai.bundle import run

    from tpp_monai.engines.tpp_trainer import RESUME_NAME

    over = {"tpp_epochs": 2, "tpp_batch_size": 3, "tpp_warmup_epochs": 1}
    files = ("train.json", "tpp_pretrain.json")
    crashed = trainer(data, tmp_path / "run", files=files, **over)
    run_interrupted(crashed, crashed.state.epoch_length + 1)  # the resume state of epoch 1 is on disk
    state = tmp_path / "run" / "models" / RESUME_NAME
    assert torch.load(state, weights_only=True)["iteration"] == crashed.state.epoch_length

    def bundle_run(root: Path, resume) -> None:
        run(config_file=[cfg(BUNDLE, f) for f in files], meta_file=cfg(BUNDLE, "metadata.json"),
            **{**TINY, "vit_overrides": {"depth": 1}, "dataset_dir": str(data), "bundle_root": str(root), **over,
               "resume": resume})

    capsys.readouterr()
    bundle_run(tmp_path / "run", False)
    out = capsys.readouterr().out
    assert "resuming TPP" not in out
    assert torch.load(state, weights_only=True)["iteration"] == 2 * crashed.state.epoch_length  # ran all over
    with pytest.raises(Exception) as ei:
        bundle_run(tmp_path / "empty", True)
    assert any(isinstance(e, FileNotFoundError) and "No resume state" in str(e) for e in _chain(ei.value))
    # and "auto" / True continue a killed run (the kill test through the config: tests/test_reliability.py)
    crashed = trainer(data, tmp_path / "run2", files=files, **over)
    run_interrupted(crashed, crashed.state.epoch_length + 1)
    capsys.readouterr()
    bundle_run(tmp_path / "run2", "True")  # the command line's string form
    assert f"resuming TPP from {tmp_path / 'run2' / 'models' / RESUME_NAME} at iteration " \
           f"{crashed.state.epoch_length}" in capsys.readouterr().out


def test_finetuning_resume_true_on_the_command_line(data, tmp_path):
    """``python -m monai.bundle run --config_file .../train.json --resume True`` continues a killed run."""
    import json
    import os
    import subprocess

    killed = trainer(data, tmp_path / "run")
    run_interrupted(killed, 5)  # saved at iteration 4
    killed.folder_lock.release()  # a killed process's lock is stale; this one is still alive
    over = {**TINY, "vit_overrides": {"depth": 1}, "dataset_dir": str(data), "bundle_root": str(tmp_path / "run"),
            "batch_size": 3, "num_iterations": 9, "save_interval": 2}
    args = [a for k, v in over.items() for a in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg(BUNDLE, "train.json"),
                           "--meta_file", cfg(BUNDLE, "metadata.json"), *args, "--resume", "True"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "resuming fine-tuning from" in proc.stdout and "at iteration 4 of 9" in proc.stdout
    state = torch.load(tmp_path / "run" / "models" / "finetune_resume.pt", weights_only=True)
    assert state["iteration"] == 9
