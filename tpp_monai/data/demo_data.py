"""Real demo data built from medical images that ship inside registry packages (see DATA.md).

Two sources, both fetched with the ordinary package clients and converted once into a small cache
of 2D PNG slices plus MONAI datalist JSON files:

* ``pyradiomics==3.0.1`` source archive (PyPI, BSD-3): chest CT ``lung1``/``lung2`` and brain MRI
  ``brain1``/``brain2`` volumes with expert tumour masks.  Gives

  - ``datalist_tumour.json``: binary tumour segmentation on the slices that contain tumour,
    split **by patient** (train: lung2 + brain1, validation: brain2, test: lung1);
  - ``datalist_tumour_cls.json``: slice classification "contains tumour" (1) or not (0), same
    patient split (all slices of each volume);
  - ``datalist_tumour_crops.json``: binary tumour segmentation on square crops around the tumour
    (:func:`tumour_crops`, stored at 128 px): the downstream task of the study and the demo. Split by
    patient: training lung2 + brain1 (one crop per tumour slice, 18), test lung1 + brain2 (four crops
    per tumour slice at seeded offsets, 24); ``validation`` repeats the test crops (the convergence
    view; evaluation uses the final model, nothing is selected on it);
  - ``datalist_tumour_crops_cls.json``: classification of the same crops, "contains tumour" (1, the
    tumour crops above) or not (0: one crop per tumour-free slice of the same volumes, at the volume's
    tumour centroid plus a seeded offset, so location does not give the answer); training 18 / 68,
    test 24 / 65 (positive / negative), ``validation`` = test as above;

* ``invesalius-examples`` (Debian, GPL-2): one head CT (108 x 256 x 256) with the InVesalius
  project's bone mask (HU >= 226) and soft-tissue mask (HU >= -142).  Gives
  ``datalist_headct.json``: 3-class segmentation (0 background, 1 soft tissue, 2 bone).  There is
  a single patient, so the split is by interleaved blocks of 8 slices along z (about 72/12/15 slices,
  :func:`block_split`): every split spans the whole head, the empty slices above the head are training
  slices, and no evaluated slice neighbours a training slice.
  The masks are threshold masks (as stored by InVesalius), not manual delineations.

``unlabelled.json`` lists every slice of every volume (the pool for MAE/DINO pre-training; it
includes the test volumes' slices, which is the transductive setting TPP uses on *training*
images only: pretext stages should use ``training`` entries of a task datalist instead).

Images are 1-channel uint8 PNGs (intensity-windowed: CT lung window [-1000, 400] HU, head CT
[-200, 1000] HU, MRI 0.5-99.5 percentile per volume), resized to ``size`` x ``size`` (default 96);
masks are uint8 PNGs of class indices (area-resampled one-hot, argmax).  Use
:func:`tpp_monai.data.transforms.seg_transforms` with ``in_channels=3`` to repeat to 3 channels.

Entry point: :func:`build_demo_cache` (script: ``scripts/fetch_demo_data.py``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_CACHE = Path(".tpp_cache/demo_ct")
CACHE_VERSION = 5
PYRADIOMICS = "pyradiomics==3.0.1"
INVESALIUS_DEB = "invesalius-examples"
#: patient split of the pyradiomics volumes
TUMOUR_SPLIT = {"lung2": "training", "brain1": "training", "brain2": "validation", "lung1": "test"}
VOLUME_KIND = {"lung1": "ct_chest", "lung2": "ct_chest", "brain1": "mri", "brain2": "mri", "headct": "ct_head"}
SOURCES = ("pyradiomics", "invesalius")
#: tumour crops (the study's and the demo's downstream task): patient split, crops per tumour slice
CROP_SPLIT = {"lung2": "training", "brain1": "training", "lung1": "test", "brain2": "test"}
CROPS_PER_SLICE = {"training": 1, "test": 4}
#: crop side in native pixels per volume kind (chest CT 0.6 mm: 154 mm; brain MRI: 160 of 256 px), stored size
CROP_SIDE = {"ct_chest": 256, "mri": 160}
CROP_SIZE = 128


class DemoDataError(RuntimeError):
    """A demo-data source could not be fetched or converted (message says why and what to do)."""


class RegistryUnreachable(DemoDataError):
    """The package registry (PyPI / Debian mirror) could not be reached."""


@dataclass
class Volume:
    name: str
    image: np.ndarray  # (Z, Y, X) raw intensities
    label: np.ndarray | None  # (Z, Y, X) class indices
    kind: str


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[demo-data] {msg}", flush=True)


def _run(cmd: list[str], what: str, cwd: Path | None = None, timeout: int = 900) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise DemoDataError(f"{what}: command not found ({cmd[0]}). Install it or use another source.") from e
    except subprocess.TimeoutExpired as e:
        raise RegistryUnreachable(f"{what}: timed out after {timeout}s; is the registry reachable?") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        unreachable = any(s in tail.lower() for s in (
            "could not find a version", "connection", "temporary failure", "failed to fetch",
            "unable to locate package", "no matching distribution", "network is unreachable", "name resolution"))
        cls = RegistryUnreachable if unreachable else DemoDataError
        raise cls(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}\n"
                  "Check that the package registry is reachable (pip config / apt sources) and retry.")


# ---------------------------------------------------------------------------------------- fetching
def fetch_pyradiomics_archive(download_dir: Path, verbose: bool = True) -> Path:
    """``pip download`` the pyradiomics 3.0.1 sdist (DATA.md recipe, in a scratch venv); returns the tarball."""
    download_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(download_dir.glob("pyradiomics-3.0.1.tar.gz"))
    if found:
        return found[0]
    scratch = Path(tempfile.mkdtemp(prefix="tpp_pyrad_venv_"))
    try:
        _log("creating a scratch venv for the pyradiomics build tools", verbose)
        _run([sys.executable, "-m", "venv", str(scratch)], "creating scratch venv")
        py = str(scratch / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
        _log("installing versioneer numpy setuptools wheel scikit-build into it", verbose)
        _run([py, "-m", "pip", "install", "-q", "versioneer", "numpy", "setuptools", "wheel", "scikit-build"],
             "pip install of build tools")
        _log(f"pip download {PYRADIOMICS} (source archive, ~34 MB)", verbose)
        _run([py, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
              PYRADIOMICS, "-d", str(download_dir)], f"pip download {PYRADIOMICS}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = sorted(download_dir.glob("pyradiomics-3.0.1.tar.gz"))
    if not found:
        raise DemoDataError(f"pip download finished but no pyradiomics-3.0.1.tar.gz in {download_dir}")
    return found[0]


def fetch_invesalius_deb(download_dir: Path, verbose: bool = True) -> Path:
    """``apt-get download invesalius-examples``; returns the .deb path."""
    download_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(download_dir.glob(f"{INVESALIUS_DEB}_*.deb"))
    if found:
        return found[-1]
    _log(f"apt-get download {INVESALIUS_DEB} (~19 MB)", verbose)
    _run(["apt-get", "download", INVESALIUS_DEB], f"apt-get download {INVESALIUS_DEB}", cwd=download_dir)
    found = sorted(download_dir.glob(f"{INVESALIUS_DEB}_*.deb"))
    if not found:
        raise DemoDataError(f"apt-get download finished but no {INVESALIUS_DEB}_*.deb in {download_dir}")
    return found[-1]


# ---------------------------------------------------------------------------------------- reading
def _read_nrrd_bytes(data: bytes, suffix: str = ".nrrd") -> np.ndarray:
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"v{suffix}"
        p.write_bytes(data)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))


def read_pyradiomics_volumes(archive: Path, names=tuple(TUMOUR_SPLIT)) -> list[Volume]:
    vols = []
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for name in names:
                arrs = {}
                for part in ("image", "label"):
                    member = f"pyradiomics-3.0.1/data/{name}_{part}.nrrd"
                    f = tf.extractfile(member)
                    if f is None:
                        raise DemoDataError(f"{member} missing in {archive}")
                    arrs[part] = _read_nrrd_bytes(f.read())
                vols.append(Volume(name, arrs["image"].astype(np.float32), (arrs["label"] > 0).astype(np.uint8),
                                   VOLUME_KIND[name]))
    except (tarfile.TarError, EOFError, KeyError) as e:
        raise DemoDataError(f"{archive} is corrupt or incomplete ({e}); delete it and rerun.") from e
    return vols


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """Open the data.tar.* member of a .deb (an ``ar`` archive) without dpkg."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DemoDataError(f"{deb} is not a Debian package (bad ar magic); delete it and rerun.")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size % 2)
    raise DemoDataError(f"{deb} has no data.tar member")


