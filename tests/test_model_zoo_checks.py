"""The MONAI model zoo's CI checks (Project-MONAI/model-zoo ``ci/verify_bundle.py``), re-stated for our bundles.

What the zoo checks and where it is checked here:
- ``verify_bundle_directory``: ``configs/metadata.json`` exists; large files are listed in ``large_files.yml``.
  The zoo's real ``ci/`` runs on every bundle in ``tests/test_zoo_ci.py``; these re-statements stay for what the
  zoo leaves out (README sections, logging.conf) and for clones without ``../shared``.
  Plus the files the zoo's contributing rules ask of every bundle: ``LICENSE``, ``docs/README.md``,
  ``configs/logging.conf`` (MONAI warns on every run without it) and ``docs/data_license.txt``.
- ``verify_version_changes``: ``version`` and ``changelog`` present, the version is a changelog entry.
- ``verify_metadata_format``: metadata against the official schema ``meta_schema_20240725.json``. The schema file
  is not vendored (files fetched from public repositories may not be committed to this project); ``check_metadata_schema``
  re-states every rule of it in Python and always runs. When a copy of the official file is at hand (the path in
  ``TPP_MONAI_META_SCHEMA``, or ``../shared/schemas/meta_schema_20240725.json`` beside the repository) the metadata is
  also validated with ``jsonschema`` against it, and ``test_restatement_agrees_with_the_official_schema`` checks that
  the re-statement and the official file give the same verdict on every metadata mutation in ``SCHEMA_CASES``.
- ``verify_data_shape`` / ``verify_torchscript``: MONAI's ``verify_net_in_out`` (also on ``inference.json`` alone, with MONAI's
  Train/InferProperties checks, in ``tests/test_bundle_inference.py``) / ``ckpt_export`` in
  ``tests/test_bundles.py`` and ``tests/test_torchscript_export.py``.
- README sections of the zoo's readme template (Model, Data, Training, Performance, System configuration,
  Limitations, Citation).

Each check returns a list of problems, so the negative tests below can show that a broken bundle is reported.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
SCHEMA_COPY = Path(os.environ.get("TPP_MONAI_META_SCHEMA")
                   or ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json")
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
README_SECTIONS = ("Model", "Data", "Training", "Performance", "System configuration", "Limitations", "Citation")
# meta_schema_20240725.json: required top-level keys and the JSON types of the keys it declares
SCHEMA_REQUIRED = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                   "task", "description", "authors", "copyright", "network_data_format")
SCHEMA_TYPES = {
    "schema": str, "version": str, "changelog": dict, "monai_version": str, "pytorch_version": str,
    "numpy_version": str, "required_packages_version": dict, "task": str, "description": str, "authors": str,
    "copyright": str, "data_source": str, "data_type": str, "image_classes": str, "label_classes": str,
    "pred_classes": str, "eval_metrics": dict, "intended_use": str, "references": list, "supported_apps": dict,
    "network_data_format": dict,
}
TENSOR_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")


def check_required_files(bundle: Path) -> list[str]:
    problems = []
    for rel in ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "docs/data_license.txt", "LICENSE"):
        if not (bundle / rel).is_file():
            problems.append(f"missing {rel}")
    lic = bundle / "LICENSE"
    if lic.is_file():
        text = lic.read_text()
        if "Apache License" not in text or "Version 2.0, January 2004" not in text or "END OF TERMS" not in text:
            problems.append("LICENSE is not the Apache-2.0 text")
    dl = bundle / "docs" / "data_license.txt"
    if dl.is_file() and not re.search(r"licen[cs]e", dl.read_text(), re.I):
        problems.append("docs/data_license.txt does not state a licence")
    return problems


def check_logging_conf(bundle: Path) -> list[str]:
    """MONAI applies ``configs/logging.conf`` with ``logging.config.fileConfig``: the standard bundle layout."""
    path = bundle / "configs" / "logging.conf"
    if not path.is_file():
        return ["missing configs/logging.conf"]
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(path)
    problems = [f"logging.conf lacks [{s}]" for s in ("loggers", "handlers", "formatters", "logger_root")
                if not cp.has_section(s)]
    if not problems:
        for h in cp["handlers"]["keys"].split(","):
            if not cp.has_section(f"handler_{h.strip()}"):
                problems.append(f"logging.conf lacks [handler_{h.strip()}]")
    return problems


def check_large_files(bundle: Path) -> list[str]:
    """``large_files.yml`` in the zoo's format: a list of {path, url, hash_val, hash_type} under ``large_files``.

    The zoo's CI downloads every entry and refuses an empty ``url``, so a file without a stable URL is not listed:
    an empty list is allowed when the file's comments say where the files are published."""
    import yaml

    path = bundle / "large_files.yml"
    if not path.is_file():
        return ["missing large_files.yml"]
    data = yaml.safe_load(path.read_text())
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return ["large_files.yml has no 'large_files' list"]
    if not entries and "#" not in path.read_text():
        return ["large_files.yml lists no file without saying where the files are published"]
    problems = []
    for e in entries:
        missing = {"path", "url", "hash_val", "hash_type"} - set(e)
        if missing:
            problems.append(f"large_files entry {e} lacks {sorted(missing)}")
            continue
        if not str(e["url"]).startswith("https://"):
            problems.append(f"large_files url {e['url']!r} is not https (the zoo's CI downloads every entry)")
        if Path(e["path"]).is_absolute() or ".." in Path(e["path"]).parts:
            problems.append(f"large_files path {e['path']!r} is not inside the bundle")
    return problems


