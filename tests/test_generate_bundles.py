"""Self-contained bundles: configs generated from bundles/common (in sync, no macro or outside path left, composed with
MONAI's own merge: equal to ``ConfigParser.load_config_files`` of the same parts), a new 2D bundle from 3 source files,
README and metadata prose from one shared source, one version everywhere; a bundle folder runs from its own root,
from the repository root and as a zipped copy unzipped elsewhere; nested command-line overrides
(--train#trainer#max_epochs) reach the trainer."""

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
ALL_BUNDLES = sorted(p.stem for p in (ROOT / "bundles" / "common" / "specs").glob("*.json"))
COMMON = ROOT / "bundles" / "common"
sys.path.insert(0, str(ROOT / "scripts"))
import generate_bundles as gen  # noqa: E402


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


def _strings_and_keys(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _strings_and_keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings_and_keys(v)
    elif isinstance(node, str):
        yield node


def test_sources_use_no_macro_language():
    """No ``%file::id`` macro, ``_from`` / ``_from_ids`` / ``_add`` key anywhere in the bundle sources (MONAI's
    own ``%`` macro neither: a generated config must not reach outside its bundle)."""
    sources = sorted(COMMON.rglob("*.json"))
    assert len(sources) > 10
    for path in sources:
        for s in _strings_and_keys(json.loads(path.read_text())):
            assert not s.startswith("%"), (path, s)
            assert s not in ("_from", "_from_ids", "_add"), (path, s)
    # one JSON source (+ its README source) per bundle, no per-config spec folders
    assert not [p for p in (COMMON / "specs").iterdir() if p.is_dir()]
    assert sorted(p.stem for p in (COMMON / "specs").glob("*.md")) == ALL_BUNDLES


def test_composition_is_monai_load_config_files(tmp_path):
    """Every generated config equals what MONAI's ``ConfigParser.load_config_files`` gives for the recipe's parts
    written as files (templates, inline blocks, the bundle's values, its own section), apart from the leading
    ``bundle_root`` and the key order (the bundle's own ids first)."""
    from monai.bundle import ConfigParser

    checked = 0
    for bundle in ALL_BUNDLES:
        spec = gen.load_spec(bundle)
        for name, parts in spec["_recipe"].items():
            if name == "metadata.json":
                continue
            files = []
            for i, part in enumerate([*parts, spec.get("configs", {}).get(name, {})]):
                if part == "values":
                    part = spec.get("values", {})
                elif isinstance(part, str):
                    part = {k: v for k, v in json.loads((COMMON / part).read_text()).items() if k != "_comment"}
                if any("#" in k for k in part) and i == 0:
                    break  # an overlay whose keys are override ids (multi_gpu.json): nothing to merge into
                f = tmp_path / f"{bundle}_{name}_{i}.json"
                f.write_text(json.dumps(part))
                files.append(str(f))
            else:
                merged = ConfigParser.load_config_files(files)
                generated = json.loads((ROOT / "bundles" / bundle / "configs" / name).read_text())
                generated.pop("bundle_root", None)
                assert generated == merged, (bundle, name)
                checked += 1
    assert checked >= 8 * 4


def _generator_in(monkeypatch, repo: Path) -> None:
    """Point the generator (in this process: no interpreter start-up) at the repository copy ``repo``."""
    common = repo / "bundles" / "common"
    for name, value in {"ROOT": repo, "COMMON": common, "SPECS": common / "specs", "DOCS": common / "docs"}.items():
        monkeypatch.setattr(gen, name, value)


def test_a_new_2d_bundle_is_three_source_files(tmp_path, monkeypatch):
    """docs/CONTRIBUTING.md's recipe: specs/<name>.json + specs/<name>.md + bundles/<name>/docs/data_license.txt
    give a complete bundle: the same files as an existing bundle of its recipe, configs equal but for its own values."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "LICENSE", repo)
    shutil.copytree(COMMON, repo / "bundles" / "common")
    spec = json.loads((COMMON / "specs" / "qata_adapter_tpp.json").read_text())
    spec["values"].update({"dataset_dir": "/data/toy", "num_classes": 3, "class_names": ["bg", "a", "b"]})
    spec["configs"]["train.json"]["num_iterations"] = 10
    spec["metadata"]["name"] = "toy"
    (repo / "bundles" / "common" / "specs" / "toy_adapter_tpp.json").write_text(json.dumps(spec))
    (repo / "bundles" / "common" / "specs" / "toy_adapter_tpp.md").write_text(
        '{% extends "docs/readme_2d.md" %}\n{% block title %}Toy{% endblock %}\n{% block data %}Make it.{% endblock %}\n')
    (repo / "bundles" / "toy_adapter_tpp" / "docs").mkdir(parents=True)
    (repo / "bundles" / "toy_adapter_tpp" / "docs" / "data_license.txt").write_text("CC0\n")
    _generator_in(monkeypatch, repo)
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    new, ref = repo / "bundles" / "toy_adapter_tpp", ROOT / "bundles" / "qata_adapter_tpp"
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()  # noqa: E731
                             and not {"models", "logs", "eval", "predictions", "cache", "figures"} & set(p.parts))
    assert files(new) == files(ref)
    for name in ("train.json", "inference.json", "tpp_pretrain.json", "evaluate.json", "multi_gpu_train.json"):
        a = json.loads((new / "configs" / name).read_text())
        b = json.loads((ref / "configs" / name).read_text())
        b.update({k: v for k, v in {**spec["values"], "num_iterations": 10}.items() if k in b})
        if "bundle_root" in b:
            b["bundle_root"] = "$tpp_monai.bundle.resolve_bundle_root('toy_adapter_tpp')"
        assert a == b, name
    readme = (new / "docs" / "README.md").read_text()
    assert readme.startswith("# Toy: ViT + Adapter") and "B=bundles/toy_adapter_tpp/configs" in readme
    assert "| batch / iterations | 16 / 10 |" in readme and "## Model zoo CI" in readme
    assert json.loads((new / "configs" / "metadata.json").read_text())["name"] == "toy"


def test_metadata_and_readme_state_the_same_pixel_space():
    """The prose comes from one source (bundles/common/docs/prose.json): with a MedCoSS checkpoint a segmentation
    bundle z-scores each image and a classification bundle feeds [0, 1], in metadata.json as in the README
    (before, every metadata.json said 'none for MedCoSS', also for the segmentation bundles)."""
    all_prose = json.loads((COMMON / "docs" / "prose.json").read_text())
    prose = all_prose["pixel_space"]
    for bundle in ALL_BUNDLES:
        folder = ROOT / "bundles" / bundle
        train = json.loads((folder / "configs" / "train.json").read_text())
        if "task" not in train:
            continue  # nnU-Net bundles: nnU-Net's CT normalisation
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        readme = (folder / "docs" / "README.md").read_text()
        if str(train["network_def"].get("_target_", "")).startswith("tpp_monai.bundle.build_cnn_"):
            # the 2D CNN bundles (EfficientNet-Lite0): the weights' own pixel space, one sentence for both files
            assert meta["image_classes"].endswith(all_prose["pixel_space_cnn"]), bundle
            assert all_prose["pixel_space_cnn"] in readme, bundle
            continue
        assert meta["image_classes"].endswith(prose[train["task"]]), bundle
        assert ("z-score" in meta["image_classes"]) == (train["task"] == "seg"), bundle
        if "docs/readme_2d.md" not in (COMMON / "specs" / f"{bundle}.md").read_text():
            continue  # the demo's own README (a timm-MAE backbone: ImageNet statistics) says nothing of MedCoSS's
        if train["task"] == "seg":
            assert "segmentation (this bundle): **per-image z-score" in readme, bundle
        else:
            assert "classification (this bundle): `none`" in readme, bundle


def test_standalone_inference_resolves_its_datalist(tmp_path):
    """inference.json alone (model-zoo shape) defines every id its datalist needs (demo_ct's referred to
    @datalist_name without defining it)."""
    from monai.bundle import ConfigParser

    for bundle in ALL_BUNDLES:
        p = ConfigParser()
        p.read_config(str(ROOT / "bundles" / bundle / "configs" / "inference.json"))
        p["bundle_root"] = str(tmp_path)
        if "datalist" in p:
            assert p.get_parsed_content("datalist").endswith(".json"), bundle


def test_one_version_everywhere():
    """pyproject.toml, tpp_monai.__version__, every bundle's tpp-monai pin and the CHANGELOG agree."""
    import tomllib

    import tpp_monai

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tpp_monai.__version__ == version
    assert f"\n## {version} (" in (ROOT / "CHANGELOG.md").read_text()
    for bundle in ALL_BUNDLES:
        meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
        assert meta["required_packages_version"]["tpp-monai"] == version, bundle
        assert meta["version"] in meta["changelog"] and next(iter(meta["changelog"])) == meta["version"], bundle
        readme = (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()
        assert f"tpp-monai=={version}" in readme, bundle


def test_bad_source_names_the_file_and_the_fix(tmp_path, monkeypatch):
    specs = tmp_path / "bundles" / "common" / "specs"
    shutil.copytree(COMMON, tmp_path / "bundles" / "common")
    _generator_in(monkeypatch, tmp_path)
    spec = json.loads((specs / "qata_adapter_tpp.json").read_text())
    (specs / "qata_adapter_tpp.json").write_text(json.dumps({**spec, "recipe": "2d_sge"}))
    with pytest.raises(gen.TemplateError, match=r"specs/qata_adapter_tpp.json: recipe '2d_sge' is not one of"):
        gen.load_spec("qata_adapter_tpp")
    (specs / "qata_adapter_tpp.json").write_text(json.dumps({**spec, "config": {}}))
    with pytest.raises(gen.TemplateError, match=r"specs/qata_adapter_tpp.json: unknown keys \['config'\]"):
        gen.load_spec("qata_adapter_tpp")


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
