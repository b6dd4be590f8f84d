"""Mean / per-label Dice of nnU-Net predictions, computed by nnU-Net itself (LiTS / KiTS style summary).

The numbers are nnU-Net's: :func:`nnunetv2.evaluation.evaluate_predictions.compute_metrics_on_folder` (the function
that writes ``fold_x/validation/summary.json`` after training) with the labels, regions, ``ignore`` label and
image reader of the dataset's ``dataset.json``. Per case and label Dice = 2TP / (2TP+FP+FN), NaN (skipped by the
per-label ``nanmean``) when the label is in neither image; "mean Dice" (TPP paper, Table 10) is nnU-Net's
``foreground_mean`` Dice, the mean of the per-label means. This module only renames the labels and condenses
nnU-Net's summary to ``{"mean_dice", "per_label", "n_cases", "per_case"}``; it computes no Dice of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _num(v) -> float | None:
    """JSON-safe float: NaN (label in no case) -> None."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _key(label) -> str:
    """nnU-Net's summary.json key of a label or region (``1``, ``(1, 2)``)."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    return str(label_or_region_to_key(tuple(label) if isinstance(label, list) else label))


def condense_summary(summary: dict, names: dict[str, int | tuple]) -> dict:
    """Our report from nnU-Net's summary (as returned by ``compute_metrics_on_folder`` or read from summary.json):
    ``names`` maps a label name to its nnU-Net label / region."""
    mean = {str(_key(k) if not isinstance(k, str) else k): v for k, v in summary["mean"].items()}
    per_label = {n: _num(mean[_key(v)]["Dice"]) for n, v in names.items()}
    per_case = {}
    for c in summary["metric_per_case"]:
        metrics = {str(_key(k) if not isinstance(k, str) else k): m for k, m in c["metrics"].items()}
        case = Path(c["prediction_file"]).name
        per_case[case] = {n: _num(metrics[_key(v)]["Dice"]) for n, v in names.items()
                          if _num(metrics[_key(v)]["Dice"]) is not None}
    return {"mean_dice": _num(summary["foreground_mean"]["Dice"]), "per_label": per_label,
            "n_cases": len(summary["metric_per_case"]), "per_case": per_case}


def nnunet_summary(pred_dir, ref_dir, dataset_json, summary_json=None, num_processes: int = 1) -> tuple[dict, dict]:
    """nnU-Net's ``compute_metrics_on_folder`` on ``pred_dir`` against ``ref_dir`` (labels, regions, ignore label,
    reader and file ending from ``dataset_json``); writes nnU-Net's summary.json to ``summary_json`` if given.
    Returns (nnU-Net's summary, {label name: label or region} of the foreground)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    meta = json.loads(Path(dataset_json).read_text())
    ending = meta.get("file_ending", ".nii.gz")
    preds = sorted(p.name for p in pred_dir.iterdir() if p.name.endswith(ending)) if pred_dir.is_dir() else []
    if not preds:
        raise FileNotFoundError(f"no *{ending} predictions in {pred_dir} (file_ending from {dataset_json}); "
                                "run the predict stage or point --pred at the folder of predicted masks")
    missing = [p for p in preds if not (ref_dir / p).is_file()]
    if missing:
        raise FileNotFoundError(f"reference {ref_dir / missing[0]} for prediction {missing[0]} is missing "
                                f"({len(missing)} of {len(preds)}); --ref must be the dataset's labelsTr folder")
    lm = LabelManager(meta["labels"], meta.get("regions_class_order"))
    fg = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    names = {}
    for name, v in meta["labels"].items():
        v = tuple(v) if isinstance(v, (list, tuple)) and len(v) > 1 else (v[0] if isinstance(v, (list, tuple)) else v)
        if v in fg:
            names[name] = v
    rw = determine_reader_writer_from_dataset_json(meta, str(ref_dir / preds[0]), verbose=False)()
    out = None
    if summary_json is not None:
        Path(summary_json).parent.mkdir(parents=True, exist_ok=True)
        out = str(summary_json)
    s = compute_metrics_on_folder(str(ref_dir), str(pred_dir), out, rw, ending, list(fg), lm.ignore_label,
                                  num_processes=max(1, int(num_processes)), chill=True)
    return s, names


def dice_summary_for_dataset(pred_dir, ref_dir, dataset_json, out=None, verbose: bool = True,
                             summary_json=None, num_processes: int = 1) -> dict:
    """Our condensed report of nnU-Net's metrics (:func:`condense_summary`); writes it to ``out`` (atomically) and
    nnU-Net's own summary.json to ``summary_json`` (default: ``nnunet_summary.json`` next to ``out``)."""
    if out is not None and summary_json is None:
        summary_json = Path(out).with_name("nnunet_summary.json")
    s, names = nnunet_summary(pred_dir, ref_dir, dataset_json, summary_json, num_processes)
    report = condense_summary(s, names)
    report["nnunet_summary_json"] = None if summary_json is None else str(summary_json)
    if verbose:
        print(format_summary(report))
    if out:
        from tpp_monai.safe_io import atomic_write

        atomic_write(out, json.dumps(report, indent=2))
    return report


def format_summary(s: dict) -> str:
    lines = [f"{k:>12}: {'n/a' if v is None else f'{100 * v:.2f}'}" for k, v in s["per_label"].items()]
    mean = "n/a" if s["mean_dice"] is None else f"{100 * s['mean_dice']:.2f}"
    lines.append(f"{'mean':>12}: {mean} ({s['n_cases']} cases; nnU-Net's compute_metrics_on_folder)")
    return "\n".join(lines)


__all__ = ["condense_summary", "dice_summary_for_dataset", "format_summary", "nnunet_summary"]
