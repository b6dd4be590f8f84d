"""Shared logic of the dataset preparation scripts: file checks, stratified splits, datalist JSON.

A datalist is the MONAI decathlon-style JSON ``{"training": [...], "validation": [...],
"test": [...]}`` whose entries are ``{"image": path, "label": int | mask path}`` (absolute
paths), read with ``monai.data.load_decathlon_datalist(path, data_list_key="training")``. The format, for users'
own data: docs/DATA_FORMAT.md (``tpp-monai prepare`` / :func:`prepare_folder` write it from a folder).

Every problem with the raw data is a :class:`DatalistError` naming the offending file and the
fix, raised before anything is written.

Split sizes: a held-out part of ``n`` items with fraction ``f`` has ``ceil(f * n)`` items
(MHIST: 1545 HP + 630 SSA -> 309 + 126 = 435 val; GlaS: 37 benign + 48 malignant -> 8 + 10 =
18 val; QaTa: 7145 -> 1429 val).  For 70/10/20 splits (Chest X-ray PA): ``floor(0.7 n)``
train, ``floor(0.2 n)`` test, the rest val (1525 per class -> 1067 / 153 / 305).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("training", "validation", "test")
INFO_KEYS = ("task", "class_names")  #: optional top-level keys (``tpp-monai prepare`` writes them; bundles ignore them)


class DatalistError(ValueError):
    """Raw data does not match the expected layout; the message names the file and the fix."""


def check_image(path: str | os.PathLike, what: str = "image") -> Path:
    """The file exists and PIL can decode it; otherwise a DatalistError naming it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DatalistError(f"missing {what}: {p} (re-download or remove its entry from the annotation file)")
    try:
        with Image.open(p) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatalistError(f"unreadable/corrupt {what}: {p} ({e}); re-download this file") from e
    return p


def check_same_size(image: str | os.PathLike, mask: str | os.PathLike) -> None:
    """Image and mask have the same width x height (read from the headers); else a DatalistError naming both."""
    from PIL import Image

    with Image.open(image) as a, Image.open(mask) as b:
        if a.size != b.size:
            raise DatalistError(
                f"image and mask sizes differ: {image} is {a.size[0]}x{a.size[1]} but {mask} is {b.size[0]}x{b.size[1]} "
                "(width x height). The mask must be drawn on this image: re-download the pair or remove it.")


def check_images(paths: Iterable[str | os.PathLike], what: str = "image") -> None:
    for p in paths:
        check_image(p, what)


