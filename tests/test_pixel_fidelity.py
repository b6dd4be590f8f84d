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


# ------------------------------------------------------------ channel order and segmentation z-score (23.2, 23.3)
def _cv2_imread(path) -> np.ndarray:
    """What ``cv2.imread(path)`` returns for an 8-bit colour image: the pixels in B, G, R order
    (OpenCV is not installed here; its documented behaviour is re-stated)."""
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[..., ::-1])


@pytest.fixture(scope="module")
def medcoss_file(tmp_path_factory):
    from test_pretext_fidelity import medcoss_state

    p = tmp_path_factory.mktemp("medcoss_px") / "checkpoint-299.pth"
    torch.save({"model": medcoss_state(dec_d=32, dec_depth=1), "epoch": 299}, p)
    return p


def _rgb_input(path) -> torch.Tensor:
    """Our pipelines' image: PIL (RGB) read, [0, 1], (1, 3, H, W)."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]


def test_medcoss_pathology_backbone_is_fed_bgr_like_its_tcga_loader(tmp_path, medcoss_file):
    """MedCoSS pre-trained pathology as ``cv2.imread -> Image.fromarray -> ToTensor`` (BGR;
    dataloader/TCGA_dataset.py) and classifies pathology the same way (NCT_CRC_HE/dataloader.py): the backbone
    must see B, G, R. Other modalities (grayscale X-ray/OCT/CT) and other formats stay RGB."""
    from tpp_monai.bundle.networks import build_backbone
    from tpp_monai.peft.api import backbone_fingerprint

    p = tmp_path / "he.png"
    _texture_png(p, 64, 64)
    x = _rgb_input(p)
    medcoss_bgr = torch.from_numpy(_cv2_imread(p).astype(np.float32) / 255).permute(2, 0, 1)[None]  # ToTensor
    path_bb = build_backbone(medcoss_file, img_size=64, task="cls", modality="pathology (H&E)")
    assert path_bb.channel_order == "bgr"
    assert torch.equal(path_bb.normalize_input(x), medcoss_bgr)
    xray_bb = build_backbone(medcoss_file, img_size=64, task="cls", modality="X-ray")
    assert xray_bb.channel_order == "rgb" and torch.equal(xray_bb.normalize_input(x), x)
    # the order is part of the backbone: target parameters trained in the other order are refused
    assert backbone_fingerprint(path_bb) != backbone_fingerprint(xray_bb)
    assert build_backbone(medcoss_file, img_size=64, modality="pathology", channel_order="rgb").channel_order == "rgb"


def test_medcoss_glas_pipeline_ends_in_rgb():
    """MedCoSS's GlaS: Preprocess/GlaS.py reads the BMP with PIL (RGB) and writes it with cv2.imwrite (which
    takes B, G, R): the PNG on disk holds R in its blue channel; DSDataset.py reads it with cv2.imread (B, G, R
    of the file) -- the two swaps cancel and the network gets R, G, B (documented in the GlaS bundle)."""
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    on_disk_rgb_order = rgb[..., ::-1]  # cv2.imwrite(arr): arr[..., 0] is stored as blue
    read_back = on_disk_rgb_order[..., ::-1]  # cv2.imread: channel 0 = the file's blue
    assert np.array_equal(read_back, rgb)


def _medcoss_zscore(img_chw: np.ndarray) -> np.ndarray:
    """MedCoSS's segmentation loaders (Downstream/Dim_2/{Glas,QaTa_CoV19}/DSDataset.py): float32 image,
    ``image2D[i] = (image2D[i] - image2D[i].mean()) / image2D[i].std()`` per channel (numpy: population std)."""
    out = img_chw.astype(np.float32).copy()
    for i in range(out.shape[0]):
        out[i] = (out[i] - out[i].mean()) / out[i].std()
    return out


@pytest.mark.parametrize("modality,bgr", [("pathology", True), ("X-ray", False)])
def test_medcoss_segmentation_backbone_zscores_each_image(tmp_path, medcoss_file, modality, bgr):
    """Segmentation with a MedCoSS backbone follows MedCoSS's fine-tuning: each image z-scored per channel
    (scale-free, so MedCoSS's 0..255 values and our 0..1 values give the same result)."""
    from tpp_monai.bundle.networks import build_backbone

    p = tmp_path / "img.png"
    _texture_png(p, 64, 64)
    bb = build_backbone(medcoss_file, img_size=64, task="seg", modality=modality)
    assert bb.input_norm == "zscore" and bb.channel_order == ("bgr" if bgr else "rgb")
    arr = _cv2_imread(p) if bgr else np.asarray(Image.open(p).convert("RGB"))
    ref = torch.from_numpy(_medcoss_zscore(arr.transpose(2, 0, 1)))[None]
    got = bb.normalize_input(_rgb_input(p))
    # float32 means/stds of 4096 values in another summation order: ~1e-6 relative on |z| <= ~4
    assert torch.allclose(got, ref, atol=2e-5, rtol=0), (got - ref).abs().max()
    # classification keeps MedCoSS's [0, 1] ToTensor space
    assert build_backbone(medcoss_file, img_size=64, task="cls", modality=modality).input_norm == "none"
