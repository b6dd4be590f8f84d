#!/usr/bin/env python
"""Trainable parameters of each CNN PEFT method (default config) on the EfficientNet-Lite0 encoder, as % of the
model, the way the TPP paper's "Ratio" column counts (task head included):

    python scripts/cnn_peft_ratios.py            # Markdown table on stdout (docs/PEFT_RATIOS.md, EfficientNet-Lite0)

- ``encoder``: target parameters / (encoder + target parameters);
- ``cls``: a linear head on the average-pooled stride-32 map (320 -> 2 classes) trains too;
- ``seg``: MONAI ``FlexibleUNet(3, 2, backbone="tpp-efficientnet-lite0")``, decoder and segmentation head trained.

Nothing is downloaded (random weights; counts do not depend on them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpp_monai.backbones.efficientnet import EfficientNetLite0Encoder  # noqa: E402
from tpp_monai.peft import PEFT_METHODS, apply_peft  # noqa: E402
from tpp_monai.peft.api import count_parameters  # noqa: E402

METHODS = ("linear", "conv_adapter", "conv_adapter_residual", "tsa", "norm_tuning", "bitfit", "ssf_cnn", "full")


def ratios(num_classes: int = 2) -> list[dict]:
    """One row per method: config, target params, and the three ratios in %."""
    from monai.networks.nets import FlexibleUNet

    rows = []
    for method in METHODS:
        enc = EfficientNetLite0Encoder()
        if method == "linear":
            for p in enc.parameters():
                p.requires_grad_(False)
            cfg = "-"
        else:
            peft = apply_peft(enc, method)
            cfg = ", ".join(f"{k}={v}" for k, v in peft.config.to_dict().items()) or "-"
        target, total = count_parameters(enc)
        cls_head = nn.Linear(enc.out_channels[-1], num_classes)
        seg = FlexibleUNet(3, num_classes, backbone="tpp-efficientnet-lite0", pretrained=False)
        dec = count_parameters(seg.decoder)[1] + count_parameters(seg.segmentation_head)[1]
        head = count_parameters(cls_head)[1]
        rows.append({"method": method, "config": cfg, "target": target, "total": total,
                     "encoder": 100.0 * target / total, "cls": 100.0 * (target + head) / (total + head),
                     "seg": 100.0 * (target + dec) / (total + dec), "cls_head": head, "decoder": dec})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | default config | target params | encoder % | cls % (linear 320 -> 2) | seg % (FlexibleUNet) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['config']} | {r['target']:,} | {r['encoder']:.3f} | {r['cls']:.3f} | "
                     f"{r['seg']:.3f} |")
    r0 = rows[0]
    lines.append("")
    lines.append(f"Encoder without PEFT: {r0['total']:,} parameters (EfficientNet-Lite0 up to stride 32, no 1280 head). "
                 f"Heads: linear 320 -> 2 {r0['cls_head']:,}; FlexibleUNet decoder + segmentation head {r0['decoder']:,}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    assert all(m in PEFT_METHODS for m in METHODS if m != "linear")
    print(table(ratios()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