def read_csv_checked(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with stripped header/cell whitespace; names missing columns."""
    p = Path(path)
    if not p.is_file():
        raise DatalistError(f"missing annotation file: {p} (is --root the dataset folder?)")
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatalistError(f"empty CSV file: {p}") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DatalistError(f"{p}: missing column(s) {missing}; found columns {header}. "
                                f"Expected the official file with columns {list(required)}.")
        rows = [dict(zip(header, (c.strip() for c in row))) for row in reader if any(c.strip() for c in row)]
    if not rows:
        raise DatalistError(f"{p} has a header but no rows")
    return rows


def list_images(folder: str | os.PathLike, exts: Sequence[str] = IMAGE_EXTS) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def find_subdir(parent: Path, name: str, aliases: Sequence[str] = ()) -> Path:
    """A sub-folder matched case-insensitively by name or alias; error listing what is there."""
    if not parent.is_dir():
        raise DatalistError(f"missing folder: {parent} (is --root the dataset folder?)")
    wanted = {n.lower() for n in (name, *aliases)}
    for d in sorted(parent.iterdir()):
        if d.is_dir() and d.name.lower() in wanted:
            return d
    present = sorted(d.name for d in parent.iterdir() if d.is_dir())
    raise DatalistError(f"missing folder '{name}' in {parent} (found {present}); check --root and the layout")


def class_folder_entries(split_dir: Path, classes: Sequence[str],
                         aliases: dict[str, Sequence[str]] | None = None) -> list[dict]:
    """``{"image", "label"}`` entries from ``split_dir/<CLASS>/*``; label = index in ``classes``."""
    entries = []
    for idx, cls in enumerate(classes):
        d = find_subdir(split_dir, cls, (aliases or {}).get(cls, ()))
        files = list_images(d)
        if not files:
            raise DatalistError(f"empty class folder: {d} (no {'/'.join(IMAGE_EXTS)} files); "
                                "the download is incomplete, re-extract the archive")
        entries += [{"image": str(f.resolve()), "label": idx} for f in files]
    return entries


def _rng(seed: int) -> random.Random:
    return random.Random(seed)


def holdout_count(n: int, frac: float) -> int:
    return min(n, math.ceil(frac * n - 1e-9))


def split_holdout(items: Sequence[dict], frac: float, seed: int,
                  key: Callable[[dict], object] | None = None) -> tuple[list[dict], list[dict]]:
    """Hold out ``ceil(frac * n)`` items per group (``key``: stratum; None: one group). Returns (kept, held)."""
    groups: dict[object, list[dict]] = defaultdict(list)
    for it in items:
        groups[key(it) if key else None].append(it)
    rng = _rng(seed)
    kept, held = [], []
    for g in sorted(groups, key=str):
        members = list(groups[g])
        rng.shuffle(members)
        k = holdout_count(len(members), frac)
        held += members[:k]
        kept += members[k:]
    return _sorted(kept), _sorted(held)


def split_fractions(items: Sequence[dict], train: float, test: float, seed: int,
                    key: Callable[[dict], object] | None = None) -> dict[str, list[dict]]:
    """Per group: ``floor(train n)`` training, ``floor(test n)`` test, the rest validation."""
    groups: dict[object, list[dict]] = defaultdict(list)
    for it in items:
        groups[key(it) if key else None].append(it)
    rng = _rng(seed)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for g in sorted(groups, key=str):
        members = list(groups[g])
        rng.shuffle(members)
        n_tr, n_te = int(math.floor(train * len(members) + 1e-9)), int(math.floor(test * len(members) + 1e-9))
        out["training"] += members[:n_tr]
        out["test"] += members[n_tr:n_tr + n_te]
        out["validation"] += members[n_tr + n_te:]
    return {s: _sorted(v) for s, v in out.items()}


def _sorted(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: e["image"])


def pair_masks(images: Sequence[Path], masks: Sequence[Path], mask_name: Callable[[Path], str]) -> list[tuple[Path, Path]]:
    """Pair images with masks by ``mask_name(image)``; a mask without image or an image without
    mask is an error naming the file."""
    by_name = {m.name: m for m in masks}
    wanted = {mask_name(i): i for i in images}
    orphans = sorted(set(by_name) - set(wanted))
    if orphans:
        raise DatalistError(f"mask without image: {by_name[orphans[0]]} ({len(orphans)} in total); "
                            "remove it or restore the missing image")
    pairs = []
    for name, img in sorted(wanted.items()):
        if name not in by_name:
            raise DatalistError(f"missing mask for image {img}: expected {name} next to the other masks; "
                                "re-download the ground truths")
        pairs.append((img, by_name[name]))
    return pairs


def write_datalist(out: str | os.PathLike, datalist: dict[str, list[dict]], verbose: bool = True) -> Path:
    """Write the JSON (all three splits present; overlapping images are an error)."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for e in datalist.get(split, []):
            if e["image"] in seen:
                raise DatalistError(f"{e['image']} is in both {seen[e['image']]} and {split}")
            seen[e["image"]] = split
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**{k: datalist[k] for k in INFO_KEYS if k in datalist}, **{s: datalist.get(s, []) for s in SPLITS}}
    from tpp_monai.safe_io import atomic_write, disk_full_error

    try:  # atomic: a full disk leaves neither a half-written datalist nor a stray temporary file
        atomic_write(out, json.dumps(payload, indent=1))
    except OSError as e:
        full = disk_full_error(out, e)
        if full is not None:
            raise full from e
        raise
    if verbose:
        print(f"wrote {out}: " + ", ".join(f"{s} {len(payload[s])}" for s in SPLITS))
    return out


def label_counts(entries: Iterable[dict]) -> dict:
    c: dict = defaultdict(int)
    for e in entries:
        c[e["label"]] += 1
    return dict(sorted(c.items()))


# ------------------------------------------------------------------------------------ datasets
MHIST_COLUMNS = ("Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA", "Partition")
MHIST_CLASSES = ("HP", "SSA")
OCT_C8_CLASSES = ("AMD", "CNV", "CSR", "DME", "DR", "DRUSEN", "MH", "NORMAL")
CXR_PA_CLASSES = ("covid", "normal", "pneumonia")
CXR_PA_ALIASES = {"covid": ("covid19", "covid-19", "COVID_19"), "normal": (), "pneumonia": ()}
GLAS_COLUMNS = ("name", "patient ID", "grade (GlaS)", "grade (Sirinukunwattana et al. 2015)")


def prepare_mhist(root: str | os.PathLike, val_frac: float = 0.2, seed: int = 0, verify: bool = True) -> dict:
    """MHIST: ``annotations.csv`` + ``images/``; official train/test; ``val_frac`` of train per class -> val."""
    root = Path(root)
    rows = read_csv_checked(root / "annotations.csv", MHIST_COLUMNS)
    img_dir = root / "images"
    train, test = [], []
    for i, r in enumerate(rows, start=2):
        lab, part = r["Majority Vote Label"].upper(), r["Partition"].lower()
        if lab not in MHIST_CLASSES or part not in ("train", "test"):
            raise DatalistError(f"{root / 'annotations.csv'} line {i}: label '{r['Majority Vote Label']}' / "
                                f"partition '{r['Partition']}' not in {MHIST_CLASSES} / (train, test)")
        e = {"image": str((img_dir / r["Image Name"]).resolve()), "label": MHIST_CLASSES.index(lab)}
        (train if part == "train" else test).append(e)
    if verify:
        check_images(e["image"] for e in train + test)
    tr, va = split_holdout(train, val_frac, seed, key=lambda e: e["label"])
    return {"training": tr, "validation": va, "test": _sorted(test)}


def _find_split_root(root: Path, splits: Sequence[str]) -> Path:
    """``root`` or the first nested folder (depth <= 2) that holds all ``splits`` folders (Kaggle zips nest)."""
    cands = [root] + sorted(p for p in root.glob("*") if p.is_dir()) + sorted(p for p in root.glob("*/*") if p.is_dir())
    for c in cands:
        names = {d.name.lower() for d in c.iterdir() if d.is_dir()} if c.is_dir() else set()
        if all(s in names for s in splits):
            return c
    raise DatalistError(f"no folder with {'/'.join(splits)} sub-folders under {root} (is --root the dataset folder?)")


def prepare_oct_c8(root: str | os.PathLike, verify: bool = True) -> dict:
    """OCT-C8: ``{train,val,test}/<CLASS>/*.jpg`` with the 8 classes; official split."""
    base = _find_split_root(Path(root), ("train", "val", "test"))
    out = {}
    for split, folder in zip(SPLITS, ("train", "val", "test")):
        out[split] = _sorted(class_folder_entries(find_subdir(base, folder), OCT_C8_CLASSES))
    if verify:
        check_images(e["image"] for v in out.values() for e in v)
    return out


def prepare_chestxray_pa(root: str | os.PathLike, seed: int = 0, verify: bool = True) -> dict:
    """Chest X-ray PA: random 70/10/20 per class.

    Assumed layout (Kaggle "COVID-19 & Pneumonia & Normal Chest X-ray PA Dataset", 1525 images per
    class, 4575 in all): ``<root>/covid/``, ``<root>/normal/``, ``<root>/pneumonia/`` with the images
    directly inside (folder names case-insensitive; ``COVID19``/``COVID-19`` accepted; one or two
    wrapper folders from the zip are searched).  Labels: covid 0, normal 1, pneumonia 2.
    """
    root = Path(root)
    base = root
    try:
        find_subdir(base, "covid", CXR_PA_ALIASES["covid"])
    except DatalistError:  # Kaggle zips add one or two wrapper folders
        hits = [p.parent for p in sorted(root.glob("**/*")) if p.is_dir() and p.name.lower() == "normal"]
        if not hits:
            raise
        base = hits[0]
    items = class_folder_entries(base, CXR_PA_CLASSES, CXR_PA_ALIASES)
    if verify:
        check_images(e["image"] for e in items)
    return split_fractions(items, 0.7, 0.2, seed, key=lambda e: e["label"])


def prepare_glas(root: str | os.PathLike, mask_dir: str | os.PathLike, val_frac: float = 0.2, seed: int = 0,
                 verify: bool = True) -> dict:
    """GlaS: ``train_*.bmp``/``testA_*``/``testB_*`` + ``*_anno.bmp`` + ``Grade.csv``.

    Official train/test (testA + testB); ``val_frac`` of train per GlaS grade (benign/malignant)
    -> val.  Instance masks are binarised (gland id > 0 -> 1) and written as PNG to ``mask_dir``.
    """
    import numpy as np
    from PIL import Image

    root = Path(root)
    rows = read_csv_checked(root / "Grade.csv", GLAS_COLUMNS)
    grade = {r["name"]: r["grade (GlaS)"].strip().lower() for r in rows}
    files = list_images(root)
    images = [f for f in files if not f.stem.endswith("_anno") and f.stem.split("_")[0] in ("train", "testA", "testB")]
    masks = [f for f in files if f.stem.endswith("_anno")]
    if not images:
        raise DatalistError(f"no train_*/testA_*/testB_* images in {root} (is --root the GlaS folder?)")
    pairs = pair_masks(images, masks, lambda p: f"{p.stem}_anno{p.suffix}")
    mask_dir = Path(mask_dir)
    mask_dir.mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for img, m in pairs:
        if img.stem not in grade:
            raise DatalistError(f"{img} has no row in {root / 'Grade.csv'}; use the official Grade.csv")
        if verify:
            check_image(img)
            check_image(m, "mask")
            check_same_size(img, m)
        arr = np.asarray(Image.open(m))
        if arr.ndim == 3:
            arr = arr[..., 0]
        out_mask = mask_dir / f"{img.stem}_mask.png"
        Image.fromarray((arr > 0).astype(np.uint8)).save(out_mask)
        e = {"image": str(img.resolve()), "label": str(out_mask.resolve()), "grade": grade[img.stem]}
        (train if img.stem.startswith("train") else test).append(e)
    tr, va = split_holdout(train, val_frac, seed, key=lambda e: e["grade"])
    return {"training": tr, "validation": va, "test": _sorted(test)}


def _qata_split(set_dir: Path, verify: bool) -> list[dict]:
    imgs = list_images(find_subdir(set_dir, "Images"))
    masks = list_images(find_subdir(set_dir, "Ground-truths", ("Ground-truth", "GroundTruths", "Masks")))
    if not imgs:
        raise DatalistError(f"no images in {set_dir / 'Images'}; re-extract the archive")
    pairs = pair_masks(imgs, masks, lambda p: f"mask_{p.name}")
    if verify:
        for i, m in pairs:
            check_image(i)
            check_image(m, "mask")
            check_same_size(i, m)
    return [{"image": str(i.resolve()), "label": str(m.resolve())} for i, m in pairs]


def prepare_qata(root: str | os.PathLike, val_frac: float = 0.2, seed: int = 0, verify: bool = True) -> dict:
    """QaTa-COV19-v2: ``Train Set/{Images,Ground-truths}`` (``mask_<name>``), ``Test Set/...``.

    Masks are 0/255 PNGs; binarise with ``label > 0`` (the transforms in
    :mod:`tpp_monai.data.transforms` do).  ``val_frac`` of train -> val at random.
    """
    base = _find_split_root(Path(root), ("train set", "test set"))
    train = _qata_split(find_subdir(base, "Train Set"), verify)
    test = _qata_split(find_subdir(base, "Test Set"), verify)
    tr, va = split_holdout(train, val_frac, seed)
    return {"training": tr, "validation": va, "test": _sorted(test)}


def cli_main(name: str, prepare: Callable[..., dict], argv: Sequence[str] | None = None,
             has_seed: bool = True, mask_dir: bool = False) -> int:
    """Shared argparse front-end of ``scripts/prepare_<dataset>.py``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=f"Write the MONAI datalist JSON for {name} (official download layout).")
    p.add_argument("--root", required=True, help="dataset folder as downloaded/extracted")
    p.add_argument("--out", required=True, help="output datalist JSON path")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    p.add_argument("--no-verify", action="store_true", help="skip decoding every image (faster)")
    if mask_dir:
        p.add_argument("--mask-dir", default=None, help="where binarised masks go (default: <out dir>/<name>_masks)")
    a = p.parse_args(argv)
    kwargs: dict = {"verify": not a.no_verify}
    if has_seed:
        kwargs["seed"] = a.seed
    if mask_dir:
        kwargs["mask_dir"] = a.mask_dir or str(Path(a.out).resolve().parent / f"{name.lower()}_masks")
    try:
        dl = prepare(a.root, **kwargs)
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_datalist(a.out, dl)
    return 0


# ------------------------------------------------------------------------------- a user's own folder
SPLIT_FOLDERS = {"training": ("train", "training"), "validation": ("val", "valid", "validation"), "test": ("test",)}
MASK_SUFFIXES = ("", "_mask", "_seg", "_anno", "_label")


def _split_dirs(root: Path) -> dict[str, Path]:
    """Split folders already present at ``root`` (train/val/test, case-insensitive)."""
    by_name = {d.name.lower(): d for d in root.iterdir() if d.is_dir()}
    return {s: by_name[a] for s, names in SPLIT_FOLDERS.items() for a in names if a in by_name}


def detect_task(folder: str | os.PathLike) -> str:
    """``seg`` when the folder (or its ``train/``) holds ``images/`` + ``masks/``, else ``cls`` (class sub-folders)."""
    root = Path(folder)
    base = _split_dirs(root).get("training", root)
    names = {d.name.lower() for d in base.iterdir() if d.is_dir()}
    return "seg" if {"images", "masks"} <= names else "cls"


def _cls_entries(folder: Path, classes: Sequence[str] | None) -> tuple[list[dict], list[str]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DatalistError(f"no class sub-folders in {folder}: a classification folder holds one sub-folder of "
                            "images per class (<folder>/<class>/*.png); see docs/DATA_FORMAT.md")
    classes = list(classes) if classes else found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DatalistError(f"{folder} has class folder(s) {extra} that are not among the classes {classes} "
                            "(of the training folder): rename them or remove them")
    entries = []
    for idx, cls in enumerate(classes):
        d = folder / cls
        files = list_images(d) if d.is_dir() else []
        if d.is_dir() and not files:
            raise DatalistError(f"empty class folder: {d} (no {'/'.join(IMAGE_EXTS)} files); add images or remove it")
        entries += [{"image": str(f.resolve()), "label": idx} for f in files]
    return entries, classes


def _mask_for(image: Path, masks: dict[str, Path]) -> Path:
    for suffix in MASK_SUFFIXES:
        if f"{image.stem}{suffix}" in masks:
            return masks[f"{image.stem}{suffix}"]
    raise DatalistError(f"missing mask for image {image}: expected masks/{image.stem}.png (or _mask/_seg/_anno/"
                        "_label before the extension, any image format); add it or remove the image")


def _seg_entries(folder: Path) -> list[dict]:
    img_dir, mask_dir = find_subdir(folder, "images"), find_subdir(folder, "masks")
    images = list_images(img_dir)
    if not images:
        raise DatalistError(f"no images in {img_dir} ({'/'.join(IMAGE_EXTS)})")
    masks = {m.stem: m for m in list_images(mask_dir)}
    entries = []
    for img in images:
        m = _mask_for(img, masks)
        entries.append({"image": str(img.resolve()), "label": str(m.resolve())})
    used = {e["label"] for e in entries}
    orphans = sorted(str(m) for m in masks.values() if str(m.resolve()) not in used)
    if orphans:
        raise DatalistError(f"mask without image: {orphans[0]} ({len(orphans)} in total); remove it or add its image")
    return entries


def _mask_values(path: str) -> set[int]:
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(path))
    if arr.ndim == 3:
        arr = arr[..., 0]
    return {int(v) for v in np.unique(arr)}


def _check_masks(entries: list[dict], binarize: bool, out_dir: Path | None, root: Path) -> int:
    """Number of classes the masks hold; refuses values that are not class indices. ``binarize``: every mask is
    rewritten as 0/1 (``> 0``) into ``out_dir`` (at its path below ``root``, so split folders cannot collide) and
    the entries point there."""
    import numpy as np
    from PIL import Image

    values: dict[str, set[int]] = {e["label"]: _mask_values(e["label"]) for e in entries}
    if binarize:
        for e in entries:
            arr = np.asarray(Image.open(e["label"]))
            arr = arr[..., 0] if arr.ndim == 3 else arr
            dst = (out_dir / Path(e["label"]).resolve().relative_to(root.resolve())).with_suffix(".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((arr > 0).astype(np.uint8)).save(dst)
            e["label"] = str(dst.resolve())
        return 2
    every = set().union(*values.values())
    if len(every - {0}) <= 1:
        return 2  # 0/1 or 0/255: binary (the transforms use > 0)
    k = max(every) + 1
    if k > 256 or len(every) < 0.5 * k:
        bad = next(p for p, v in values.items() if v - {0})
        raise DatalistError(
            f"masks hold values {sorted(every)[:10]} (e.g. {bad}): not class indices 0..K-1. Store one class index "
            "per pixel (0 = background), or pass --binarize when every non-zero value is the same class "
            "(instance ids, 0/128/255 drawings)")
    return k


def prepare_folder(folder: str | os.PathLike, task: str = "auto", val_frac: float = 0.2, test_frac: float = 0.2,
                   seed: int = 0, binarize: bool = False, mask_out: str | os.PathLike | None = None,
                   class_names: Sequence[str] | None = None, verify: bool = True) -> dict:
    """A datalist (docs/DATA_FORMAT.md) from a user's folder of images.

    Classification: ``<folder>/<class>/*`` (class index = position in sorted folder names, or ``class_names``).
    Segmentation: ``<folder>/images/*`` + ``<folder>/masks/*`` (mask = same stem, optionally ``_mask``/``_seg``/
    ``_anno``/``_label``; class indices per pixel, or 0/255 for a binary task; ``binarize``: every non-zero value ->
    1). Either may already be split into ``train/``, ``val/``, ``test/`` sub-folders; missing splits are held out of
    train: ``ceil(test_frac n)`` test and ``ceil(val_frac n)`` validation items (per class for classification).
    Returns the three splits plus ``task`` and ``class_names`` (the bundles read only the splits).
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatalistError(f"{root} is not a folder; give the folder holding your images (docs/DATA_FORMAT.md)")
    task = detect_task(root) if task == "auto" else task
    if task not in ("cls", "seg"):
        raise DatalistError(f"task must be 'auto', 'cls' or 'seg', got {task!r}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DatalistError(f"--val-frac {val_frac} and --test-frac {test_frac} must be in [0, 1) with a sum < 1")
    given = _split_dirs(root)
    if given and "training" not in given:
        raise DatalistError(f"{root} has {sorted(d.name for d in given.values())} but no train/ folder")
    sources = given or {"training": root}
    splits: dict[str, list[dict]] = {}
    names: list[str] | None = list(class_names) if class_names and task == "cls" else None
    for split in SPLITS:
        if split not in sources:
            continue
        if task == "cls":
            splits[split], names = _cls_entries(sources[split], names)
        else:
            splits[split] = _seg_entries(sources[split])
    key = (lambda e: e["label"]) if task == "cls" else None
    if "test" not in splits and test_frac > 0:
        splits["training"], splits["test"] = split_holdout(splits["training"], test_frac, seed, key=key)
    if "validation" not in splits and val_frac > 0:
        frac = val_frac / (1 - (test_frac if "test" not in sources else 0))
        splits["training"], splits["validation"] = split_holdout(splits["training"], min(frac, 0.99), seed + 1, key=key)
    if not splits["training"]:
        raise DatalistError(f"{root}: no training images left after holding out validation/test; add images or "
                            "lower --val-frac / --test-frac")
    everything = [e for v in splits.values() for e in v]
    if verify:
        for e in everything:
            check_image(e["image"])
            if task == "seg":
                check_image(e["label"], "mask")
                check_same_size(e["image"], e["label"])
    if task == "seg":
        if binarize and not mask_out:
            raise DatalistError("--binarize needs a folder for the 0/1 masks (mask_out)")
        n = _check_masks(everything, binarize, Path(mask_out) if mask_out else None, root)
        names = list(class_names) if class_names else ["background"] + [f"class_{i}" for i in range(1, n)]
        if len(names) != n:
            raise DatalistError(f"--class-names gives {len(names)} names but the masks hold {n} classes (0..{n - 1})")
    else:
        missing = sorted(set(range(len(names or []))) - {e["label"] for e in splits["training"]})
        if missing:
            raise DatalistError(f"class(es) {[names[i] for i in missing]} have no training image; add images")
    out = {s: _sorted(splits.get(s, [])) for s in SPLITS}
    return {**out, "task": task, "class_names": list(names or [])}
