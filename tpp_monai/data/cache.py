"""Cached datasets for the TPP stage and fine-tuning.

Why: TPP runs hundreds of epochs over the same training images; without a cache every epoch
re-reads and re-decodes every PNG and resizes it again. MONAI's caching datasets run the
deterministic prefix of a transform chain once (up to the first random transform) and apply the
random augmentation after the cache, so augmentation still differs every epoch.

``cache``: ``"memory"`` (:class:`monai.data.CacheDataset`, ``cache_rate`` of the items in RAM),
``"disk"`` (:class:`monai.data.PersistentDataset` under ``cache_dir``: data sets larger than RAM,
and the cache survives between runs), ``"none"`` (plain :class:`monai.data.Dataset`).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from monai.data import CacheDataset, Dataset, PersistentDataset

CACHE_MODES = ("memory", "disk", "none")


def cached_dataset(
    data: Sequence, transform: Callable | None = None, cache: str = "memory", cache_rate: float = 1.0,
    cache_dir: str | os.PathLike | None = None, num_workers: int | None = 0, progress: bool = False,
) -> Dataset:
    """A MONAI dataset over ``data`` that caches the deterministic part of ``transform`` (see module doc)."""
    mode = (cache or "none").lower()
    if mode not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}; got {cache!r}")
    if mode == "memory" and cache_rate > 0:
        workers = None if not num_workers else int(num_workers)  # None: MONAI picks the CPU count
        return CacheDataset(list(data), transform=transform, cache_rate=float(cache_rate), num_workers=workers,
                            progress=progress)
    if mode == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs cache_dir (a folder for the cached tensors)")
        os.makedirs(cache_dir, exist_ok=True)
        return PersistentDataset(list(data), transform=transform, cache_dir=cache_dir)
    return Dataset(list(data), transform=transform)