def check_version_changelog(meta: dict) -> list[str]:
    problems = [f"metadata lacks '{k}'" for k in ("version", "changelog") if k not in meta]
    if problems:
        return problems
    if meta["version"] not in meta["changelog"]:
        problems.append(f"version {meta['version']} is not in the changelog")
    if not re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]):
        problems.append(f"version {meta['version']!r} is not MAJOR.MINOR.PATCH")
    newest = max(meta["changelog"], key=lambda v: tuple(int(x) for x in v.split(".")))
    if newest != meta["version"]:
        problems.append(f"version {meta['version']} is older than changelog entry {newest}")
    return problems


def _is_int(v: object) -> bool:
    """JSON Schema's ``integer`` (draft 2019-09): not a boolean; a float with an integral value counts."""
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))


def _is_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _tensor_problems(where: str, t: object) -> list[str]:
    """The schema's ``argument``: a number, string or boolean, or a tensor description."""
    if not isinstance(t, dict):
        return [] if isinstance(t, (int, float, str, bool)) else [f"{where} is not a tensor description"]
    problems = [f"{where} lacks '{k}'" for k in TENSOR_REQUIRED if k not in t]
    for k in ("type", "format", "dtype"):
        if k in t and not isinstance(t[k], str):
            problems.append(f"{where}.{k} is not a string")
    if "num_channels" in t and not _is_int(t["num_channels"]):
        problems.append(f"{where}.num_channels is not an integer")
    for k in ("spatial_shape", "value_range"):
        if k in t and not isinstance(t[k], list):
            problems.append(f"{where}.{k} is not a list")
    if isinstance(t.get("spatial_shape"), list) and not all(isinstance(v, str) or _is_int(v) for v in t["spatial_shape"]):
        problems.append(f"{where}.spatial_shape items must be integers or strings")
    if isinstance(t.get("value_range"), list) and not all(_is_number(v) for v in t["value_range"]):
        problems.append(f"{where}.value_range items must be numbers")
    if "is_patch_data" in t and not isinstance(t["is_patch_data"], bool):
        problems.append(f"{where}.is_patch_data is not a boolean")
    if "channel_def" in t and not isinstance(t["channel_def"], dict):
        problems.append(f"{where}.channel_def is not an object")
    return problems


