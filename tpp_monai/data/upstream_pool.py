"""The unlabelled *upstream* pool: real images from registry packages that are NOT the downstream domain.

Why a separate pool: the demo and the study pre-train their small ViT with MAE upstream (standing in for
MedCoSS) and then run TPP and fine-tuning on a downstream task. For TPP to have anything to adapt, the
downstream domain must be new to the backbone. The downstream task is tumour segmentation on chest CT and
brain MRI (pyradiomics, :mod:`tpp_monai.data.demo_data`), so this pool holds **no chest CT, no MRI and no
image of a downstream patient**:

* ``invesalius-examples`` (Debian): every slice of the head CT, in two windows (head [-200, 1000] HU and
  wide [-1000, 2000] HU);
* ``pydicom-data==1.0.0`` (PyPI wheel, MIT): computed radiographs (chest ``RG1``, extremity ``RG3``),
  ultrasound (``US1``, ``gdcm-US-ALOKA-16``, ``OBXXXX1A``, frames of the ``color3d_jpeg_baseline`` cine
  clip) and a nuclear-medicine whole-body bone scan (``JPEG2000_UNC``); its CT and MR files are left out
  (their body parts are not recorded, they could be chest CT or brain MRI).

Each image is cut into multi-scale square tiles (the centre square, a 2x2 and a 4x4 grid of it) resized
to ``size`` px, near-constant tiles dropped; 8-bit grey PNGs plus ``unlabelled.json`` (split
``unlabelled``) and a ``manifest.json`` that records every file's source. Entry point:
:func:`build_upstream_pool`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from tpp_monai.safe_io import atomic_write
from tpp_monai.data.demo_data import DemoDataError, _run, fetch_invesalius_deb, read_invesalius_head

DEFAULT_POOL = Path(".tpp_cache/upstream_pool")
POOL_VERSION = 1
PYDICOM_DATA = "pydicom-data==1.0.0"
#: pydicom-data files in the pool: (file stem, frames to use (None: all of a 2D image), grid levels)
POOL_DICOMS: dict[str, tuple[int | None, tuple[int, ...]]] = {
    "RG1_UNCI": (None, (1, 2, 4)),  # chest radiograph (CR), 1955 x 1841
    "RG3_UNCI": (None, (1, 2, 4)),  # extremity radiograph (CR), 1760 x 1760
    "US1_UNCI": (None, (1, 2, 4)),  # ultrasound, RGB 480 x 640
    "gdcm-US-ALOKA-16": (None, (1, 2, 4)),  # ultrasound, 480 x 640
    "OBXXXX1A": (None, (1, 2, 4)),  # obstetric ultrasound, 600 x 800
    "color3d_jpeg_baseline": (4, (1, 2)),  # ultrasound cine, 120 frames: every 4th
    "JPEG2000_UNC": (None, (1, 2)),  # NM whole-body bone scan, 1024 x 256
}
HEAD_WINDOWS = ((-200.0, 1000.0), (-1000.0, 2000.0))


def fetch_pydicom_data(download_dir: Path, verbose: bool = True) -> Path:
    """``pip download --no-deps pydicom-data==1.0.0`` (a wheel, ~34 MB); returns its path."""
    download_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(download_dir.glob("pydicom_data-1.0.0-*.whl"))
    if found:
        return found[0]
    if verbose:
        print(f"[upstream-pool] pip download {PYDICOM_DATA} (~34 MB)", flush=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", PYDICOM_DATA, "-d", str(download_dir)],
         f"pip download {PYDICOM_DATA}")
    found = sorted(download_dir.glob("pydicom_data-1.0.0-*.whl"))
    if not found:
        raise DemoDataError(f"pip download finished but no pydicom_data-1.0.0-*.whl in {download_dir}")
    return found[0]


def _unit(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Grey image to [0, 1]: a fixed window, or the 0.5-99.5 percentiles of the image."""
    a = a.astype(np.float32)
    if lo is None or hi is None:
        lo, hi = (float(v) for v in np.percentile(a, (0.5, 99.5)))
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def read_pool_dicoms(wheel: Path) -> list[tuple[str, np.ndarray]]:
    """(name, grey [0, 1] image) for every frame of :data:`POOL_DICOMS` in the pydicom-data wheel."""
    import pydicom

    out = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            for stem, (every, _) in POOL_DICOMS.items():
                ds = pydicom.dcmread(io.BytesIO(zf.read(f"data_store/data/{stem}.dcm")))
                a = ds.pixel_array
                frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
                if a.ndim == (4 if frames > 1 else 3) and a.shape[-1] == 3:  # RGB: grey
                    if getattr(ds, "PhotometricInterpretation", "").startswith("YBR"):
                        a = a[..., 0]  # luma
                    else:
                        a = a.mean(-1)
                stack = a[::every] if frames > 1 else a[None]
                invert = getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1"
                for i, f in enumerate(stack):
                    u = _unit(f)
                    out.append((f"{stem}_{i:03d}", 1.0 - u if invert else u))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise DemoDataError(f"{wheel}: could not read the pool DICOMs ({e}); delete it and rerun.") from e
    return out


