"""Fine-tuning recipe the TPP paper leaves to MedCoSS (issue 11, defect 9): each piece against a
re-statement of MedCoSS's downstream code (Downstream/Dim_2/{Chest_XR,Glas,QaTa_CoV19}), and the resolved
configs of the 2D bundles."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLS_BUNDLES = ["mhist", "oct_c8", "chestxray_pa"]
SEG_BUNDLES = ["glas", "qata"]
TINY = {"vit_size": "tiny", "vit_overrides": {"depth": 2}, "image_size": 32, "backbone_ckpt": "", "tpp_ckpt": "",
        "num_workers": 0}


def _parser(bundle: str, **over):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(ROOT / f"bundles/{bundle}_adapter_tpp/configs/train.json")])
    for k, v in {**TINY, **over}.items():
        p[k] = v
    return p


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")


# ---------------------------------------------------------------------------------------- schedule
def _medcoss_lr(base_lr: float, epoch: int, num_epochs: int, power: float = 0.9) -> float:
    """MedCoSS adjust_learning_rate(optimizer, epoch, lr, num_epochs, power) for epoch >= 0 (lr_poly)."""
    return base_lr * ((1 - float(epoch) / num_epochs) ** power)


@pytest.mark.parametrize("epoch_length,num_iterations", [(250, 25000), (100, 1980), (1, 50)])
def test_poly_lr_matches_medcoss(epoch_length, num_iterations):
    from tpp_monai.bundle import poly_lr

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([w], lr=1e-4)
    sched = poly_lr(opt, num_iterations, epoch_length)
    epochs = math.ceil(num_iterations / epoch_length)
    checks = {0, 1, epoch_length - 1, epoch_length, 3 * epoch_length + 7, num_iterations // 2, num_iterations - 1}
    for it in range(num_iterations):
        if it in checks:  # lr used by iteration `it` (0-based) = MedCoSS's lr of epoch it // epoch_length
            want = _medcoss_lr(1e-4, it // epoch_length, epochs)
            assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), it
        opt.step()
        sched.step()


# ---------------------------------------------------------------------------------------- clipping
def test_grad_clip_handler_matches_clip_grad_norm():
    from tpp_monai.bundle import GradClipHandler

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    net[0].weight.requires_grad_(False)  # frozen: no grad, not in the optimiser
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    (1000 * net(torch.randn(4, 8)).square().sum()).backward()
    ref = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
    assert total > 12
    GradClipHandler(12.0)(SimpleNamespace(optimizer=opt, amp=False, scaler=None))
    got = [p.grad for p in opt.param_groups[0]["params"]]
    for g, r in zip(got, ref):
        assert torch.allclose(g, r * 12.0 / (total + 1e-6), rtol=1e-5)
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in got])) == pytest.approx(12, rel=1e-5)
    with pytest.raises(ValueError):
        GradClipHandler(0)


# ---------------------------------------------------------------------------------------- drop path
def test_drop_path_per_sample_and_inert_in_eval():
    from tpp_monai.backbones.drop_path import set_drop_path
    from tpp_monai.backbones.vit import build_vit

    torch.manual_seed(0)
    vit = build_vit("tiny", depth=2, img_size=32, layer_scale_init=0.5)
    keys = list(vit.state_dict())
    x = torch.randn(64, 5, vit.embed_dim)
    ref = vit.blocks[0].ls1(x)
    set_drop_path(vit, 0.5)
    assert list(vit.state_dict()) == keys  # hooks only: checkpoints and fingerprints are unchanged
    vit.eval()
    assert torch.equal(vit.blocks[0].ls1(x), ref)
    vit.train()
    out = vit.blocks[0].ls1(x)
    dropped = out.flatten(1).abs().sum(1) == 0
    kept = torch.isclose(out, 2 * ref).flatten(1).all(1)  # kept samples scaled by 1 / (1 - rate)
    assert bool((dropped | kept).all()) and 16 < int(dropped.sum()) < 48
    set_drop_path(vit, 0.0)
    assert torch.equal(vit.blocks[0].ls1(x), ref)


# ---------------------------------------------------------------------------------------- selection
def test_model_selection_score_is_acc_plus_auc_plus_f1():
    from tpp_monai.metrics.classification import ALL_METRICS, accuracy, auc, macro_f1

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 30)
    s = rng.random((30, 3))
    s /= s.sum(1, keepdims=True)
    assert ALL_METRICS["acc_auc_f1"](y, s) == pytest.approx(accuracy(y, s) + auc(y, s) + macro_f1(y, s))


# ---------------------------------------------------------------------------------------- augmentation
def test_cls_colour_augmentation_statistics_and_range():
    from tpp_monai.data.augment import RandColorAugd

    t = RandColorAugd("image", p_jitter=0.0, p_gray=1.0, p_blur=0.0)
    x = torch.rand(3, 16, 16)
    g = t({"image": x})["image"]
    want = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # ITU-R 601 luma (torchvision tensor rgb_to_grayscale)
    assert torch.allclose(g, want.expand(3, -1, -1), atol=1e-6)
    t = RandColorAugd("image", p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    assert torch.equal(t({"image": x})["image"], x)
    t = RandColorAugd("image")
    t.set_random_state(0)
    outs = [t({"image": x})["image"] for _ in range(20)]
    assert all(o.min() >= 0 and o.max() <= 1 and o.shape == x.shape for o in outs)
    assert sum(not torch.equal(o, x) for o in outs) >= 15  # P(untouched) = 0.2 * 0.8 * 0.5 = 0.08
    one = RandColorAugd("image")({"image": torch.rand(1, 8, 8)})["image"]  # 1 channel: no hue/saturation/gray
    assert one.shape == (1, 8, 8)


def test_augmentation_recipes_by_name():
    from monai.transforms import RandAdjustContrastd, RandFlipd, RandGaussianSmoothd, RandScaleIntensityd

    from tpp_monai.data.augment import RandColorAugd, cls_augmentations, seg_augmentations

    cls = cls_augmentations()
    assert [type(t) for t in cls] == [RandColorAugd, RandFlipd]
    seg = {type(t): t for t in seg_augmentations(image_size=64)}
    assert seg[RandScaleIntensityd].prob == pytest.approx(0.15)
    assert seg[RandAdjustContrastd].prob == pytest.approx(0.15)
    assert seg[RandGaussianSmoothd].prob == pytest.approx(0.15)
    assert len(seg_augmentations(recipe="legacy")) == 7 and seg_augmentations(recipe="none") == []
    with pytest.raises(ValueError, match="medcoss"):
        cls_augmentations("imagenet")


def test_seg_augmentation_keeps_masks_binary():
    from monai.transforms import Compose

    from tpp_monai.data.augment import seg_augmentations

    t = Compose(seg_augmentations(image_size=32))
    t.set_random_state(0)
    img = torch.rand(3, 32, 32)
    lab = (torch.rand(1, 32, 32) > 0.5).float()
    for _ in range(10):
        d = t({"image": img.clone(), "label": lab.clone()})
        assert set(torch.unique(torch.as_tensor(d["label"])).tolist()) <= {0.0, 1.0}
        assert d["image"].shape == img.shape


# ---------------------------------------------------------------------------------------- bundles
@pytest.mark.parametrize("bundle", CLS_BUNDLES + SEG_BUNDLES)
def test_bundle_recipe_is_medcoss(bundle, tmp_path):
    """Resolved fine-tuning config: AdamW wd 1e-4 on every trainable tensor, poly(0.9) lr without warm-up,
    gradient clipping 12, drop-path 0.1, MedCoSS's augmentations and model selection."""
    from monai.transforms import RandFlipd

    from tpp_monai.bundle import GradClipHandler
    from tpp_monai.data.augment import RandColorAugd

    p = _parser(bundle, bundle_root=str(tmp_path))
    seg = bundle in SEG_BUNDLES
    assert p["weight_decay"] == 1e-4
    opt = p.get_parsed_content("optimizer")
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    net = p.get_parsed_content("network")
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for q in net.parameters() if q.requires_grad)
    assert net.backbone.drop_path_rate == pytest.approx(0.1)
    raw_sched = p.get("lr_scheduler")
    assert raw_sched["_target_"] == "tpp_monai.bundle.poly_lr" and raw_sched["power"] == 0.9
    clip = p.get("train#default_handlers")[1]  # among the first two: runs on every DDP rank
    assert clip["_target_"] == "tpp_monai.bundle.GradClipHandler" and clip["max_norm"] == 12.0
    assert GradClipHandler(clip["max_norm"]).max_norm == 12.0
    train_tf = p.get_parsed_content("transforms#train").transforms
    names = [type(t).__name__ for t in train_tf]
    if seg:
        assert "RandAdjustContrastd" in names and "Rand2DElasticd" in names and "RandRotate90d" not in names
        assert p.get_parsed_content("metrics#selection") == {}
    else:
        assert any(isinstance(t, RandColorAugd) for t in train_tf) and any(isinstance(t, RandFlipd) for t in train_tf)
        assert list(p.get_parsed_content("metrics#selection")) == ["acc_auc_f1"]
    # best checkpoint = best key metric of the validator (CheckpointSaver save_key_metric)
    ev = p.get("validate#evaluator")
    # MONAI rewrites "#" ids as "::" once the config is parsed; both spell the same references
    assert ev["key_val_metric"].replace("::", "#") == "$@metrics#selection or @metrics#key"
    chosen = p.get_parsed_content("metrics#selection") or p.get_parsed_content("metrics#key")
    assert list(chosen) == (["dice"] if seg else ["acc_auc_f1"])


