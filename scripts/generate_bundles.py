#!/usr/bin/env python
"""Write every bundle's configs/, metadata.json and docs/README.md from bundles/common/, so each bundle folder is
self-contained.

Sources (edit these, never the generated files):
  bundles/common/specs/<bundle>.json   the bundle's own values: "recipe" (a kind in recipes.json), "values" (ids every
                                       standalone config takes), "configs" (ids of one generated config), "metadata"
                                       (its part of metadata.json), "large_files" (a file of bundles/common/large_files/)
  bundles/common/specs/<bundle>.md     its README: a Jinja template that extends a shared one of bundles/common/docs/
  bundles/common/recipes.json          per kind of bundle, the whole-block templates each generated file is made of
  bundles/common/*.json                the templates; bundles/common/docs/prose.json the sentences that the READMEs and
                                       metadata.json share; logging.conf and the repository's LICENSE are copied
Each generated file is MONAI's own merge of its parts, in order (``monai.bundle.utils.merge_kv``, what
``ConfigParser.load_config_files`` does for each file of ``--config_file``: a later id replaces an earlier one, ``+id``
appends to a list or updates a dict, ``a#b`` reaches into a nested id). There is no other syntax: no macros. A template's
``_comment`` documents the template and is not copied. In the output a standalone config (one with "imports") starts with
``bundle_root`` = ``tpp_monai.bundle.resolve_bundle_root('<bundle>')``, then the bundle's own ids, then the templates'.
Strings of metadata.json and the README are rendered with Jinja (context: the bundle's resolved values, its metadata,
prose.json).

    python scripts/generate_bundles.py           # regenerate
    python scripts/generate_bundles.py --check   # exit 1 naming each stale file (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import jinja2
from monai.bundle import ConfigParser
from monai.bundle.utils import merge_kv

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "bundles" / "common"
SPECS = COMMON / "specs"
DOCS = COMMON / "docs"
SPEC_KEYS = {"_comment", "recipe", "values", "configs", "metadata", "large_files"}


class TemplateError(ValueError):
    """A bundle source names a recipe, template or file that does not exist, or has an unknown key."""


def _read_json(path: Path, where: str) -> Any:
    if not path.is_file():
        raise TemplateError(f"{where}: {path.relative_to(ROOT)} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TemplateError(f"{path.relative_to(ROOT)}: not valid JSON ({e})") from e


def compose(parts: list[dict]) -> dict:
    """The parts merged in order as MONAI merges the files of ``--config_file`` (``merge_kv`` on a ConfigParser)."""
    if not parts:
        return {}
    # start from a copy of the first part: its ids are taken literally (an overlay's "validate#sampler" key stays a key)
    parser = ConfigParser(config=copy.deepcopy(parts[0]))
    for part in parts[1:]:
        for k, v in copy.deepcopy(part).items():
            merge_kv(parser, k, v)
    return parser.get()


def _template(name: str, where: str) -> dict:
    body = _read_json(COMMON / name, where)
    return {k: v for k, v in body.items() if k != "_comment"}


def load_spec(bundle: str) -> dict:
    path = SPECS / f"{bundle}.json"
    spec = _read_json(path, bundle)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise TemplateError(f"{path.relative_to(ROOT)}: unknown keys {sorted(unknown)} (allowed: {sorted(SPEC_KEYS)})")
    recipes = _read_json(COMMON / "recipes.json", str(path.relative_to(ROOT)))
    if spec.get("recipe") not in recipes or spec["recipe"] == "_comment":
        raise TemplateError(f"{path.relative_to(ROOT)}: recipe {spec.get('recipe')!r} is not one of "
                            f"{sorted(k for k in recipes if k != '_comment')} (bundles/common/recipes.json)")
    spec["_recipe"] = recipes[spec["recipe"]]
    return spec


def build_json(bundle: str, spec: dict, name: str) -> dict:
    """The content of ``bundles/<bundle>/configs/<name>`` (a config, or metadata.json before its prose is rendered)."""
    where = f"bundles/common/specs/{bundle}.json ({name})"
    values = spec.get("values", {})
    own = spec.get("metadata", {}) if name == "metadata.json" else spec.get("configs", {}).get(name, {})
    parts = []
    for part in spec["_recipe"].get(name, []):
        if part == "values":
            parts.append(values)
        elif isinstance(part, dict):
            parts.append(part)
        else:
            parts.append(_template(part, where))
    out = compose([*parts, own])
    if "imports" not in out:
        return out
    first = [k for k in (*values, *own) if k in out and not k.startswith("+") and "#" not in k and k != "bundle_root"]
    return {"bundle_root": f"$tpp_monai.bundle.resolve_bundle_root('{bundle}')",
            **{k: out[k] for k in dict.fromkeys(first)}, **{k: v for k, v in out.items() if k != "bundle_root"}}


def _render(env: jinja2.Environment, value: Any, ctx: dict) -> Any:
    if isinstance(value, str):
        return env.from_string(value).render(ctx) if "{{" in value or "{%" in value else value
    if isinstance(value, dict):
        return {k: _render(env, v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(env, v, ctx) for v in value]
    return value


def _plain(value: Any) -> Any:
    """A config value as a reader sees it in prose: literals as they are, expressions ('$...') as None."""
    return None if isinstance(value, str) and value.startswith("$") else value


def bundle_files(bundle: str, env: jinja2.Environment) -> dict[Path, str]:
    """Every generated file of one bundle and its content."""
    spec = load_spec(bundle)
    folder = ROOT / "bundles" / bundle
    files: dict[Path, str] = {}
    configs = {}
    names = [n for n in spec["_recipe"] if n != "metadata.json"]
    names += [n for n in spec.get("configs", {}) if n not in names]
    for name in names:
        configs[name] = build_json(bundle, spec, name)
        files[folder / "configs" / name] = json.dumps(configs[name], indent=4) + "\n"
    train = configs.get("train.json", {})
    ctx = {"bundle": bundle, "recipe": spec["recipe"], "task": _plain(train.get("task")),
           "values": {k: _plain(v) for k, v in train.items()}, "configs": configs,
           "prose": _read_json(DOCS / "prose.json", bundle),
           "zoo_ci": {k: v for k, v in _read_json(COMMON / "zoo_ci.json", bundle).items() if not k.startswith("_")}}
    meta = build_json(bundle, spec, "metadata.json")
    meta = _render(env, meta, ctx)
    files[folder / "configs" / "metadata.json"] = json.dumps(meta, indent=4) + "\n"
    ctx["metadata"] = meta
    readme = SPECS / f"{bundle}.md"
    if not readme.is_file():
        raise TemplateError(f"{bundle}: bundles/common/specs/{bundle}.md (its README source) is missing")
    files[folder / "docs" / "README.md"] = env.get_template(f"specs/{bundle}.md").render(ctx).rstrip("\n") + "\n"
    if "large_files" in spec:
        lf = COMMON / "large_files" / spec["large_files"]
        if not lf.is_file():
            raise TemplateError(f"bundles/common/specs/{bundle}.json: large_files names {lf.relative_to(ROOT)}, "
                                f"which does not exist")
        files[folder / "large_files.yml"] = lf.read_text()
    files[folder / "configs" / "logging.conf"] = (COMMON / "logging.conf").read_text()
    files[folder / "LICENSE"] = (ROOT / "LICENSE").read_text()
    return files


def bundles() -> list[str]:
    return sorted(p.stem for p in SPECS.glob("*.json"))


def expected_files() -> dict[Path, str]:
    """Every generated file and its content."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(COMMON)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    files: dict[Path, str] = {}
    for bundle in bundles():
        try:
            files.update(bundle_files(bundle, env))
        except jinja2.TemplateError as e:
            raise TemplateError(f"{bundle}: README or metadata template: {e}") from e
    return files


def _write_atomic(path: Path, text: str) -> None:
    """The project's one atomic writer (tpp_monai.safe_io), so a killed run never leaves half a config."""
    from tpp_monai.safe_io import atomic_write

    atomic_write(path, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text() if path.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.relative_to(ROOT))
        else:
            _write_atomic(path, text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        for p in stale:
            print(f"stale generated file: {p} (edit bundles/common/ or bundles/common/specs/, then run "
                  f"`python scripts/generate_bundles.py`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
