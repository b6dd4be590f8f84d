"""Official LiTS / KiTS download layouts -> nnU-Net v2 raw datasets (shared by ``scripts/prepare_{lits,kits}.py``).

Output (``--out`` is the ``nnUNet_raw`` folder)::

    <out>/Dataset<ID>_<Name>/imagesTr/<case>_0000<ending>   (CT, channel 0)
    <out>/Dataset<ID>_<Name>/labelsTr/<case><ending>
    <out>/Dataset<ID>_<Name>/dataset.json                    (channel_names {"0": "CT"}, labels, numTraining, file_ending)

Layouts read:

- **LiTS** (CodaLab / Zenodo "Training Batch 1" + "Training Batch 2"): ``volume-N.nii`` and ``segmentation-N.nii``
  anywhere under ``--root`` (same folder or separate folders; ``.nii.gz`` also accepted). Labels 0 background,
  1 liver, 2 tumour. Cases are named ``lits_NNNN``. ``test-volume-N.nii`` files (no labels) are ignored.
- **KiTS19** (``kits19/data/case_XXXXX/{imaging,segmentation}.nii.gz``): 0 background, 1 kidney, 2 tumour.
  The official KiTS19 test cases (case_00210-00299) have no ``segmentation.nii.gz``: pass
  ``skip_unlabelled=True`` (``--skip-unlabelled``) to leave them out; otherwise they are an error.
- **KiTS21 / KiTS23** (``dataset/case_XXXXX/{imaging,segmentation}.nii.gz``): 0, 1 kidney, 2 tumour, 3 cyst.
  ``cyst`` chooses where label 3 goes: ``"kidney"`` (default: KiTS21's "kidney" hierarchical evaluation
  class, kidney + masses, contains cysts, so the kidney Dice counts them), ``"tumour"``, ``"background"``, or
  ``"keep"`` (a fourth label ``cyst`` = 3 in ``dataset.json``). KiTS19 trees never contain 3, so any choice
  gives the same dataset there.

Images are symlinked (``mode="link"``, default, absolute targets) or copied (``mode="copy"``); a label is
written with nibabel instead when its values must be remapped (KiTS cysts) or its file ending differs from the
dataset's. ``file_ending`` is the images' ending (``.nii`` for LiTS, ``.nii.gz`` for KiTS); nnU-Net reads both.

Every problem is a :class:`~tpp_monai.data.datalist.DatalistError` naming the file, raised before anything is
written: empty/missing root, a volume without segmentation, an unreadable or corrupt NIfTI, image/label shape
mismatch, unexpected label values, duplicate case numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tpp_monai.data.datalist import DatalistError

NII_ENDINGS = (".nii.gz", ".nii")
CYST_CHOICES = ("kidney", "tumour", "background", "keep")


@dataclass
class Case:
    """One labelled volume: ``case_id`` (nnU-Net identifier), source image and label files."""

    case_id: str
    image: Path
    label: Path


@dataclass
class RawDatasetSpec:
    """What goes into ``dataset.json`` and how source label values map to the written ones."""

    name: str
    labels: dict[str, int]
    allowed_values: tuple[int, ...]  # values a source label may contain
    label_map: dict[int, int] = field(default_factory=dict)  # source value -> written value (identity if absent)
    description: str = ""
    reference: str = ""
    licence: str = ""


def nii_ending(path: Path) -> str | None:
    name = path.name.lower()
    return next((e for e in NII_ENDINGS if name.endswith(e)), None)


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatalistError(f"--root {root} does not exist or is not a folder")
    return root


# ---------------------------------------------------------------------------------------------- layouts
_LITS_VOL = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_SEG = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)


def find_lits_cases(root: str | os.PathLike) -> list[Case]:
    """``volume-N.nii`` / ``segmentation-N.nii`` pairs anywhere under ``root`` (e.g. ``Training Batch 1/2``)."""
    root = _check_root(root)
    vols: dict[int, Path] = {}
    segs: dict[int, Path] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        for rx, d, what in ((_LITS_VOL, vols, "volume"), (_LITS_SEG, segs, "segmentation")):
            m = rx.match(p.name)
            if m:
                n = int(m.group(1))
                if n in d:
                    raise DatalistError(f"duplicate LiTS {what} {n}: {d[n]} and {p}; keep one copy under --root")
                d[n] = p
    if not vols:
        raise DatalistError(f"no LiTS volumes (volume-N.nii) found under {root}; point --root at the folder holding "
                            "'Training Batch 1' and 'Training Batch 2' (or the volume-N.nii files)")
    for n in sorted(segs):
        if n not in vols:
            raise DatalistError(f"segmentation {segs[n]} has no matching volume-{n}.nii under {root}")
    cases = []
    for n in sorted(vols):
        if n not in segs:
            raise DatalistError(f"missing segmentation for {vols[n]}: expected segmentation-{n}.nii under {root} "
                                "(re-download the training batch it belongs to)")
        cases.append(Case(f"lits_{n:04d}", vols[n], segs[n]))
    return cases


_KITS_CASE = re.compile(r"^case_(\d{5})$")


def find_kits_cases(root: str | os.PathLike, skip_unlabelled: bool = False) -> list[Case]:
    """``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz`` folders anywhere under ``root`` (KiTS19/21/23)."""
    root = _check_root(root)
    dirs = sorted(p for p in root.rglob("case_*") if p.is_dir() and _KITS_CASE.match(p.name))
    seen: dict[str, Path] = {}
    cases = []
    for d in dirs:
        img = next((d / f"imaging{e}" for e in NII_ENDINGS if (d / f"imaging{e}").is_file()), None)
        seg = next((d / f"segmentation{e}" for e in NII_ENDINGS if (d / f"segmentation{e}").is_file()), None)
        if img is None:
            if seg is not None:
                raise DatalistError(f"{seg} has no imaging.nii.gz next to it; re-download {d.name}")
            continue  # e.g. a case folder holding only KiTS23 instance annotations
        if d.name in seen:
            raise DatalistError(f"duplicate KiTS case {d.name}: {seen[d.name]} and {d}; keep one copy under --root")
        seen[d.name] = d
        if seg is None:
            if skip_unlabelled:
                continue
            raise DatalistError(f"missing segmentation for {img}: expected {d / 'segmentation.nii.gz'} "
                                "(KiTS19 test cases 210-299 have none: use --skip-unlabelled)")
        cases.append(Case(d.name, img, seg))
    if not cases:
        raise DatalistError(f"no KiTS cases (case_XXXXX/imaging.nii.gz + segmentation.nii.gz) found under {root}; "
                            "point --root at kits19/data or kits21/kits23 'dataset' folder")
    return cases


# ---------------------------------------------------------------------------------------------- specs
def lits_spec() -> RawDatasetSpec:
    return RawDatasetSpec(
        name="LiTS", labels={"background": 0, "liver": 1, "tumour": 2}, allowed_values=(0, 1, 2),
        description="Liver Tumor Segmentation Challenge (LiTS17) training set, 131 contrast-enhanced abdominal CTs",
        reference="Bilic et al., The Liver Tumor Segmentation Benchmark (LiTS), Medical Image Analysis 2023",
        licence="CC BY-NC-SA 4.0")


def kits_spec(cyst: str = "kidney") -> RawDatasetSpec:
    if cyst not in CYST_CHOICES:
        raise ValueError(f"cyst={cyst!r}: choose one of {CYST_CHOICES}")
    labels = {"background": 0, "kidney": 1, "tumour": 2}
    if cyst == "keep":
        labels["cyst"] = 3
        label_map = {}
    else:
        label_map = {3: {"kidney": 1, "tumour": 2, "background": 0}[cyst]}
    return RawDatasetSpec(
        name="KiTS", labels=labels, allowed_values=(0, 1, 2, 3), label_map=label_map,
        description=f"Kidney Tumor Segmentation Challenge (KiTS19/21/23) CTs; cyst label 3 -> {cyst}",
        reference="Heller et al., The KiTS21 Challenge, arXiv:2307.01984; Heller et al., MedIA 2021 (KiTS19)",
        licence="CC BY-NC-SA 4.0")


# ---------------------------------------------------------------------------------------------- checks
def load_nifti(path: Path, what: str, read_data: bool = True):
    """nibabel image (and its data if ``read_data``); DatalistError naming the file if it cannot be decoded."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj) if read_data else None
    except Exception as e:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error, ValueError...
        raise DatalistError(f"unreadable/corrupt {what} NIfTI: {path} ({type(e).__name__}: {e}); "
                            "re-download this file") from e
    if len(img.shape) != 3:
        raise DatalistError(f"{what} {path} has shape {img.shape}; expected a 3D volume")
    return img, data


