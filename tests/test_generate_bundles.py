"""Self-contained bundles: configs generated from bundles/common (in sync, no macro or outside path left), and a
bundle folder runs from its own root, from the repository root and as a zipped copy unzipped elsewhere;
nested command-line overrides (--train#trainer#max_epochs) reach the trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_bundles import TINY, make_mhist  # noqa: E402

PY = sys.executable
ALL_BUNDLES = sorted(p.name for p in (ROOT / "bundles" / "common" / "specs").iterdir() if p.is_dir())


def _gen(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(root / "scripts" / "generate_bundles.py"), *args], capture_output=True, text=True,
                          cwd=root, timeout=120)


def test_generated_configs_are_in_sync_and_self_contained():
    r = _gen(ROOT, "--check")
    assert r.returncode == 0, r.stderr
    for bundle in ALL_BUNDLES:
        folder = ROOT / "bundles" / bundle
        assert (folder / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
        assert (folder / "configs" / "logging.conf").is_file()
        for f in (folder / "configs").glob("*.json"):
            text = f.read_text()
            assert "%bundles/" not in text and "bundles/" not in text, f  # nothing outside the bundle
        train = json.loads((folder / "configs" / "train.json").read_text())
        assert train["bundle_root"] == f"$tpp_monai.bundle.resolve_bundle_root('{bundle}')"


def test_check_names_a_stale_file_and_regeneration_fixes_it(tmp_path):
    """A hand edit of a generated file (or a template edit not regenerated) fails --check with the file's name."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "generate_bundles.py", tmp_path / "scripts")
    shutil.copy(ROOT / "LICENSE", tmp_path)
    shutil.copytree(ROOT / "bundles", tmp_path / "bundles")
    train = tmp_path / "bundles" / "qata_adapter_tpp" / "configs" / "train.json"
    train.write_text(train.read_text().replace('"lr": 0.0001', '"lr": 0.5'))
    r = _gen(tmp_path, "--check")
    assert r.returncode == 1 and "bundles/qata_adapter_tpp/configs/train.json" in r.stderr
    # a template edit reaches every bundle on regeneration
    sup = tmp_path / "bundles" / "common" / "supervised.json"
    sup.write_text(sup.read_text().replace('"max_norm": 12.0', '"max_norm": 7.0'))
    assert _gen(tmp_path, "--check").returncode == 1
    assert _gen(tmp_path).returncode == 0 and _gen(tmp_path, "--check").returncode == 0
    handlers = json.loads(train.read_text())["train"]["default_handlers"]
    assert any(h.get("max_norm") == 7.0 for h in handlers)
    assert json.loads(train.read_text())["lr"] == 0.0001


def test_bundle_root_resolution(tmp_path, monkeypatch):
    from tpp_monai.bundle import BundleRootError, resolve_bundle_root

    monkeypatch.chdir(ROOT)
    assert resolve_bundle_root("qata_adapter_tpp") == os.path.join("bundles", "qata_adapter_tpp")
    monkeypatch.chdir(ROOT / "bundles" / "qata_adapter_tpp")
    assert resolve_bundle_root("qata_adapter_tpp") == "."
    # inside another bundle's folder, run with this bundle's config: not silently the other bundle
    with pytest.raises(BundleRootError, match="--bundle_root"):
        resolve_bundle_root("no_such_bundle")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleRootError, match="--bundle_root"):
        resolve_bundle_root("qata_adapter_tpp")


def _train_from(folder: Path, data: Path, *extra: str, config: str = "configs/train.json") -> subprocess.CompletedProcess:
    over = {**TINY, "dataset_dir": str(data), "batch_size": 4}
    args = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in over.items()]
    cmd = [PY, "-m", "monai.bundle", "run", "--config_file", config, *args, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=300, env=env)


def _epochs(folder: Path) -> list[int]:
    rows = [json.loads(x) for x in (folder / "logs" / "val_log.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in rows if r.get("kind") == "metrics"]


def test_zipped_bundle_runs_from_its_own_root_with_a_nested_override(tmp_path):
    """A zip of bundles/mhist_adapter_tpp unzipped elsewhere trains from its own root (outputs inside it);
    --train#trainer#max_epochs 2 stops training after 2 epochs (num_iterations alone would run 1)."""
    data = make_mhist(tmp_path / "data")
    archive = tmp_path / "mhist_adapter_tpp.zip"
    src = ROOT / "bundles" / "mhist_adapter_tpp"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.rglob("*"):
            if f.is_file() and not any(part in ("models", "logs", "eval", "predictions", "cache")
                                       for part in f.relative_to(src).parts):
                z.write(f, Path("mhist_adapter_tpp") / f.relative_to(src))
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "elsewhere")
    folder = tmp_path / "elsewhere" / "mhist_adapter_tpp"
    r = _train_from(folder, data, "--num_iterations=1", "--train#trainer#max_epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (folder / "models" / "model.pt").is_file()
    assert _epochs(folder) == [1, 2]


def test_runs_from_the_bundle_root_in_process(tmp_path, monkeypatch):
    """The same config from the bundle's folder without --bundle_root: bundle_root is '.', and
    --bundle_root still wins (MONAI Label sets it)."""
    from monai.bundle import ConfigParser

    monkeypatch.chdir(ROOT / "bundles" / "qata_adapter_tpp")
    p = ConfigParser()
    p.read_config("configs/train.json")
    assert p.get_parsed_content("bundle_root") == "."
    assert p.get_parsed_content("ckpt_dir") == "./models"
    p["bundle_root"] = str(tmp_path)
    assert p.get_parsed_content("ckpt_dir") == str(tmp_path) + "/models"
    p["train#trainer#max_epochs"] = 3
    for k, v in {**TINY, "dataset_dir": str(tmp_path)}.items():
        p[k] = v
    assert p["train"]["trainer"]["max_epochs"] == 3
    torch.set_num_threads(1)


def test_readme_command_from_a_repository_root(tmp_path):
    """The README's form, run from a repository root: outputs land in bundles/<name>/ (bundle_root resolved)."""
    data = make_mhist(tmp_path / "data")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "bundles" / "mhist_adapter_tpp", repo / "bundles" / "mhist_adapter_tpp",
                    ignore=shutil.ignore_patterns("models", "logs", "eval", "predictions", "cache"))
    r = _train_from(repo, data, "--num_iterations=1", config="bundles/mhist_adapter_tpp/configs/train.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (repo / "bundles" / "mhist_adapter_tpp" / "models" / "model.pt").is_file()
    assert not (repo / "models").exists()