def tiles(img: np.ndarray, levels: tuple[int, ...], size: int, min_std: float = 0.03) -> list[np.ndarray]:
    """Square tiles of ``img`` at each grid level (1: the centre square, n: its n x n grid), ``size`` px.

    A non-square image is first cut into as many side-by-side squares as fit along its long axis.
    Tiles whose standard deviation is below ``min_std`` (blank background) are dropped.
    """
    import torch
    import torch.nn.functional as F

    h, w = img.shape
    s = min(h, w)
    n_sq = max(1, (max(h, w) // s))
    squares = []
    for k in range(n_sq):
        off = (max(h, w) - n_sq * s) // 2 + k * s
        squares.append(img[off:off + s, (w - s) // 2:(w - s) // 2 + s] if h > w else
                       img[(h - s) // 2:(h - s) // 2 + s, off:off + s])
    out = []
    for sq in squares:
        for n in levels:
            t = s // n
            for r in range(n):
                for c in range(n):
                    tile = np.ascontiguousarray(sq[r * t:(r + 1) * t, c * t:(c + 1) * t], dtype=np.float32)
                    if tile.std() < min_std:
                        continue
                    x = torch.from_numpy(tile)[None, None]
                    out.append(F.interpolate(x, size=(size, size), mode="area")[0, 0].numpy())
    return out


def pool_is_complete(pool: Path, size: int) -> bool:
    man = pool / "manifest.json"
    try:
        m = json.loads(man.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (m.get("version") == POOL_VERSION and m.get("size") == size
            and all((pool / f).is_file() for f in m.get("files", [])) and (pool / "unlabelled.json").is_file())


def build_upstream_pool(pool: str | os.PathLike = DEFAULT_POOL, size: int = 128, force: bool = False,
                        verbose: bool = True, fetchers: dict | None = None) -> Path:
    """Fetch the sources and write the pool (idempotent: returns at once when it is complete)."""
    from PIL import Image

    pool = Path(pool)
    if not force and pool_is_complete(pool, size):
        return pool
    t0 = time.time()
    fetchers = {"invesalius": fetch_invesalius_deb, "pydicom-data": fetch_pydicom_data, **(fetchers or {})}
    downloads = pool / "downloads"
    head = read_invesalius_head(fetchers["invesalius"](downloads, verbose))
    images: list[tuple[str, str, np.ndarray]] = []  # (source, name, tile)
    for w, (lo, hi) in enumerate(HEAD_WINDOWS):
        for z in range(head.image.shape[0]):
            for t in tiles(_unit(head.image[z], lo, hi), (1,), size):
                images.append(("invesalius", f"headct_w{w}_{z:03d}", t))
    for name, img in read_pool_dicoms(fetchers["pydicom-data"](downloads, verbose)):
        stem = name.rsplit("_", 1)[0]
        for i, t in enumerate(tiles(img, POOL_DICOMS[stem][1], size)):
            images.append(("pydicom-data", f"{name}_t{i:02d}", t))
    shutil.rmtree(pool / "images", ignore_errors=True)
    (pool / "images").mkdir(parents=True)
    entries = []
    for source, name, t in images:
        rel = f"images/{name}.png"
        Image.fromarray(np.round(t * 255).astype(np.uint8)).save(pool / rel)
        entries.append({"image": rel, "source": source})
    atomic_write(pool / "unlabelled.json", json.dumps({"unlabelled": entries}, indent=1))
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["source"]] = counts.get(e["source"], 0) + 1
    manifest = {"version": POOL_VERSION, "size": size, "files": [e["image"] for e in entries], "counts": counts,
                "sources": {"invesalius": "invesalius-examples (Debian): Cranium.inv3 head CT, windows "
                                          f"{[list(w) for w in HEAD_WINDOWS]} HU",
                            "pydicom-data": f"{PYDICOM_DATA} (PyPI): " + ", ".join(POOL_DICOMS)},
                "excluded": "chest CT, MRI and every downstream (pyradiomics) patient",
                "build_seconds": round(time.time() - t0, 1)}
    atomic_write(pool / "manifest.json", json.dumps(manifest, indent=1))
    if verbose:
        print(f"[upstream-pool] {len(entries)} images {counts} in {pool} ({manifest['build_seconds']} s)", flush=True)
    return pool
