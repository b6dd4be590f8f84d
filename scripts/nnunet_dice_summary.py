#!/usr/bin/env python
"""Mean / per-label Dice of nnU-Net predictions against reference labels (LiTS/KiTS style summary).

    python scripts/nnunet_dice_summary.py --pred PRED_DIR --ref $nnUNet_raw/Dataset501_LiTS/labelsTr \\
        --dataset-json $nnUNet_raw/Dataset501_LiTS/dataset.json [--out summary.json]

Per case and label: Dice = 2|P&R| / (|P|+|R|); a label absent from both is skipped (not counted as 1).
Reports per-label means (e.g. organ, tumour) and their mean ("mean Dice", as in the TPP paper's Table 10).
Library: tpp_monai.metrics.nnunet_dice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tpp_monai.metrics.nnunet_dice import dice_summary, dice_summary_for_dataset  # noqa: F401 (re-export)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, type=Path)
    ap.add_argument("--ref", required=True, type=Path)
    ap.add_argument("--dataset-json", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    dice_summary_for_dataset(a.pred, a.ref, a.dataset_json, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
