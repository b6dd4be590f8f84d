"""Post-processing of segmentation logits that encodes what the labels cannot contain."""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.transforms import MapTransform


class SuppressOutsideBodyd(MapTransform):
    """Background wherever the input image is air (its darkest value), for CT with threshold labels.

    Why: in CT windowed to a tissue range, air is clipped to the window's lower end, so it is the
    darkest value of the slice; labels defined by HU thresholds (InVesalius' soft tissue >= -142 HU,
    bone >= 226 HU) can never be foreground there. A small model still predicts tissue on an empty
    slice or along the image border; this makes those pixels background. A pixel counts as body
    when its first image channel exceeds the slice minimum by ``rel_tol`` of the slice's range, so an
    all-air slice (range 0) has no body and no foreground. Works on logits (C, H, W): the foreground
    channels are pushed below the background channel, so a later argmax / softmax sees background.
    """

    def __init__(self, keys: str = "pred", image_key: str = "image", rel_tol: float = 0.01,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
        self.image_key, self.rel_tol = image_key, rel_tol

    def body(self, image: torch.Tensor) -> torch.Tensor:
        """Boolean (H, W) mask of the pixels brighter than air."""
        x = torch.as_tensor(image)[0].float()
        lo, hi = x.min(), x.max()
        return x > lo + self.rel_tol * (hi - lo) if hi > lo else torch.zeros_like(x, dtype=torch.bool)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        outside = ~self.body(d[self.image_key])
        for key in self.key_iterator(d):
            pred = d[key].clone()
            if pred.shape[0] < 2 or pred.shape[-2:] != outside.shape:
                raise ValueError(f"{key}: expected (C >= 2, H, W) logits matching the image's {tuple(outside.shape)}, "
                                 f"got {tuple(pred.shape)}")
            floor = pred[0][outside] - 1.0
            for c in range(1, pred.shape[0]):
                pred[c][outside] = torch.minimum(pred[c][outside], floor)
            d[key] = pred
        return d
