"""Test-time inference of the segmentation bundles as MedCoSS evaluates (``Downstream/Dim_2/*/evaluate.py``).

MedCoSS predicts each test image with four flips -- none, along H, along W, along both -- and averages
the class probabilities (``multi_net`` + ``predict_sliding``).  Its Gaussian-weighted sliding window
has a single window when the image equals the window (GlaS 512 on 512, QaTa 224 on 224), where the
weighting cancels, so the flip average is the whole procedure.  :class:`FlipTTAInferer` returns those
averaged probabilities (softmax over the classes; the argmax post-processing is unchanged).  Validation
during training stays a plain forward pass, as in MedCoSS.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.inferers import Inferer

#: MedCoSS's flips of an NCHW batch: none, H (dim 2), W (dim 3), both.
MEDCOSS_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))


class FlipTTAInferer(Inferer):
    """Mean of ``softmax(network(flip(x)))`` flipped back, over ``flips`` (MedCoSS: :data:`MEDCOSS_FLIPS`)."""

    def __init__(self, flips: Sequence[Sequence[int]] = MEDCOSS_FLIPS) -> None:
        super().__init__()
        self.flips = tuple(tuple(int(d) for d in f) for f in flips)
        if not self.flips:
            raise ValueError("FlipTTAInferer needs at least one flip (use () for the identity)")

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = None
        for dims in self.flips:
            x = torch.flip(inputs, dims) if dims else inputs
            p = torch.softmax(network(x, *args, **kwargs), dim=1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
        return total / len(self.flips)
