#!/usr/bin/env python
"""Mean / per-label Dice of nnU-Net predictions against reference labels (LiTS/KiTS style summary).

    python scripts/nnunet_dice_summary.py --pred PRED_DIR --ref $nnUNet_raw/Dataset501_LiTS/labelsTr \\
        --dataset-json $nnUNet_raw/Dataset501_LiTS/dataset.json [--out summary.json]

Per case and label: Dice = 2|P&R| / (|P|+|R|); a label absent from both is skipped (not counted as 1).
Reports per-label means (e.g. organ, tumour) and their mean ("mean Dice", as in the TPP paper's Table 10).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_summary(pred_dir: Path, ref_dir: Path, labels: dict[str, int], file_ending: str = ".nii.gz") -> dict:
    preds = sorted(p for p in Path(pred_dir).iterdir() if p.name.endswith(file_ending))
    if not preds:
        raise FileNotFoundError(f"no *{file_ending} predictions in {pred_dir}")
    fg = {k: v for k, v in labels.items() if int(v) != 0}
    per_case, per_label = {}, {k: [] for k in fg}
    for p in preds:
        r = Path(ref_dir) / p.name
        if not r.is_file():
            raise FileNotFoundError(f"reference {r} for prediction {p.name} is missing")
        a, b = read(p), read(r)
        if a.shape != b.shape:
            raise ValueError(f"{p.name}: prediction shape {a.shape} != reference {b.shape}")
        case = {}
        for name, v in fg.items():
            pa, rb = a == int(v), b == int(v)
            denom = pa.sum() + rb.sum()
            if denom == 0:
                continue
            case[name] = float(2.0 * (pa & rb).sum() / denom)
            per_label[name].append(case[name])
        per_case[p.name[: -len(file_ending)]] = case
    means = {k: (float(np.mean(v)) if v else None) for k, v in per_label.items()}
    valid = [v for v in means.values() if v is not None]
    return {"mean_dice": float(np.mean(valid)) if valid else None, "per_label": means, "n_cases": len(per_case),
            "per_case": per_case}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, type=Path)
    ap.add_argument("--ref", required=True, type=Path)
    ap.add_argument("--dataset-json", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    meta = json.loads(a.dataset_json.read_text())
    labels = {k: v for k, v in meta["labels"].items() if isinstance(v, int)}
    s = dice_summary(a.pred, a.ref, labels, meta.get("file_ending", ".nii.gz"))
    for k, v in s["per_label"].items():
        print(f"{k:>12}: {'n/a' if v is None else f'{100 * v:.2f}'}")
    mean = "n/a" if s["mean_dice"] is None else f"{100 * s['mean_dice']:.2f}"
    print(f"{'mean':>12}: {mean} ({s['n_cases']} cases)")
    if a.out:
        a.out.write_text(json.dumps(s, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
