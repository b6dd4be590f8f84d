#!/usr/bin/env python
"""KiTS19 / KiTS21 / KiTS23 (official case_XXXXX/imaging.nii.gz + segmentation.nii.gz) -> nnU-Net v2 raw dataset.

    python scripts/prepare_kits.py --root /data/kits21/dataset --out $nnUNet_raw --dataset-id 502 \\
        [--cyst kidney|tumour|background|keep] [--skip-unlabelled] [--link | --copy]

Writes $nnUNet_raw/Dataset502_KiTS (labels: background 0, kidney 1, tumour 2 [, cyst 3 with --cyst keep]).
KiTS21/23 cysts (label 3) go to kidney by default: KiTS21's "kidney" evaluation class (kidney + masses) contains
them. KiTS19 has no cyst label. --skip-unlabelled leaves out cases without segmentation (KiTS19 test cases).
See tpp_monai.data.nnunet_raw.
"""

from tpp_monai.data.nnunet_raw import CYST_CHOICES, cli, prepare_kits


def _extra(ap):
    ap.add_argument("--cyst", choices=CYST_CHOICES, default="kidney", help="where KiTS21/23 label 3 goes")
    ap.add_argument("--skip-unlabelled", action="store_true", help="skip case folders without segmentation")


if __name__ == "__main__":
    raise SystemExit(cli(prepare_kits, 502, __doc__, extra=_extra))
