"""Print the PEFT "Ratio" table (trainable / all parameters, %, task head included) of every PEFT
method's *default* config on the MedCoSS ViT-B/16, beside the TPP paper's figures.

    python scripts/peft_ratios.py               # Markdown table on stdout
    python scripts/peft_ratios.py --out docs/PEFT_RATIOS_table.md

Nothing is downloaded and nothing is allocated: the backbone (MedCoSS layout, 224 px), the PEFT
method, the classification head (``linear_cls``, 2 classes as MHIST) and the UNETR-style 2D decoder
(``unetr2d``, 2 classes as GlaS / QaTa) are built on PyTorch's ``meta`` device and only counted.

Two denominators:

* ``2D``: the model this toolkit builds (MedCoSS's 2D encoder and embeddings, 86,452,224 parameters
  without head).
* ``paper``: the model the TPP paper counted. Its Ratio column is reproduced exactly (VPT, BitFit,
  linear probe, UNETR decoder) only by MedCoSS's whole downstream ``Unified_Model``, which keeps
  the 3D patch embedding and 3D position tables of the multi-modal ``VideoBaseEmbedding`` and the
  full 8-row 2D temporal table: 6,304,512 parameters the 2D path never uses (92,756,736 in all).
  BitFit trains every bias, the unused 3D patch-embedding bias included; full fine-tuning trains
  everything. MedCoSS's segmentation model has no class token. See docs/PEFT_RATIOS.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpp_monai.backbones.vit import VisionTransformer, ViTConfig  # noqa: E402
from tpp_monai.heads import HEADS  # noqa: E402
from tpp_monai.peft.api import count_parameters  # noqa: E402
from tpp_monai.safe_io import atomic_write  # noqa: E402
from tpp_monai.peft import PEFT_METHODS, apply_peft  # noqa: E402

#: TPP paper (Lei et al.), Table 3/4 "Ratio" columns in %: (classification, segmentation)
PAPER_RATIOS: dict[str, tuple[float, float]] = {
    "linear": (0.003, 2.0),
    "evp": (0.961, 2.94),
    "vpt": (0.10, 2.10),
    "ssf": (0.172, 2.17),
    "bitfit": (0.12, 2.11),
    "adapter": (3.045, 4.98),
    "adaptformer": (3.831, 5.75),
    "dtl": (0.05, 2.05),
    "full": (100.0, 100.0),
}

D, PATCH = 768, 16
#: parameter groups of MedCoSS's downstream Unified_Model that the 2D forward never uses:
#: name -> (numel, is_bias). 3D tables are sized by the downstream default input_size_3D (256)^3.
MEDCOSS_UNUSED: dict[str, tuple[int, bool]] = {
    "video_embed.embeddings_3D.weight": (D * 1 * PATCH ** 3, False),
    "video_embed.embeddings_3D.bias": (D, True),
    "video_embed.embeddings_st_pos_3D.spatial_pos_embed.weight": ((256 // PATCH) ** 3 * D, False),
    "video_embed.embeddings_st_pos_3D.temporal_pos_embed.weight": (8 * D, False),
    # row 0 is folded into our position table (eval-mode MedCoSS adds it); the table is a parameter
    "video_embed.embeddings_st_pos_2D.temporal_pos_embed.weight": (8 * D, False),
}
#: MedCoSS's segmentation Unified_Model has no cls_token (ours has one, frozen)
MEDCOSS_SEG_MISSING = D
NUM_CLASSES = 2


@dataclass
class Count:
    trainable: int
    total: int

    @property
    def ratio(self) -> float:
        return 100.0 * self.trainable / self.total


def _count(modules: list[nn.Module]) -> tuple[int, int]:
    counts = [count_parameters(m) for m in modules]
    return sum(t for t, _ in counts), sum(n for _, n in counts)


def method_counts(method: str, config: dict[str, Any] | None = None, img_size: int = 224) -> dict[str, Count]:
    """Counts of ``method`` (default config unless ``config``) on the MedCoSS ViT-B, for both tasks.

    Keys: ``cls_2d``, ``seg_2d`` (the model built here) and ``cls_paper``, ``seg_paper`` (MedCoSS's
    whole downstream model, as the TPP paper counted it).
    """
    with torch.device("meta"):
        vit = VisionTransformer(ViTConfig.medcoss(img_size=img_size))
        apply_peft(vit, method, config or {})
        cls_head = HEADS.get("linear_cls")(D, NUM_CLASSES)
        seg_head = HEADS.get("unetr2d")(in_channels=3, embed_dim=D, num_classes=NUM_CLASSES)
    out: dict[str, Count] = {}
    extra_total = sum(n for n, _ in MEDCOSS_UNUSED.values())
    if method == "full":
        extra_train = extra_total
    elif method == "bitfit":
        extra_train = sum(n for n, is_bias in MEDCOSS_UNUSED.values() if is_bias)
    else:
        extra_train = 0
    for task, head, missing in (("cls", cls_head, 0), ("seg", seg_head, MEDCOSS_SEG_MISSING)):
        t, n = _count([vit, head])
        out[f"{task}_2d"] = Count(t, n)
        missing_train = missing if method == "full" else 0
        out[f"{task}_paper"] = Count(t + extra_train - missing_train, n + extra_total - missing)
    return out


def target_count(method: str, config: dict[str, Any] | None = None) -> int:
    """Trainable parameters inside the backbone (the target parameters; the head excluded)."""
    with torch.device("meta"):
        vit = VisionTransformer(ViTConfig.medcoss())
        apply_peft(vit, method, config or {})
    return count_parameters(vit)[0]


def rel_err(ours: float, paper: float) -> float:
    return (ours - paper) / paper


def table(methods: list[str] | None = None) -> str:
    """The Markdown table (paper vs ours, paper's denominator and 2D-only)."""
    methods = methods or list(PAPER_RATIOS)
    lines = [
        "| method | default config | target params | cls: paper | cls: ours (paper's count) | rel. | cls: ours (2D only) "
        "| seg: paper | seg: ours (paper's count) | rel. | seg: ours (2D only) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        c = method_counts(m)
        pc, ps = PAPER_RATIOS[m]
        cfg = PEFT_METHODS.get(m).config_cls().to_dict()
        cfg_s = ", ".join(f"{k}={v}" for k, v in cfg.items()) or "-"
        lines.append(
            f"| {m} | {cfg_s} | {target_count(m):,} | {pc:g} | {c['cls_paper'].ratio:.4f} | "
            f"{100 * rel_err(c['cls_paper'].ratio, pc):+.1f}% | {c['cls_2d'].ratio:.4f} | {ps:g} | "
            f"{c['seg_paper'].ratio:.4f} | {100 * rel_err(c['seg_paper'].ratio, ps):+.1f}% | {c['seg_2d'].ratio:.4f} |"
        )
    c = method_counts("linear")
    lines += [
        "",
        f"Denominators without PEFT: cls {c['cls_paper'].total:,} (paper's count) / {c['cls_2d'].total:,} (2D only); "
        f"seg {c['seg_paper'].total:,} / {c['seg_2d'].total:,}. Heads: linear_cls {NUM_CLASSES} classes "
        f"{c['cls_2d'].trainable:,}, unetr2d {NUM_CLASSES} classes {c['seg_2d'].trainable:,}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    a = ap.parse_args(argv)
    text = table()
    print(text)
    if a.out:
        atomic_write(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
