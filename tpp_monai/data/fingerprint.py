"""A short fingerprint of a training set, recorded in resume files so that a run resumed (or a finished
run re-used) on other images is refused instead of silently returning the old result.

Files are identified by path, size and modification time (cheap: no image is read, so thousands of files
cost a few stat calls); in-memory images (a tensor, arrays in a datalist) by their values.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch


def _update(h: "hashlib._Hash", value: Any, counts: dict[str, int]) -> None:
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(f"<{k}>".encode())
            _update(h, value[k], counts)
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _update(h, v, counts)
        h.update(b"]")
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            h.update(f"s:{path}".encode())
            return
        h.update(f"f:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        counts["files"] += 1
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"t:{t.dtype}:{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes())
        counts["arrays"] += 1
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"a:{a.dtype}:{a.shape}".encode() + a.tobytes())
        counts["arrays"] += 1
    else:
        h.update(f"v:{value!r}".encode())


def dataset_fingerprint(dataset: Any) -> str | None:
    """``"<n> items (<files> files), sha256 <16 hex>"`` over the dataset's items in order, or None for a
    dataset that exposes neither a datalist (``.data``, MONAI datasets) nor in-memory images (``.images``)."""
    items = dataset if isinstance(dataset, torch.Tensor) else getattr(dataset, "data", None)
    if items is None:
        items = getattr(dataset, "images", None)
    if items is None:
        return None
    h, counts = hashlib.sha256(), {"files": 0, "arrays": 0}
    if isinstance(items, torch.Tensor):
        _update(h, items, counts)
        n = len(items)
    else:
        items = list(items)
        for item in items:
            _update(h, item, counts)
        n = len(items)
    kind = f"{counts['files']} files" if counts["files"] or not counts["arrays"] else "in memory"
    return f"{n} items ({kind}), sha256 {h.hexdigest()[:16]}"
