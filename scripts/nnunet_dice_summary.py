#!/usr/bin/env python
"""Mean / per-label Dice of nnU-Net predictions against reference labels (LiTS/KiTS style summary).

    python scripts/nnunet_dice_summary.py --pred PRED_DIR --ref $nnUNet_raw/Dataset501_LiTS/labelsTr \\
        --dataset-json $nnUNet_raw/Dataset501_LiTS/dataset.json [--out summary.json]

The metrics are nnU-Net's own (nnunetv2.evaluation.evaluate_predictions.compute_metrics_on_folder with the
labels, ignore label and reader of dataset.json): per case and label Dice = 2TP / (2TP+FP+FN), a label in neither
image is skipped; per-label means (e.g. organ, tumour) and their mean (nnU-Net's foreground_mean, "mean Dice" of
the TPP paper's Table 10). With --out, nnU-Net's summary.json is written next to it as nnunet_summary.json
(or to --summary-json). Library: tpp_monai.metrics.nnunet_dice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpp_monai.metrics.nnunet_dice import dice_summary_for_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, type=Path)
    ap.add_argument("--ref", required=True, type=Path)
    ap.add_argument("--dataset-json", required=True, type=Path)
    ap.add_argument("--out", type=Path, help="our condensed report (mean / per-label Dice)")
    ap.add_argument("--summary-json", type=Path, help="nnU-Net's summary.json (default: nnunet_summary.json next to --out)")
    ap.add_argument("--num-processes", type=int, default=1)
    a = ap.parse_args(argv)
    dice_summary_for_dataset(a.pred, a.ref, a.dataset_json, a.out, summary_json=a.summary_json,
                             num_processes=a.num_processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