def restated_schema_problems(meta: object) -> list[str]:
    """Every rule of ``meta_schema_20240725.json``, re-stated: required keys, the declared keys' JSON types, and
    ``network_data_format`` (and any other ``<name>_data_format``) as inputs/outputs of tensor descriptions."""
    if not isinstance(meta, dict):
        return ["metadata is not a JSON object"]
    problems = [f"metadata lacks required '{k}'" for k in SCHEMA_REQUIRED if k not in meta]
    for k, typ in SCHEMA_TYPES.items():
        if k in meta and not isinstance(meta[k], typ):
            problems.append(f"metadata '{k}' must be {typ.__name__}")
    if isinstance(meta.get("references"), list) and not all(isinstance(r, str) for r in meta["references"]):
        problems.append("metadata 'references' items must be strings")
    for key in [k for k in meta if k == "network_data_format" or re.fullmatch(r"[_a-zA-Z0-9]+_data_format", k)]:
        fmt = meta[key]
        if not isinstance(fmt, dict):
            problems.append(f"{key} is not an object")
            continue
        problems += [f"{key} needs '{part}'" for part in ("inputs", "outputs") if part not in fmt]
        for part in ("inputs", "outputs", "post_processed_outputs"):
            if part not in fmt:
                continue
            if not isinstance(fmt[part], dict):
                problems.append(f"{key}.{part} is not an object")
                continue
            for name, t in fmt[part].items():
                problems += _tensor_problems(f"{key}.{part}.{name}", t)
    return problems


def official_schema_problems(meta: object) -> list[str] | None:
    """Validation against the official schema file, or None when no copy of it is at hand."""
    if not SCHEMA_COPY.is_file():
        return None
    import jsonschema

    schema = json.loads(SCHEMA_COPY.read_text())
    return [e.message for e in jsonschema.Draft201909Validator(schema).iter_errors(meta)]


def check_metadata_schema(meta: dict) -> list[str]:
    """The re-stated schema always; the official file too when a copy is at hand."""
    return restated_schema_problems(meta) + (official_schema_problems(meta) or [])


def check_metadata_content(meta: dict) -> list[str]:
    """Our own consistency rules: the schema URL, versions of the pinned stack, and sourced eval_metrics."""
    import monai
    import torch

    problems = []
    if meta.get("schema") != SCHEMA_URL:
        problems.append(f"schema should be {SCHEMA_URL}")
    if meta.get("monai_version") != monai.__version__:
        problems.append(f"monai_version {meta.get('monai_version')} != installed {monai.__version__}")
    if meta.get("pytorch_version") != torch.__version__.split("+")[0]:
        problems.append(f"pytorch_version {meta.get('pytorch_version')} != installed {torch.__version__}")
    for pkg in meta.get("required_packages_version", {}):
        try:
            importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"required package {pkg} is not installed")
    metrics = meta.get("eval_metrics", {})
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in metrics.values()):
        problems.append("eval_metrics values must be numbers (or null when no figure exists)")
    if any(v is not None for v in metrics.values()) and "eval_metrics_source" not in meta:
        problems.append("eval_metrics are filled but 'eval_metrics_source' does not say where they come from")
    return problems


def check_readme_sections(bundle: Path) -> list[str]:
    path = bundle / "docs" / "README.md"
    if not path.is_file():
        return ["missing docs/README.md"]
    heads = [ln.lstrip("#").strip().lower() for ln in path.read_text().splitlines() if ln.startswith("#")]
    return [f"docs/README.md has no '{s}' section" for s in README_SECTIONS
            if not any(re.match(rf"(\d+\.\s*)?{s.lower()}\b", h) for h in heads)]


def all_problems(bundle: Path) -> list[str]:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return (check_required_files(bundle) + check_logging_conf(bundle) + check_large_files(bundle)
            + check_version_changelog(meta) + check_metadata_schema(meta) + check_metadata_content(meta)
            + check_readme_sections(bundle))


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_passes_model_zoo_checks(bundle):
    assert all_problems(ROOT / "bundles" / bundle) == []


def test_every_bundle_folder_is_checked():
    folders = sorted(p.name for p in (ROOT / "bundles").iterdir() if p.is_dir() and p.name != "common")
    assert BUNDLES == folders and len(BUNDLES) >= 8