def read_invesalius_head(deb: Path) -> Volume:
    try:
        with _deb_data_tar(deb) as tf:
            inv = next(m for m in tf.getmembers() if m.name.endswith("Cranium.inv3"))
            inv_bytes = tf.extractfile(inv).read()  # type: ignore[union-attr]
        files = {}
        with tarfile.open(fileobj=io.BytesIO(inv_bytes), mode="r:gz") as tf:
            for m in tf.getmembers():
                base = Path(m.name).name
                if base in ("matrix.dat", "mask_0.dat", "mask_1.dat"):
                    files[base] = tf.extractfile(m).read()  # type: ignore[union-attr]
    except (StopIteration, tarfile.TarError, EOFError) as e:
        raise DemoDataError(f"{deb}: could not read Cranium.inv3 ({e}); delete the .deb and rerun.") from e
    img = np.frombuffer(files["matrix.dat"], dtype="<i2").reshape(108, 256, 256).astype(np.float32)
    bone = np.frombuffer(files["mask_0.dat"], dtype=np.uint8).reshape(109, 257, 257)[1:, 1:, 1:] > 127
    tissue = np.frombuffer(files["mask_1.dat"], dtype=np.uint8).reshape(109, 257, 257)[1:, 1:, 1:] > 127
    label = np.zeros(img.shape, np.uint8)
    label[tissue] = 1
    label[bone] = 2
    return Volume("headct", img, label, "ct_head")


