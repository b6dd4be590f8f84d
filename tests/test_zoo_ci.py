"""The MONAI model zoo's own CI (Project-MONAI/model-zoo ``ci/``, at ``../shared/model-zoo``) on every bundle.

Run as the zoo runs it, offline, in one process per mode (``tests/zoo_ci_driver.py``: the zoo's functions, unchanged):
- ``ci/prepare_schema.py`` copies the schema named in metadata.json into each bundle's ``eval/``; its
  download (MONAI's ``download_url``) skips a file that already exists, so the official schema file
  (``../shared/schemas/meta_schema_20240725.json``) is put where the zoo downloads it to: nothing is fetched.
- ``ci/verify_bundle.py``'s ``verify`` (through ``tests/zoo_ci_driver.py``, which only adds our entries of
  ``bundles/common/zoo_ci.json`` to the zoo's ``ci/bundle_custom_data.py`` lists, the zoo's form for a check a bundle
  cannot pass): ``min`` mode (directory, large files, version/changelog, metadata schema) on every bundle, ``full``
  mode (+ properties, MONAI's ``verify_net_in_out`` with metadata's declared shapes on the default networks) on every
  bundle (full mode builds the default ViT-B / STU-Net-B: 33 s for all eight on CPU).
- ``ci/get_bundle_requirements.py``'s ``get_requirements``: the requirements it writes are all satisfied by the installed stack
  (``pip install --dry-run --no-index --no-deps``).
Skipped with a message where ``../shared`` is absent (a user's clone).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT.parent / "shared" / "model-zoo"
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
EXCLUSIONS = ROOT / "bundles" / "common" / "zoo_ci.json"
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
FULL_MODE = BUNDLES  # full mode on every bundle (2D: default ViT-B ~10 s, 3D: STU-Net-B ~60 s on CPU)

pytestmark = pytest.mark.skipif(
    not (ZOO / "ci" / "verify_bundle.py").is_file() or not SCHEMA.is_file(),
    reason="the model zoo's CI (../shared/model-zoo/ci, Project-MONAI/model-zoo at dfae206d) or the official schema "
           "(../shared/schemas/meta_schema_20240725.json) is not beside this clone; see ../shared/model-zoo/README.md")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def zoo_layout(where: Path, bundles: dict[str, Path]) -> Path:
    """``where/models/<name>`` copies of the bundles and the zoo's ``model_info.json``; the official schema where
    the zoo's ``prepare_schema`` downloads it to (MONAI's ``download_url`` then skips the download: offline)."""
    models = where / "models"
    models.mkdir(parents=True)
    shutil.copy(ZOO / "models" / "model_info.json", models / "model_info.json")
    for name, src in bundles.items():
        shutil.copytree(src, models / name, ignore=shutil.ignore_patterns("models", "logs", "eval", "predictions"))
    meta = json.loads((next(iter(bundles.values())) / "configs" / "metadata.json").read_text())
    shutil.copy(SCHEMA, models / meta["schema"].split("/")[-1])
    return models


def verify(models: Path, mode: str, bundles: list[str], exclusions: Path = EXCLUSIONS) -> dict[str, dict]:
    """The zoo's prepare_schema + ``verify`` + get_requirements on each bundle (one process): bundle -> result."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "zoo_ci_driver.py"), str(ZOO), str(models), mode,
                        str(exclusions), *bundles], cwd=models.parent, capture_output=True, text=True,
                       env={**_env(), "ALLOW_MONAI_RC": "true"}, timeout=1200)
    results = {d["bundle"]: d for d in (json.loads(ln[len("ZOO_RESULT "):]) for ln in r.stdout.splitlines()
                                         if ln.startswith("ZOO_RESULT "))}
    assert set(results) == set(bundles), r.stdout[-3000:] + r.stderr[-3000:]
    return results


BROKEN = {"mhist_empty_url": "an empty large-file url (the old large_files.yml)",
          "mhist_not_excluded": "a bundle the exclusions do not name (no models/model.pt)"}


