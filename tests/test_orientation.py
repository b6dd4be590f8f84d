"""2D images stay upright: PNG pixels reach the network in PIL's row-major order (as the pre-trained
ViTs saw them) and predicted masks are written back so that they overlay their source image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tpp_monai.bundle.handlers import PredictionWriter
from tpp_monai.data.transforms import cls_transforms, seg_transforms


def _asymmetric_pair(tmp_path):
    h, w = 20, 30  # non-square, and content that a transpose or flip changes
    rng = np.random.default_rng(0)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[2:6, 3:20] = 1
    mask[10:18, 22:27] = 2
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return {"image": str(tmp_path / "img.png"), "label": str(tmp_path / "mask.png")}, img, mask


def test_seg_and_cls_pipelines_read_pngs_upright(tmp_path):
    entry, img, mask = _asymmetric_pair(tmp_path)
    out = seg_transforms(False, image_size=(20, 30), in_channels=3, num_classes=3, normalize="none")(entry)
    assert out["label"].shape == (1, 20, 30)
    assert np.array_equal(out["label"][0].numpy(), mask)
    assert np.allclose(out["image"].numpy(), img.transpose(2, 0, 1) / 255.0, atol=1e-6)
    x = cls_transforms(False, image_size=(20, 30), in_channels=3, normalize="none")({"image": entry["image"], "label": 0})
    assert np.allclose(x["image"].numpy(), img.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_prediction_writer_masks_overlay_their_image(tmp_path):
    entry, _, mask = _asymmetric_pair(tmp_path)
    label = seg_transforms(False, image_size=(20, 30), in_channels=3, num_classes=3)(entry)["label"]
    logits = torch.nn.functional.one_hot(label[0], 3).permute(2, 0, 1).float()  # a perfect prediction
    writer = PredictionWriter(tmp_path / "pred", kind="seg")
    writer._start(None)
    written = writer._save_mask(logits.argmax(0, keepdim=True).to(torch.uint8), entry["image"])
    assert np.array_equal(np.asarray(Image.open(written)), mask)


def test_inference_masks_are_written_at_the_input_size_and_orientation(tmp_path):
    """infer_transforms records the input's size; the writer resizes the mask back (nearest): a perfect
    prediction made at 2x the size comes back equal to the original non-square mask."""
    from types import SimpleNamespace

    from tpp_monai.data.transforms import infer_transforms

    entry, _, mask = _asymmetric_pair(tmp_path)
    x = infer_transforms(image_size=(40, 60), in_channels=3)({"image": entry["image"]})
    assert x["image"].shape == (3, 40, 60) and x["orig_size"].tolist() == [20, 30] and "label" not in x
    label = seg_transforms(False, image_size=(40, 60), in_channels=3, num_classes=3)(entry)["label"]
    logits = torch.nn.functional.one_hot(label[0], 3).permute(2, 0, 1).float()
    writer = PredictionWriter(tmp_path / "pred", kind="seg")
    writer._start(None)
    engine = SimpleNamespace(state=SimpleNamespace(output=[{"pred": logits}],
                                                   batch=[{"path": entry["image"], "orig_size": x["orig_size"]}]))
    writer._iteration(engine)
    assert np.array_equal(np.asarray(Image.open(writer.written[0])), mask)
