"""2D images stay upright: PNG pixels reach the network in PIL's row-major order (as the pre-trained
ViTs saw them) and predicted masks are written back so that they overlay their source image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tpp_monai.bundle import SaveMaskd
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


def test_saved_masks_overlay_their_image(tmp_path):
    entry, _, mask = _asymmetric_pair(tmp_path)
    label = seg_transforms(False, image_size=(20, 30), in_channels=3, num_classes=3)(entry)["label"]
    logits = torch.nn.functional.one_hot(label[0], 3).permute(2, 0, 1).float()  # a perfect prediction
    out = SaveMaskd("pred", output_dir=tmp_path / "pred")({"pred": logits.argmax(0, keepdim=True), "path": entry["image"]})
    assert out["pred_saved_to"] == str(tmp_path / "pred" / "img_seg.png")
    written = np.asarray(Image.open(out["pred_saved_to"]))
    assert written.dtype == np.uint8 and np.array_equal(written, mask)
    assert [p.name for p in (tmp_path / "pred").iterdir()] == ["img_seg.png"]  # no temporary folder left


def test_inference_masks_are_written_at_the_input_size_and_orientation(tmp_path):
    """infer_transforms records the input's size; the inference postprocessing (argmax -> RestoreSpatialSized
    -> SaveMaskd, as inference.json wires it) writes a perfect prediction made at 2x the size back equal to
    the original non-square mask."""
    from monai.transforms import AsDiscreted, Compose

    from tpp_monai.data.transforms import RestoreSpatialSized, infer_transforms

    entry, _, mask = _asymmetric_pair(tmp_path)
    x = infer_transforms(image_size=(40, 60), in_channels=3)({"image": entry["image"]})
    assert x["image"].shape == (3, 40, 60) and x["orig_size"].tolist() == [20, 30] and "label" not in x
    label = seg_transforms(False, image_size=(40, 60), in_channels=3, num_classes=3)(entry)["label"]
    logits = torch.nn.functional.one_hot(label[0], 3).permute(2, 0, 1).float()
    post = Compose([AsDiscreted("pred", argmax=True), RestoreSpatialSized("pred", "orig_size"),
                    SaveMaskd("pred", output_dir=tmp_path / "pred")])
    out = post({"pred": logits, "path": entry["image"], "orig_size": x["orig_size"]})
    assert out["pred"].shape == (1, 20, 30)
    assert np.array_equal(np.asarray(Image.open(out["pred_saved_to"])), mask)


def test_nifti_masks_keep_monai_order_and_a_missing_path_is_named(tmp_path):
    import nibabel as nib
    import pytest

    lab = torch.zeros(1, 5, 7, dtype=torch.uint8)
    lab[0, 1:3, 2:6] = 2
    saver = SaveMaskd("pred", output_dir=tmp_path, output_ext=".nii.gz")
    out = saver({"pred": lab.float(), "path": str(tmp_path / "case_01.nii.gz")})
    assert out["pred_saved_to"] == str(tmp_path / "case_01_seg.nii.gz")
    assert np.array_equal(np.asarray(nib.load(out["pred_saved_to"]).dataobj), lab[0].numpy())
    with pytest.raises(KeyError, match="path"):
        saver({"pred": lab})