def check_case(case: Case, spec: RawDatasetSpec, verify_images: bool = True) -> np.ndarray:
    """Both files decode, shapes agree, label values are allowed. Returns the sorted label values."""
    image, _ = load_nifti(case.image, "image", read_data=verify_images)
    label, seg = load_nifti(case.label, "segmentation", read_data=True)
    if tuple(image.shape) != tuple(label.shape):
        raise DatalistError(f"shape mismatch for case {case.case_id}: image {case.image} {tuple(image.shape)} vs "
                            f"segmentation {case.label} {tuple(label.shape)}")
    values = np.unique(seg)
    bad = [v for v in values.tolist() if float(v) not in [float(a) for a in spec.allowed_values]]
    if bad:
        raise DatalistError(f"unexpected label values {bad} in {case.label}; {spec.name} labels are "
                            f"{list(spec.allowed_values)}")
    return values


# ---------------------------------------------------------------------------------------------- writing
def _place(src: Path, dst: Path, mode: str) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if mode == "link":
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def _write_label(src: Path, dst: Path, label_map: dict[int, int]) -> None:
    import nibabel as nib

    img = nib.load(str(src))
    seg = np.rint(np.asanyarray(img.dataobj)).astype(np.uint8)
    if label_map:
        lut = np.arange(256, dtype=np.uint8)
        for a, b in label_map.items():
            lut[a] = b
        seg = lut[seg]
    out = nib.Nifti1Image(seg, img.affine, img.header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    nib.save(out, str(dst))


def _write_image(src: Path, dst: Path) -> None:
    import nibabel as nib

    img = nib.load(str(src))
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), str(dst))


