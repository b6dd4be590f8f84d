"""A tiny name -> class registry, one instance per concept (PEFT methods, pretext tasks, backbones, heads).

Adding a component means writing one module that calls ``REGISTRY.register("name")`` on its class;
packages auto-import their modules, so nothing else has to be edited.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to registered objects and gives a helpful error for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.kind} '{key}' is already registered by {self._items[key]!r}")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"Unknown {self.kind} '{name}'. Known {self.kind}s: {known}.")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items


def import_submodules(package_name: str, package_path: list[str]) -> None:
    """Import every module of a package so that their ``register`` calls run."""
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