# ---------------------------------------------------------------------------------------- conversion
def window(vol: Volume) -> np.ndarray:
    """Intensity window to [0, 1] per volume kind."""
    x = vol.image
    if vol.kind == "ct_chest":
        lo, hi = -1000.0, 400.0
    elif vol.kind == "ct_head":
        lo, hi = -200.0, 1000.0
    else:
        lo, hi = np.percentile(x, 0.5), np.percentile(x, 99.5)
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _resize_slice(img: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()


def _resize_mask(mask: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    onehot = F.one_hot(torch.from_numpy(mask.astype(np.int64)), num_classes).permute(2, 0, 1)[None].float()
    return F.interpolate(onehot, size=(size, size), mode="area")[0].argmax(0).numpy().astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


#: split of the head CT's z-blocks, counted from the top of the head: every split spans the whole head
BLOCK_CYCLE = ("training", "test", "training", "validation", "training", "training")


def block_split(n: int, block: int = 8, cycle: tuple[str, ...] = BLOCK_CYCLE, gap: int = 1) -> dict[str, list[int]]:
    """Interleaved z-blocks of ``block`` slices, assigned by ``cycle`` from the top slice down.

    Why not three contiguous slabs: the head shrinks to nothing at the top, so a top test slab holds
    slice types (small or empty heads) that a bottom training slab never shows; the model then
    extrapolates and predicts tissue on empty slices. Interleaved blocks give every split the whole
    head, and the top block (the empty slices above the head) is a training block. ``gap`` slices at
    each block boundary between two different splits are dropped from the non-training side, so no
    evaluated slice is the direct neighbour of a training slice.
    """
    out: dict[str, list[int]] = {"training": [], "validation": [], "test": []}
    owner = [cycle[((n - 1 - z) // block) % len(cycle)] for z in range(n)]
    for z in range(n):
        split = owner[z]
        near = {owner[j] for j in range(max(0, z - gap), min(n, z + gap + 1))}
        if split != "training" and "training" in near:
            continue  # gap slice
        out[split].append(z)
    return out


def _crop_offsets(name: str, z: int, k: int, side: int) -> tuple[int, int]:
    """Seeded offset of crop ``k`` of slice ``z`` (uniform in +- side / 4): the tumour is not always centred."""
    import zlib

    rng = np.random.default_rng(zlib.crc32(f"{name}/{z}/{k}".encode()))
    dy, dx = rng.integers(-(side // 4), side // 4 + 1, size=2)
    return int(dy), int(dx)


def tumour_crops(vol: Volume, win: np.ndarray, per_slice: int, size: int = CROP_SIZE) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(slice, crop index, image [0, 1], mask) crops of side ``CROP_SIDE[kind]`` around each tumour slice's
    tumour centroid (plus a seeded offset), zero-padded at the border, resized to ``size`` px."""
    assert vol.label is not None
    side = CROP_SIDE[vol.kind]
    out = []
    for z in range(vol.image.shape[0]):
        ys, xs = np.nonzero(vol.label[z])
        if len(ys) == 0:
            continue
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        img = np.pad(win[z], side, mode="constant")
        lab = np.pad(vol.label[z], side, mode="constant")
        for k in range(per_slice):
            dy, dx = _crop_offsets(vol.name, z, k, side)
            y0, x0 = cy + dy - side // 2 + side, cx + dx - side // 2 + side
            c_img, c_lab = img[y0:y0 + side, x0:x0 + side], lab[y0:y0 + side, x0:x0 + side]
            out.append((z, k, _resize_slice(c_img, size), _resize_mask(c_lab, size, 2)))
    return out


def negative_crops(vol: Volume, win: np.ndarray, size: int = CROP_SIZE) -> list[tuple[int, np.ndarray]]:
    """(slice, image) crops of every tumour-free slice at the volume's tumour centroid (+ seeded offset)."""
    assert vol.label is not None
    side = CROP_SIDE[vol.kind]
    _, ys, xs = np.nonzero(vol.label)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    out = []
    for z in range(vol.image.shape[0]):
        if vol.label[z].any():
            continue
        dy, dx = _crop_offsets(vol.name + "/neg", z, 0, side)
        img = np.pad(win[z], side, mode="constant")
        y0, x0 = cy + dy - side // 2 + side, cx + dx - side // 2 + side
        out.append((z, _resize_slice(img[y0:y0 + side, x0:x0 + side], size)))
    return out


def convert_volumes(vols: list[Volume], out: Path, size: int, verbose: bool = True) -> dict:
    """Write PNG slices and the datalists; returns the manifest dict."""
    rel = lambda p: str(p.relative_to(out))  # noqa: E731
    unlabelled: list[dict] = []
    tumour = {"training": [], "validation": [], "test": []}
    tumour_cls = {"training": [], "validation": [], "test": []}
    head = {"training": [], "validation": [], "test": []}
    crops: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    crops_cls: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for vol in vols:
        _log(f"converting {vol.name} {tuple(vol.image.shape)} -> {size}x{size} slices", verbose)
        win = window(vol)
        ncls = 3 if vol.name == "headct" else 2
        z_split = block_split(vol.image.shape[0]) if vol.name == "headct" else None
        if vol.name in CROP_SPLIT and vol.label is not None:
            split = CROP_SPLIT[vol.name]
            for z, k, c_img, c_lab in tumour_crops(vol, win, CROPS_PER_SLICE[split]):
                cp, cl = out / "crops" / f"{vol.name}_{z:03d}_{k}.png", out / "crops" / f"{vol.name}_{z:03d}_{k}_seg.png"
                _save_png(np.round(c_img * 255).astype(np.uint8), cp)
                _save_png(c_lab, cl)
                crops[split].append({"image": rel(cp), "label": rel(cl), "volume": vol.name, "slice": z, "crop": k})
                crops_cls[split].append({"image": rel(cp), "label": 1, "volume": vol.name, "slice": z, "crop": k})
            for z, c_img in negative_crops(vol, win):
                cp = out / "crops" / f"{vol.name}_{z:03d}_neg.png"
                _save_png(np.round(c_img * 255).astype(np.uint8), cp)
                crops_cls[split].append({"image": rel(cp), "label": 0, "volume": vol.name, "slice": z, "crop": 0})
        for z in range(vol.image.shape[0]):
            img = np.round(_resize_slice(win[z], size) * 255).astype(np.uint8)
            ip = out / "images" / f"{vol.name}_{z:03d}.png"
            _save_png(img, ip)
            unlabelled.append({"image": rel(ip), "volume": vol.name})
            if vol.label is None:
                continue
            m = _resize_mask(vol.label[z], size, ncls)
            lp = out / "labels" / f"{vol.name}_{z:03d}.png"
            if vol.name == "headct":
                split = next((k for k, zs in z_split.items() if z in zs), None)  # type: ignore[union-attr]
                if split is None:  # gap slice
                    continue
                _save_png(m, lp)
                head[split].append({"image": rel(ip), "label": rel(lp), "volume": vol.name, "slice": z})
            else:
                split = TUMOUR_SPLIT[vol.name]
                has_tumour = bool(m.any())
                tumour_cls[split].append({"image": rel(ip), "label": int(has_tumour), "volume": vol.name, "slice": z})
                if has_tumour:
                    _save_png(m, lp)
                    tumour[split].append({"image": rel(ip), "label": rel(lp), "volume": vol.name, "slice": z})
    lists = {"unlabelled.json": {"unlabelled": unlabelled}}
    if any(v.name in TUMOUR_SPLIT for v in vols):
        lists["datalist_tumour.json"] = tumour
        lists["datalist_tumour_cls.json"] = tumour_cls
        lists["datalist_tumour_crops.json"] = dict(crops, validation=list(crops["test"]))
        lists["datalist_tumour_crops_cls.json"] = dict(crops_cls, validation=list(crops_cls["test"]))
    if any(v.name == "headct" for v in vols):
        lists["datalist_headct.json"] = head
    for name, content in lists.items():
        (out / name).write_text(json.dumps(content, indent=1))
    files = sorted({e[k] for c in lists.values() for part in c.values() for e in part
                    for k in ("image", "label") if isinstance(e.get(k), str)})
    return {"version": CACHE_VERSION, "size": size, "sources": sorted({_source_of(v.name) for v in vols}),
            "datalists": sorted(lists), "files": files,
            "counts": {n: {k: len(v) for k, v in c.items()} for n, c in lists.items()}}


def _source_of(volume: str) -> str:
    return "invesalius" if volume == "headct" else "pyradiomics"


# ---------------------------------------------------------------------------------------- cache
def cache_is_complete(cache: Path, size: int | None = None, sources=SOURCES) -> bool:
    man = cache / "manifest.json"
    if not man.is_file():
        return False
    try:
        m = json.loads(man.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("version") != CACHE_VERSION or (size is not None and m.get("size") != size):
        return False
    if not set(sources) <= set(m.get("sources", [])):
        return False
    return all((cache / d).is_file() for d in m["datalists"]) and all((cache / f).is_file() for f in m["files"])


def build_demo_cache(
    cache: str | os.PathLike = DEFAULT_CACHE,
    size: int = 96,
    sources: tuple[str, ...] = SOURCES,
    force: bool = False,
    keep_downloads: bool = True,
    verbose: bool = True,
    fetchers: dict[str, Callable[[Path, bool], Path]] | None = None,
) -> Path:
    """Fetch the sources and build the cache (idempotent: returns at once if it is complete).

    A source that fails is reported; if every requested source fails, raises the first error
    (:class:`RegistryUnreachable` when the registry could not be reached).
    """
    cache = Path(cache)
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ValueError(f"unknown demo sources {bad}; known: {SOURCES}")
    if not force and cache_is_complete(cache, size, sources):
        _log(f"cache {cache} is complete; nothing to do", verbose)
        return cache
    t0 = time.time()
    fetchers = {"pyradiomics": fetch_pyradiomics_archive, "invesalius": fetch_invesalius_deb, **(fetchers or {})}
    downloads = cache / "downloads"
    vols: list[Volume] = []
    errors: list[DemoDataError] = []
    for src in sources:
        try:
            path = fetchers[src](downloads, verbose)
            vols += read_pyradiomics_volumes(path) if src == "pyradiomics" else [read_invesalius_head(path)]
        except DemoDataError as e:
            _log(f"source {src} failed: {e}", True)
            errors.append(e)
    if not vols:
        raise errors[0]
    for sub in ("images", "labels", "crops"):
        shutil.rmtree(cache / sub, ignore_errors=True)
    (cache / "manifest.json").unlink(missing_ok=True)
    manifest = convert_volumes(vols, cache, size, verbose)
    manifest["build_seconds"] = round(time.time() - t0, 1)
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    _log(f"done in {manifest['build_seconds']} s: {manifest['counts']}", verbose)
    if errors:
        _log(f"WARNING: {len(errors)} source(s) failed; cache is partial", True)
    return cache


def load_datalist(cache: str | os.PathLike, name: str = "datalist_headct.json") -> dict[str, list[dict]]:
    """Read a cache datalist with absolute paths (ready for ``monai.data.Dataset``)."""
    cache = Path(cache).resolve()
    d = json.loads((cache / name).read_text())
    return {split: [{k: (str(cache / v) if k in ("image", "label") and isinstance(v, str) else v)
                     for k, v in e.items()} for e in entries] for split, entries in d.items()}
