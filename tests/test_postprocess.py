"""SuppressOutsideBodyd: no foreground where the CT is air (all-air slices, image border)."""

import pytest
import torch

from tpp_monai.data.postprocess import SuppressOutsideBodyd


def _logits(h=8, w=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, h, w, generator=g)
    x[2] += 10.0  # a model that calls everything bone
    return x


def test_all_air_slice_gets_no_foreground():
    for air in (0.0, -2.1179):  # raw [0, 1] and ImageNet-normalised air
        img = torch.full((3, 8, 8), air)
        out = SuppressOutsideBodyd()({"pred": _logits(), "image": img})
        assert out["pred"].argmax(0).eq(0).all()


def test_body_pixels_keep_their_logits_and_air_pixels_become_background():
    img = torch.zeros(3, 8, 8)
    img[:, 2:6, 2:6] = 0.5  # a head in the middle, air around it (and on the border)
    img[:, 3, 3] = 0.004  # darker than 1% of the range above air: counts as air
    pred = _logits()
    out = SuppressOutsideBodyd()({"pred": pred, "image": img})["pred"]
    body = img[0] > 0.005
    assert torch.equal(out[:, body], pred[:, body])  # untouched inside the body
    lab = out.argmax(0)
    assert lab[~body].eq(0).all() and lab[body].eq(2).all()
    assert out[0].equal(pred[0])  # the background channel itself is never changed


def test_rejects_wrong_shapes_and_tolerances():
    with pytest.raises(ValueError, match="rel_tol"):
        SuppressOutsideBodyd(rel_tol=1.0)
    with pytest.raises(ValueError, match="logits matching"):
        SuppressOutsideBodyd()({"pred": torch.zeros(1, 8, 8), "image": torch.zeros(3, 8, 8)})