@pytest.fixture(scope="module")
def min_run(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """One min-mode run on every bundle and on two broken copies of mhist (the checks must be able to fail)."""
    where = tmp_path_factory.mktemp("zoo")
    src = ROOT / "bundles" / "mhist_adapter_tpp"
    models = zoo_layout(where, {**{b: ROOT / "bundles" / b for b in BUNDLES}, **{b: src for b in BROKEN}})
    (models / "mhist_empty_url" / "large_files.yml").write_text(
        'large_files:\n  - path: "models/medcoss_vit_b16.pth"\n    url: ""\n    hash_val: ""\n    hash_type: ""\n')
    exclusions = json.loads(EXCLUSIONS.read_text())
    exclusions["exclude_verify_preferred_files_list"]["mhist_empty_url"] = "test: fails earlier, at the download"
    (where / "zoo_ci.json").write_text(json.dumps(exclusions))
    return models, verify(models, "min", [*BUNDLES, *BROKEN], where / "zoo_ci.json")


def test_prepare_schema_used_the_official_file_offline(min_run):
    models, _ = min_run
    for b in BUNDLES:
        assert (models / b / "eval" / "schema.json").read_bytes() == SCHEMA.read_bytes(), b


@pytest.mark.parametrize("bundle", BUNDLES)
def test_zoo_verify_bundle_min_mode(bundle, min_run):
    result = min_run[1][bundle]
    assert result["ok"], result.get("traceback", result["error"])


def test_zoo_ci_fails_a_broken_bundle(min_run):
    """The same run fails a bundle with an empty large-file url and one the exclusions do not name, so the passes
    above are the zoo's verdicts."""
    results = min_run[1]
    assert not results["mhist_empty_url"]["ok"] and "unknown url type: ''" in results["mhist_empty_url"]["error"]
    assert not results["mhist_not_excluded"]["ok"]
    assert "models/model.pt is not existing" in results["mhist_not_excluded"]["error"]


@pytest.mark.slow
def test_zoo_verify_bundle_full_mode_on_cpu(tmp_path):
    """Full mode: also MONAI's ``verify_net_in_out`` on inference.json's default network with metadata's declared
    shapes (3D: ``64*n``, STU-Net-B's five stride-2 levels need >= 2 voxels left at the bottleneck)."""
    models = zoo_layout(tmp_path, {b: ROOT / "bundles" / b for b in FULL_MODE})
    results = verify(models, "full", FULL_MODE)
    for b in FULL_MODE:
        assert results[b]["ok"], results[b].get("traceback", results[b]["error"])


def test_zoo_requirements_are_installable_offline(min_run):
    """``ci/get_bundle_requirements.py`` (as the zoo's premerge runs it, ALLOW_MONAI_RC=true) -> ``pip install -r``:
    every pin is satisfied by the installed stack. (``tpp-monai`` is served by no index yet: install it from this
    repository first, as each bundle's README says.)"""
    files = []
    for b in BUNDLES:
        req = min_run[0].parent / f"requirements_{b}.txt"
        lines = req.read_text().split()
        assert f"tpp-monai=={importlib.metadata.version('tpp-monai')}" in lines, (b, lines)
        assert any(re.match(r"monai>=[\d.]+rc1,<", ln) for ln in lines), (b, lines)
        files += ["-r", str(req)]
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", *files],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Would install" not in r.stdout, r.stdout[-2000:]  # all already satisfied, nothing to fetch


def test_zoo_exclusions_are_the_zoos_lists_and_stated_in_each_readme():
    """Every entry of zoo_ci.json is a list the zoo's CI reads, names a bundle, and the bundle's README says so."""
    source = (ZOO / "ci" / "bundle_custom_data.py").read_text()
    exclusions = {k: v for k, v in json.loads(EXCLUSIONS.read_text()).items() if not k.startswith("_")}
    assert exclusions, EXCLUSIONS
    for name, entries in exclusions.items():
        assert re.search(rf"^{name} = \[", source, re.M), f"{name} is not a list in the zoo's bundle_custom_data.py"
        for bundle, why in entries.items():
            assert bundle in BUNDLES and why, (name, bundle)
            readme = (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()
            section = readme.split("## Model zoo CI", 1)
            assert len(section) == 2, f"bundles/{bundle}/docs/README.md has no '## Model zoo CI' section"
            assert f"`{name}`" in section[1].split("\n## ", 1)[0], f"bundles/{bundle}/docs/README.md omits {name}"
