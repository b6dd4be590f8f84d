#!/usr/bin/env python
"""A tiny *real* nnU-Net v2 dataset from the chest CTs shipped in the pyradiomics 3.0.1 source archive.

``lung1``/``lung2`` (512x512x48/61, 0.6x0.6x5 mm, HU, with a tumour mask) are resampled to
``--spacing`` (z, y, x; default 2.5 x 1.5 x 1.5 mm) and ``--cases-per-volume`` crops of ``--size``^3
voxels are cut around the tumour with different offsets (default 3 per volume -> 6 cases of 48^3).
Labels: 0 background, 1 lung (HU < -400 inside the body, body holes filled per axial
slice), 2 tumour (the pyradiomics mask). The archive is fetched with pip into
``.tpp_cache/demo_ct/downloads`` (shared with ``tpp_monai.data.demo_data``) once.

    python scripts/prepare_demo_ct_nnunet.py --out $nnUNet_raw --dataset-id 990
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

DOWNLOADS = Path(".tpp_cache/demo_ct/downloads")
VOLUMES = ("lung1", "lung2")
NAME = "DemoLungCT"


def read_nrrd(tf: tarfile.TarFile, member: str):
    import SimpleITK as sitk

    f = tf.extractfile(member)
    if f is None:
        raise FileNotFoundError(f"{member} missing in the pyradiomics archive")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.nrrd"
        p.write_bytes(f.read())
        return sitk.ReadImage(str(p))


def resample(img, spacing_xyz, label: bool):
    import SimpleITK as sitk

    size = [int(round(s * sp / t)) for s, sp, t in zip(img.GetSize(), img.GetSpacing(), spacing_xyz)]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                         img.GetOrigin(), spacing_xyz, img.GetDirection(), -1024.0 if not label else 0,
                         img.GetPixelID())


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Air (HU < -400) inside the body; the body = largest soft-tissue component, holes filled per slice."""
    from scipy import ndimage

    lab, n = ndimage.label(hu > -400)
    if n == 0:
        return np.zeros(hu.shape, bool)
    body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    filled = np.stack([ndimage.binary_fill_holes(sl) for sl in body])
    return filled & (hu < -400)


def build(out: Path, dataset_id: int, size: int, spacing_zyx, cases_per_volume: int, downloads: Path) -> Path:
    import SimpleITK as sitk

    from tpp_monai.data.demo_data import fetch_pyradiomics_archive

    archive = fetch_pyradiomics_archive(downloads, verbose=True)
    ds = out / f"Dataset{dataset_id:03d}_{NAME}"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    spacing_xyz = tuple(float(s) for s in spacing_zyx[::-1])
    rng = np.random.default_rng(0)
    n = 0
    with tarfile.open(archive, "r:gz") as tf:
        for name in VOLUMES:
            img = resample(sitk.Cast(read_nrrd(tf, f"pyradiomics-3.0.1/data/{name}_image.nrrd"), sitk.sitkFloat32),
                           spacing_xyz, False)
            lab_img = read_nrrd(tf, f"pyradiomics-3.0.1/data/{name}_label.nrrd")
            lab_img = resample(sitk.Cast(lab_img, sitk.sitkUInt8), spacing_xyz, True)
            hu = sitk.GetArrayFromImage(img)  # (z, y, x)
            tum = sitk.GetArrayFromImage(lab_img) > 0
            lung = lung_mask(hu) & ~tum
            pad = [(max(0, size - s), max(0, size - s)) for s in hu.shape]
            hu = np.pad(hu, pad, constant_values=-1024.0)
            tum = np.pad(tum, pad)
            lung = np.pad(lung, pad)
            centre = np.array([int(np.mean(ix)) for ix in np.nonzero(tum)])
            for k in range(cases_per_volume):
                jitter = rng.integers(-size // 4, size // 4 + 1, size=3) if k else np.zeros(3, int)
                start = np.clip(centre + jitter - size // 2, 0, np.array(hu.shape) - size)
                sl = tuple(slice(a, a + size) for a in start)
                crop = hu[sl].astype(np.float32)
                lab = np.where(tum[sl], 2, np.where(lung[sl], 1, 0)).astype(np.uint8)
                case = f"{NAME.lower()}_{n:03d}"
                for arr, path in ((crop, ds / "imagesTr" / f"{case}_0000.nii.gz"), (lab, ds / "labelsTr" / f"{case}.nii.gz")):
                    o = sitk.GetImageFromArray(arr)
                    o.SetSpacing(spacing_xyz)
                    sitk.WriteImage(o, str(path))
                print(f"{case}: {name} crop at {start.tolist()}, tumour voxels {int((lab == 2).sum())}, "
                      f"lung voxels {int((lab == 1).sum())}")
                n += 1
    meta = {
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1, "tumour": 2}, "numTraining": n,
        "file_ending": ".nii.gz", "name": NAME,
        "description": "Crops of the pyradiomics 3.0.1 chest CTs (lung1, lung2; BSD-3) around the tumour; lung "
                       "label from an HU threshold. A demo/test set, not a benchmark.",
    }
    (ds / "dataset.json").write_text(json.dumps(meta, indent=2))
    return ds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="nnU-Net raw folder (nnUNet_raw)")
    ap.add_argument("--dataset-id", type=int, default=990)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--spacing", type=float, nargs=3, default=(2.5, 1.5, 1.5), metavar=("Z", "Y", "X"))
    ap.add_argument("--cases-per-volume", type=int, default=3)
    ap.add_argument("--downloads", type=Path, default=DOWNLOADS)
    a = ap.parse_args(argv)
    try:
        ds = build(a.out, a.dataset_id, a.size, a.spacing, a.cases_per_volume, a.downloads)
    except Exception as e:  # noqa: BLE001 - one clear line for the user
        print(f"prepare_demo_ct_nnunet: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {ds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