def test_logging_conf_is_accepted_by_monai(tmp_path):
    """MONAI's own loader (``logging.config.fileConfig``) accepts the file; the root logger is restored after."""
    import logging
    import logging.config

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        logging.config.fileConfig(ROOT / "bundles" / BUNDLES[0] / "configs" / "logging.conf",
                                  disable_existing_loggers=False)
        assert root.level == logging.INFO and any(isinstance(h, logging.StreamHandler) for h in root.handlers)
    finally:
        for h in list(root.handlers):
            if h not in saved[1]:
                root.removeHandler(h)
        root.setLevel(saved[0])


def test_eval_metrics_are_the_papers_published_values():
    """Adapter w/ TPP rows of the TPP paper (../shared/METHOD.md), as fractions; 3D: Table 10."""
    expect = {
        "mhist_adapter_tpp": {"accuracy": 0.8342, "auc": 0.9138, "f1_macro": 0.8221},
        "oct_c8_adapter_tpp": {"accuracy": 0.9661, "auc": 0.9977, "f1_macro": 0.9661},
        "chestxray_pa_adapter_tpp": {"accuracy": 0.9738, "auc": 0.9963, "f1_macro": 0.9737},
        "glas_adapter_tpp": {"mean_dice": 0.8941, "hd95_pixels": 44.25},
        "qata_adapter_tpp": {"mean_dice": 0.7950, "hd95_pixels": 29.28},
        "lits_convadapter_tpp": {"mean_dice": 0.7795, "liver_dice": None, "tumour_dice": 0.6064},
        "kits_convadapter_tpp": {"mean_dice": 0.8273, "kidney_dice": None, "tumour_dice": 0.6966},
    }
    for bundle, want in expect.items():
        meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
        assert meta["eval_metrics"] == want, bundle
        assert "NOT measured" in meta["eval_metrics_source"], bundle


# --------------------------------------------------------------------------- the checks can fail
@pytest.fixture
def broken(tmp_path):
    src = ROOT / "bundles" / "mhist_adapter_tpp"
    dst = tmp_path / "mhist_adapter_tpp"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "logs", "eval", "predictions"))
    assert all_problems(dst) == []
    return dst


def test_missing_files_are_reported(broken):
    for rel in ("LICENSE", "configs/logging.conf", "docs/data_license.txt", "large_files.yml"):
        (broken / rel).unlink()
    problems = " | ".join(all_problems(broken))
    for rel in ("LICENSE", "configs/logging.conf", "docs/data_license.txt", "large_files.yml"):
        assert f"missing {rel}" in problems


def test_bad_metadata_is_reported(broken):
    path = broken / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["version"] = "9.9.9"  # not in the changelog
    del meta["authors"]
    meta["network_data_format"]["inputs"]["image"]["value_range"] = ["low", "high"]
    del meta["eval_metrics_source"]
    path.write_text(json.dumps(meta))
    problems = " | ".join(all_problems(broken))
    assert "9.9.9 is not in the changelog" in problems
    assert "authors" in problems
    assert "value_range" in problems or "is not of type 'number'" in problems
    assert "eval_metrics_source" in problems


def test_readme_without_template_sections_is_reported(broken):
    readme = broken / "docs" / "README.md"
    text = readme.read_text()
    readme.write_text(re.sub(r"^## (Performance|Limitations)$", r"## Other", text, flags=re.M))
    problems = check_readme_sections(broken)
    assert problems == ["docs/README.md has no 'Performance' section", "docs/README.md has no 'Limitations' section"]


def test_bad_large_files_are_reported(broken):
    (broken / "large_files.yml").write_text("large_files:\n  - path: /abs/model.pt\n    url: http://x\n")
    problems = check_large_files(broken)
    assert any("hash_val" in p for p in problems)
    (broken / "large_files.yml").write_text(
        "large_files:\n  - {path: ../model.pt, url: 'http://x', hash_val: '', hash_type: ''}\n")
    problems = check_large_files(broken)
    assert any("not https" in p for p in problems) and any("not inside the bundle" in p for p in problems)
    (broken / "large_files.yml").write_text(
        "large_files:\n  - {path: models/model.pt, url: '', hash_val: '', hash_type: ''}\n")
    assert check_large_files(broken) == ["large_files url '' is not https (the zoo's CI downloads every entry)"]
    (broken / "large_files.yml").write_text("large_files: []\n")
    assert check_large_files(broken) == ["large_files.yml lists no file without saying where the files are published"]


