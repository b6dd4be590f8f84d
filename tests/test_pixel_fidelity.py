"""Pixel fidelity of the 2D pipelines against MedCoSS (issue 23 items 1-3).

Each test compares our chain with a re-statement of what MedCoSS's own code does to the pixels
(PIL resize, OpenCV's BGR read, numpy z-scoring), never with our code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tpp_monai.data.transforms import cls_transforms, infer_transforms, seg_transforms, tpp_transforms


def _texture_png(path, h: int = 600, w: int = 500) -> np.ndarray:
    """An 8-bit RGB image with fine texture (what aliases when shrunk), written as PNG."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    g = (127.5 + 60 * np.sin(xx * 1.3) * np.cos(yy * 0.9) + 40 * rng.standard_normal((h, w))).clip(0, 255)
    img = np.stack([g, 255 - g, g / 2], -1).astype(np.uint8)
    Image.fromarray(img).save(path)
    return img


def _pil_bilinear(path, size: int) -> np.ndarray:
    """MedCoSS's resize: ``transforms.Resize`` / ``Image.resize(BILINEAR)`` on the PIL image, then ToTensor."""
    return np.asarray(Image.open(path).resize((size, size), Image.BILINEAR)).astype(np.float32).transpose(2, 0, 1) / 255


# PIL rounds its 8-bit result (<= 0.5/255) and sums its filter in fixed point (22 fractional bits);
# float32 sums of <= 6 terms add ~1e-7. So the two agree to within 1/255, far below the aliasing error
# of an un-filtered bilinear shrink (up to ~110/255 on this texture).
AA_BOUND = 1.0 / 255


@pytest.mark.parametrize("chain", ["cls", "seg", "infer", "tpp_plain"])
def test_downsizing_matches_pil_antialiased_resize(tmp_path, chain):
    p = tmp_path / "t.png"
    img = _texture_png(p)
    ref = _pil_bilinear(p, 224)
    if chain == "cls":
        out = cls_transforms(False, 224, 3)({"image": str(p), "label": 0})["image"]
    elif chain == "infer":
        out = infer_transforms(224, 3)({"image": str(p)})["image"]
    elif chain == "tpp_plain":
        out = tpp_transforms(224, 3, augment=False)({"image": str(p)})["image"]
    else:
        m = tmp_path / "m.png"
        yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
        Image.fromarray((((yy - 300) ** 2 + (xx - 250) ** 2 < 150 ** 2) * 255).astype(np.uint8)).save(m)
        d = seg_transforms(False, 224, 3)({"image": str(p), "label": str(m)})
        out = d["image"]
        # the mask stays nearest-neighbour (class indices stay class indices)
        ref_mask = np.asarray(Image.open(m).resize((224, 224), Image.NEAREST)) > 0
        assert set(np.unique(d["label"].numpy())) <= {0, 1}
        assert (d["label"][0].numpy() != ref_mask).sum() <= 2 * 224  # sampling phase: at most the rim
    err = np.abs(np.asarray(out, np.float32) - ref)
    assert err.max() <= AA_BOUND, f"max |ours - PIL| = {err.max() * 255:.2f}/255"


def test_label_app_input_is_antialiased_like_the_bundles(tmp_path):
    from tpp_monai.label.seg2d import to_model_input

    p = tmp_path / "t.png"
    img = _texture_png(p)
    out = to_model_input(img, 224, 3).numpy()
    assert np.abs(out - _pil_bilinear(p, 224)).max() <= AA_BOUND
