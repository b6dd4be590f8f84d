"""Where a bundle lives: its configs run from the bundle's own root, from the repository root, or unzipped anywhere."""

from __future__ import annotations

from pathlib import Path


class BundleRootError(FileNotFoundError):
    """Neither the current directory nor ``bundles/<name>`` is the bundle: the user must pass ``--bundle_root``."""


def _is_bundle(folder: Path, name: str) -> bool:
    """``folder`` holds this bundle's generated train.json (which names the bundle in its bundle_root line)."""
    train = folder / "configs" / "train.json"
    meta = folder / "configs" / "metadata.json"
    return meta.is_file() and train.is_file() and f"resolve_bundle_root('{name}')" in train.read_text()


def resolve_bundle_root(name: str) -> str:
    """Default ``bundle_root`` of bundle ``name`` (``--bundle_root X`` on the command line replaces it).

    "." when the current directory is this bundle (model-zoo style: run from the bundle's root, also a
    zipped copy unzipped anywhere); ``bundles/<name>`` when run from the repository root; else a clear error.
    """
    if _is_bundle(Path("."), name):
        return "."
    repo = Path("bundles") / name
    if _is_bundle(repo, name):
        return str(repo)
    raise BundleRootError(
        f"cannot find bundle '{name}' from {Path.cwd()}: run from the bundle's folder (the one holding "
        f"configs/metadata.json), from the repository root, or pass --bundle_root <path to the bundle folder>"
    )
