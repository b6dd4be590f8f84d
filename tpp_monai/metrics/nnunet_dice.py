"""Mean / per-label Dice of nnU-Net predictions against reference labels (LiTS / KiTS style summary).

Per case and label: Dice = 2|P&R| / (|P|+|R|); a label absent from both is skipped (not counted as 1).
Reports per-label means (e.g. organ, tumour) and their mean ("mean Dice", as in the TPP paper's Table 10).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_label(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_summary(pred_dir, ref_dir, labels: dict[str, int], file_ending: str = ".nii.gz") -> dict:
    """``{"mean_dice", "per_label": {name: mean}, "n_cases", "per_case": {case: {name: dice}}}``."""
    preds = sorted(p for p in Path(pred_dir).iterdir() if p.name.endswith(file_ending))
    if not preds:
        raise FileNotFoundError(f"no *{file_ending} predictions in {pred_dir}")
    fg = {k: v for k, v in labels.items() if int(v) != 0}
    per_case, per_label = {}, {k: [] for k in fg}
    for p in preds:
        r = Path(ref_dir) / p.name
        if not r.is_file():
            raise FileNotFoundError(f"reference {r} for prediction {p.name} is missing")
        a, b = read_label(p), read_label(r)
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


def dice_summary_for_dataset(pred_dir, ref_dir, dataset_json, out=None, verbose: bool = True) -> dict:
    """:func:`dice_summary` with labels / file ending from an nnU-Net ``dataset.json``; optionally writes ``out``."""
    meta = json.loads(Path(dataset_json).read_text())
    labels = {k: v for k, v in meta["labels"].items() if isinstance(v, int)}
    s = dice_summary(pred_dir, ref_dir, labels, meta.get("file_ending", ".nii.gz"))
    if verbose:
        print(format_summary(s))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(s, indent=2))
    return s


def format_summary(s: dict) -> str:
    lines = [f"{k:>12}: {'n/a' if v is None else f'{100 * v:.2f}'}" for k, v in s["per_label"].items()]
    mean = "n/a" if s["mean_dice"] is None else f"{100 * s['mean_dice']:.2f}"
    lines.append(f"{'mean':>12}: {mean} ({s['n_cases']} cases)")
    return "\n".join(lines)
