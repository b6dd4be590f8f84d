"""Cached datasets for the TPP stage and fine-tuning.

Why: TPP runs hundreds of epochs over the same training images; without a cache every epoch
re-reads and re-decodes every PNG and resizes it again. MONAI's caching datasets run the
deterministic prefix of a transform chain once (up to the first random transform) and apply the
random augmentation after the cache, so augmentation still differs every epoch.

``cache``: ``"memory"`` (:class:`monai.data.CacheDataset`, ``cache_rate`` of the items in RAM),
``"disk"`` (:class:`monai.data.PersistentDataset` under ``cache_dir``: data sets larger than RAM,
and the cache survives between runs), ``"none"`` (plain :class:`monai.data.Dataset`).

The disk cache is :class:`SafePersistentDataset`: MONAI 1.6.1 writes an entry in a temporary *directory*
(``/tmp``) and moves it into ``cache_dir``, which is a copy when they are on different disks, so a full disk
or a kill leaves a truncated entry; reading it raises a bare ``EOFError`` / zip error that MONAI does not treat
as corrupt, and every later run fails on it until the folder is deleted. Here an unreadable entry is rebuilt
(with a warning naming it), and entries are written atomically in ``cache_dir`` itself.
"""

from __future__ import annotations

import logging
import os
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD
from monai.utils import convert_to_tensor, look_up_option

CACHE_MODES = ("memory", "disk", "none")
log = logging.getLogger("tpp_monai")


class SafePersistentDataset(PersistentDataset):
    """:class:`monai.data.PersistentDataset` that rebuilds unreadable cache entries and writes them atomically."""

    def _entry(self, item: Any) -> Path:
        return Path(self.cache_dir) / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None:
            return super()._cachecheck(item_transformed)
        from tpp_monai.safe_io import atomic_write, disk_full_error

        entry = self._entry(item_transformed)
        if entry.is_file():
            try:
                return torch.load(entry, weights_only=self.weights_only)
            except PermissionError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated (EOFError, zip error) or otherwise unreadable
                why = (str(e).strip().splitlines() or [""])[0][:160]
                msg = (f"MONAI disk-cache entry {entry} is unreadable ({type(e).__name__}: {why}); rebuilding it "
                       "from its source item (a full disk or a killed run left it truncated)")
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
                entry.unlink(missing_ok=True)
        item = self._pre_transform(deepcopy(item_transformed))
        obj = convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta)
        pickle_module = look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD)
        try:
            atomic_write(entry, lambda f: torch.save(obj, f, pickle_module=pickle_module,
                                                     pickle_protocol=self.pickle_protocol))
        except (OSError, RuntimeError) as e:  # the cache is an optimisation: go on without this entry
            full = disk_full_error(entry, e)
            if full is None and not isinstance(e, PermissionError):
                raise
            msg = f"MONAI disk cache: entry not written ({full or e}); this item is recomputed on every use"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        return item


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
        return SafePersistentDataset(list(data), transform=transform, cache_dir=cache_dir)
    return Dataset(list(data), transform=transform)
