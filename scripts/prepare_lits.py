#!/usr/bin/env python
"""LiTS (official volume-N.nii / segmentation-N.nii, e.g. in 'Training Batch 1/2') -> nnU-Net v2 raw dataset.

    python scripts/prepare_lits.py --root /data/LiTS --out $nnUNet_raw --dataset-id 501 [--link | --copy]

Writes $nnUNet_raw/Dataset501_LiTS (labels: background 0, liver 1, tumour 2). See tpp_monai.data.nnunet_raw.
"""

from tpp_monai.data.nnunet_raw import cli, prepare_lits

if __name__ == "__main__":
    raise SystemExit(cli(prepare_lits, 501, __doc__))