def dataset_json(spec: RawDatasetSpec, num_training: int, file_ending: str) -> dict:
    d = {"channel_names": {"0": "CT"}, "labels": dict(spec.labels), "numTraining": num_training,
         "file_ending": file_ending, "name": spec.name, "description": spec.description}
    if spec.reference:
        d["reference"] = spec.reference
    if spec.licence:
        d["licence"] = spec.licence
    return d


def write_nnunet_raw(cases: Sequence[Case], spec: RawDatasetSpec, out: str | os.PathLike, dataset_id: int,
                     mode: str = "link", verify_images: bool = True, verbose: bool = True,
                     log: Callable[[str], None] = print) -> Path:
    """Check every case, then write ``<out>/Dataset<ID>_<name>``; returns that folder."""
    if mode not in ("link", "copy"):
        raise ValueError(f"mode={mode!r}: 'link' or 'copy'")
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset id {dataset_id} must be in 1..999 (nnU-Net uses three digits)")
    if not cases:
        raise DatalistError("no cases to write")
    file_ending = nii_ending(cases[0].image) or ".nii.gz"
    for i, c in enumerate(cases):  # all checks before writing anything
        values = check_case(c, spec, verify_images=verify_images)
        if verbose:
            log(f"[{i + 1}/{len(cases)}] {c.case_id}: {c.image.name} labels {values.astype(int).tolist()}")
    folder = Path(out) / f"Dataset{int(dataset_id):03d}_{spec.name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for c in cases:
        img_dst = folder / "imagesTr" / f"{c.case_id}_0000{file_ending}"
        if nii_ending(c.image) == file_ending:
            _place(c.image, img_dst, mode)
        else:
            _write_image(c.image, img_dst)
        lab_dst = folder / "labelsTr" / f"{c.case_id}{file_ending}"
        if spec.label_map or nii_ending(c.label) != file_ending:
            _write_label(c.label, lab_dst, spec.label_map)
        else:
            _place(c.label, lab_dst, mode)
    (folder / "dataset.json").write_text(json.dumps(dataset_json(spec, len(cases), file_ending), indent=2) + "\n")
    if verbose:
        log(f"wrote {folder} ({len(cases)} cases, {mode}, file_ending {file_ending}, labels {spec.labels})")
    return folder


def prepare_lits(root, out, dataset_id: int = 501, mode: str = "link", verify_images: bool = True,
                 verbose: bool = True) -> Path:
    return write_nnunet_raw(find_lits_cases(root), lits_spec(), out, dataset_id, mode, verify_images, verbose)


def prepare_kits(root, out, dataset_id: int = 502, mode: str = "link", cyst: str = "kidney",
                 skip_unlabelled: bool = False, verify_images: bool = True, verbose: bool = True) -> Path:
    spec = kits_spec(cyst)
    return write_nnunet_raw(find_kits_cases(root, skip_unlabelled), spec, out, dataset_id, mode, verify_images, verbose)


def add_common_args(ap, default_id: int) -> None:
    ap.add_argument("--root", required=True, type=Path, help="the official download folder")
    ap.add_argument("--out", type=Path, default=os.environ.get("nnUNet_raw"),
                    help="nnUNet_raw folder (default: $nnUNet_raw)")
    ap.add_argument("--dataset-id", type=int, default=default_id)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--link", dest="mode", action="store_const", const="link", help="symlink the files (default)")
    g.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy the files")
    ap.set_defaults(mode="link")
    ap.add_argument("--no-verify-images", action="store_true",
                    help="read only image headers (segmentations are always read fully)")


def cli(prepare: Callable[..., Path], default_id: int, doc: str, argv=None, extra: Callable | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, default_id)
    if extra:
        extra(ap)
    a = ap.parse_args(argv)
    if a.out is None:
        ap.error("--out is required when $nnUNet_raw is not set")
    kwargs = {k: v for k, v in vars(a).items() if k in ("cyst", "skip_unlabelled")}
    try:
        prepare(a.root, a.out, a.dataset_id, a.mode, verify_images=not a.no_verify_images, **kwargs)
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