# ---------------------------------------------------------------------------------------- test-time flips
def test_flip_tta_matches_medcoss_multi_net_average():
    """MedCoSS evaluate.py: prediction = mean over flips none / H / W / HW of the (flipped-back) probabilities."""
    from tpp_monai.bundle import FlipTTAInferer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    net = torch.nn.Sequential(net, torch.nn.Upsample(size=(12, 10)))  # not flip-equivariant
    x = torch.randn(2, 3, 12, 10)
    sm = lambda t: torch.softmax(net(t), 1)  # noqa: E731
    want = (sm(x) + sm(x.flip(2)).flip(2) + sm(x.flip(3)).flip(3) + sm(x.flip(2).flip(3)).flip(3).flip(2)) / 4
    with torch.no_grad():
        got = FlipTTAInferer()(x, net)
        assert torch.allclose(got, want.detach(), atol=1e-6)
        assert not torch.allclose(got, sm(x), atol=1e-3)


@pytest.mark.parametrize("bundle", ["mhist", "qata"])
def test_evaluation_uses_flip_tta_for_segmentation_only(bundle, tmp_path):
    from monai.bundle import ConfigParser
    from monai.inferers import SimpleInferer

    from tpp_monai.bundle import FlipTTAInferer

    for stage, key in (("evaluate.json", "evaluate#evaluator#inferer"), ("inference.json", "evaluator#inferer")):
        p = ConfigParser()
        p.read_config([str(ROOT / f"bundles/{bundle}_adapter_tpp/configs/{f}") for f in ("train.json", stage)])
        for k, v in {**TINY, "bundle_root": str(tmp_path)}.items():
            p[k] = v
        inferer = p.get_parsed_content(key)
        assert isinstance(inferer, FlipTTAInferer if bundle == "qata" else SimpleInferer), stage