# ------------------------------------------- the re-stated schema against the official one (when at hand)
def _nd(meta: dict) -> dict:
    return meta["network_data_format"]


def _tensor(meta: dict) -> dict:
    return _nd(meta)["inputs"]["image"]


# (what the mutation does, the mutation, whether the official schema accepts the result)
SCHEMA_CASES = [
    ("unchanged", lambda m: None, True),
    ("no authors", lambda m: m.pop("authors"), False),
    ("no network_data_format", lambda m: m.pop("network_data_format"), False),
    ("no changelog (optional)", lambda m: m.pop("changelog"), True),
    ("version is a number", lambda m: m.update(version=1), False),
    ("references holds a number", lambda m: m.update(references=["a", 2]), False),
    ("eval_metrics is a list", lambda m: m.update(eval_metrics=[0.5]), False),
    ("extra key (allowed)", lambda m: m.update(eval_metrics_source="x"), True),
    ("no outputs", lambda m: _nd(m).pop("outputs"), False),
    ("inputs is a list", lambda m: _nd(m).update(inputs=[]), False),
    ("input is a plain number", lambda m: _nd(m)["inputs"].update(image=3), True),
    ("input is a list", lambda m: _nd(m)["inputs"].update(image=[1, 2]), False),
    ("tensor without dtype", lambda m: _tensor(m).pop("dtype"), False),
    ("num_channels is a string", lambda m: _tensor(m).update(num_channels="3"), False),
    ("num_channels is a boolean", lambda m: _tensor(m).update(num_channels=True), False),
    ("num_channels is 3.0", lambda m: _tensor(m).update(num_channels=3.0), True),
    ("spatial_shape holds a float", lambda m: _tensor(m).update(spatial_shape=[2.5, "16*n"]), False),
    ("spatial_shape holds a boolean", lambda m: _tensor(m).update(spatial_shape=[True, 16]), False),
    ("value_range holds a string", lambda m: _tensor(m).update(value_range=[0, "1"]), False),
    ("value_range is empty", lambda m: _tensor(m).update(value_range=[]), True),
    ("is_patch_data is a string", lambda m: _tensor(m).update(is_patch_data="no"), False),
    ("channel_def is a list", lambda m: _tensor(m).update(channel_def=["R"]), False),
    ("post_processed_outputs tensor lacks format",
     lambda m: _nd(m).update(post_processed_outputs={"pred": {k: v for k, v in _tensor(m).items() if k != "format"}}),
     False),
    ("another *_data_format lacks inputs", lambda m: m.update(extra_data_format={"outputs": {}}), False),
    ("a key merely containing data_format", lambda m: m.update(**{"data-format": 1}), True),
]


def _mutated(mutate) -> dict:
    meta = json.loads((ROOT / "bundles" / "mhist_adapter_tpp" / "configs" / "metadata.json").read_text())
    mutate(meta)
    return meta


@pytest.mark.parametrize("what,mutate,valid", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_restated_schema_verdicts(what, mutate, valid):
    problems = restated_schema_problems(_mutated(mutate))
    assert (problems == []) == valid, problems


@pytest.mark.skipif(not SCHEMA_COPY.is_file(), reason="no copy of the official meta_schema_20240725.json at hand "
                    "(set TPP_MONAI_META_SCHEMA to its path)")
@pytest.mark.parametrize("what,mutate,valid", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_restatement_agrees_with_the_official_schema(what, mutate, valid):
    meta = _mutated(mutate)
    assert (official_schema_problems(meta) == []) == valid
    assert (restated_schema_problems(meta) == []) == valid
