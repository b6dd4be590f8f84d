#!/usr/bin/env python
"""Write every bundle's configs/ from the templates, so each bundle folder is self-contained.

Sources (edit these, never the generated files):
  bundles/common/*.json                 shared wiring (ids pulled with ``%bundles/common/<file>.json::<id>``)
  bundles/common/specs/<bundle>/*.json  the bundle's own values, one file per generated config
  bundles/common/logging.conf, LICENSE  copied into every bundle
Each ``%file::id`` macro is replaced by a copy of what it names (recursively), and every standalone config
(one with "imports") gets ``bundle_root`` = ``tpp_monai.bundle.resolve_bundle_root('<bundle>')`` first.
A spec may build on a sibling spec: ``"_from": "train.json"`` + ``"_from_ids": [ids]`` copy those ids (the ones it has) of the
sibling's expansion, ``"_add": {...}`` adds ids (how the standalone inference.json reuses train.json's values).

    python scripts/generate_bundles.py           # regenerate
    python scripts/generate_bundles.py --check   # exit 1 naming each stale file (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "bundles" / "common"
SPECS = COMMON / "specs"
MACRO = re.compile(r"^%(?P<file>[^:#]+\.json)(?:::|#)(?P<id>.+)$")


class TemplateError(ValueError):
    """A spec or template names a file or id that does not exist."""


def _lookup(file: str, ident: str, where: str, cache: dict[str, Any]) -> Any:
    path = ROOT / file
    if file not in cache:
        if not path.is_file():
            raise TemplateError(f"{where}: macro names {file}, which does not exist (paths are from the repository root)")
        cache[file] = json.loads(path.read_text())
    node = cache[file]
    for key in re.split(r"::|#", ident):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise TemplateError(f"{where}: {file} has no id '{ident}' (fix the macro or add the id to {file})")
    return copy.deepcopy(node)


def expand(value: Any, where: str, cache: dict[str, Any], depth: int = 0) -> Any:
    """``value`` with every ``%file::id`` macro replaced by the (expanded) content it names."""
    if depth > 50:
        raise TemplateError(f"{where}: macros nest more than 50 deep (a macro cycle?)")
    if isinstance(value, str):
        m = MACRO.match(value)
        if not m:
            return value
        return expand(_lookup(m["file"], m["id"], where, cache), f"{where} -> {value}", cache, depth + 1)
    if isinstance(value, dict):
        return {k: expand(v, where, cache, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, where, cache, depth) for v in value]
    return value


def render_config(bundle: str, spec: Path, cache: dict[str, Any]) -> str:
    """The generated text of ``bundles/<bundle>/configs/<spec.name>``."""
    where = str(spec.relative_to(ROOT))
    out = expand(json.loads(spec.read_text()), where, cache)
    if "_from" in out:
        base = expand(json.loads((spec.parent / out["_from"]).read_text()), where, cache)
        if "imports" not in base:
            raise TemplateError(f"{where}: _from {out['_from']} is not a standalone config (no imports)")
        rest = {k: v for k, v in out.items() if k not in ("_from", "_from_ids", "_add")}
        # ids the sibling lacks are skipped (feature_size exists for segmentation bundles only)
        out = {**{i: base[i] for i in out.get("_from_ids", []) if i in base}, **out.get("_add", {}), **rest}
    if "imports" in out:
        out = {"bundle_root": f"$tpp_monai.bundle.resolve_bundle_root('{bundle}')",
               **{k: v for k, v in out.items() if k != "bundle_root"}}
    return json.dumps(out, indent=4) + "\n"


def expected_files() -> dict[Path, str]:
    """Every generated file and its content."""
    cache: dict[str, Any] = {}
    files: dict[Path, str] = {}
    logging_conf = (COMMON / "logging.conf").read_text()
    license_text = (ROOT / "LICENSE").read_text()
    for spec_dir in sorted(p for p in SPECS.iterdir() if p.is_dir()):
        bundle = ROOT / "bundles" / spec_dir.name
        if not (bundle / "configs" / "metadata.json").is_file():
            raise TemplateError(f"{spec_dir}: bundles/{spec_dir.name}/configs/metadata.json is missing "
                                f"(each spec folder needs its bundle with a hand-written metadata.json)")
        for spec in sorted(spec_dir.glob("*.json")):
            files[bundle / "configs" / spec.name] = render_config(spec_dir.name, spec, cache)
        files[bundle / "configs" / "logging.conf"] = logging_conf
        files[bundle / "LICENSE"] = license_text
    return files


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
