"""Input pixel spaces of pre-trained backbones: which mean/std (if any) a backbone expects.

A frozen backbone only behaves as pre-trained when it sees the pixel space it was pre-trained in.
The data pipelines of tpp-monai therefore always produce images in [0, 1] and the backbone
normalises them itself (:meth:`tpp_monai.backbones.vit.VisionTransformer.set_input_norm`), so the
TPP stage, fine-tuning, evaluation, inference, TorchScript exports and the MONAI Label app cannot
disagree. Which space a checkpoint expects is decided by its format
(:data:`tpp_monai.backbones.weights.FORMAT_DEFAULTS`) and can be overridden by name or by an
explicit ``[mean, std]`` pair.

=====================  ===========================================  =================================================
name                   mean / std                                   used by
=====================  ===========================================  =================================================
``none``               (images stay in [0, 1])                      MedCoSS: ``ToTensor()`` only, pre-training and
                                                                    downstream (its ``Normalize`` line is commented out)
``imagenet``           (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)  official MAE, DINO, timm ViTs
``path_dino``          (0.70322989, 0.53606487, 0.66096631) /       Path_DINO (Kang et al., CVPR 2023, Lunit
                       (0.21716536, 0.26081574, 0.20723464)          ``benchmark-ssl-pathology``): the statistics its
                                                                    DINO ViTs were pre-trained with
``efficientnet_lite``  (127/255,) * 3 / (128/255,) * 3             the official TensorFlow EfficientNet-Lite weights
                                                                    (TF "edge" models: mean 127, std 128 on 0-255
                                                                    pixels, ``efficientnet_lite_builder.py``)
``zscore``             per image and channel: (x - mean) / std          MedCoSS's *segmentation* fine-tuning
                                                                    (``Downstream/Dim_2/QaTa_CoV19/DSDataset.py``);
                                                                    opt-in (its pre-training saw [0, 1])
=====================  ===========================================  =================================================
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATH_DINO_MEAN = (0.70322989, 0.53606487, 0.66096631)
PATH_DINO_STD = (0.21716536, 0.26081574, 0.20723464)
#: TensorFlow EfficientNet-Lite (and other "edge" models): (x*255 - 127) / 128
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

#: Per-image, per-channel standardisation (population std), as MedCoSS's segmentation data loaders.
ZSCORE = "zscore"

#: Named pixel spaces (``None``: no normalisation, images in [0, 1]; ``"zscore"``: per image and channel).
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None,
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "path_dino": (PATH_DINO_MEAN, PATH_DINO_STD),
    "efficientnet_lite": (EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD),
    ZSCORE: ZSCORE,  # type: ignore[dict-item]
}

InputNorm = str | Sequence | Mapping[str, Sequence[float]] | None


def resolve_input_norm(spec: InputNorm, in_channels: int = 3) -> Any:
    """``(mean, std)`` per channel for a pixel-space spec, None for images used as they are ([0, 1]), or
    :data:`ZSCORE` for per-image standardisation.

    ``spec``: a name of :data:`INPUT_NORMS`, ``None``, ``[mean, std]`` or ``{"mean": .., "std": ..}``
    (a single number or one per channel). ``"auto"`` is not accepted here: it is resolved from the
    backbone checkpoint (:func:`tpp_monai.bundle.networks.build_backbone`).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in INPUT_NORMS:
            hint = (" ('auto' is resolved from the backbone checkpoint by tpp_monai.bundle.build_backbone)"
                    if key == "auto" else "")
            raise ValueError(f"Unknown input normalisation '{spec}'{hint}; use one of {sorted(INPUT_NORMS)} "
                             "or an explicit [mean, std] pair")
        ms = INPUT_NORMS[key]
        if ms == ZSCORE:
            return ZSCORE
    elif isinstance(spec, Mapping):
        if set(spec) != {"mean", "std"}:
            raise ValueError(f"input normalisation mapping needs exactly 'mean' and 'std'; got {sorted(spec)}")
        ms = (spec["mean"], spec["std"])
    else:
        if len(spec) != 2:
            raise ValueError(f"input normalisation must be a name or a [mean, std] pair; got {spec!r}")
        ms = (spec[0], spec[1])
    if ms is None:
        return None
    mean, std = (_per_channel(v, in_channels, n) for v, n in zip(ms, ("mean", "std")))
    if any(s <= 0 for s in std):
        raise ValueError(f"input normalisation std must be positive; got {std}")
    return mean, std


def _per_channel(v: Any, channels: int, what: str) -> tuple[float, ...]:
    vals = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    if len(vals) == 1:
        return vals * channels
    if len(vals) != channels:
        raise ValueError(
            f"input normalisation {what} has {len(vals)} values but the backbone takes {channels} channel(s); "
            "give one value per channel (or a single value), or use input_norm 'none'"
        )
    return vals


def zscore_per_image(x: "torch.Tensor") -> "torch.Tensor":
    """(B, C, H, W) -> each image's channels standardised: ``(x - mean) / std`` (population std; a constant
    channel is only centred), as MedCoSS's segmentation loaders do with numpy."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))


class PixelSpaceMixin:
    """The pixel space a backbone was pre-trained in, applied inside the model (ViT, EfficientNet): channel order,
    then ``(x - mean) / std``, per-image z-scoring or nothing, on [0, 1] RGB input. Kept in non-persistent buffers
    (``input_mean``, ``input_std``, ``input_zscore``, ``input_channel_perm``): not in ``state_dict`` (checkpoints
    unchanged) but part of the backbone fingerprint, so target parameters trained in another pixel space are refused.
    Mixed into an ``nn.Module``, which calls :meth:`_init_pixel_space` in ``__init__``."""

    def _init_pixel_space(self) -> None:
        for name in ("input_mean", "input_std", "input_zscore", "input_channel_perm"):
            self.register_buffer(name, None, persistent=False)  # type: ignore[attr-defined]

    def _set_pixel_space(self, spec: Any, channel_order: str, in_chans: int, device: torch.device) -> None:
        order = str(channel_order).strip().lower()
        if order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr'; got {channel_order!r}")
        if order == "bgr" and in_chans != 3:
            raise ValueError(f"channel_order 'bgr' needs a 3-channel backbone; this one takes {in_chans}")
        self.input_channel_perm = torch.tensor([2, 1, 0], device=device) if order == "bgr" else None
        ms = resolve_input_norm(spec, in_chans)
        self.input_zscore = None
        if ms is None or ms == ZSCORE:
            self.input_mean = self.input_std = None
            if ms == ZSCORE:
                self.input_zscore = torch.ones(1, device=device)
        else:
            self.input_mean = torch.tensor(ms[0], device=device).reshape(1, -1, 1, 1)
            self.input_std = torch.tensor(ms[1], device=device).reshape(1, -1, 1, 1)

    def _pixel_space_spec(self) -> Any:
        """``"none"``, ``"zscore"`` or ``{"mean": [..], "std": [..]}``: what the buffers hold."""
        if self.input_zscore is not None:
            return ZSCORE
        if self.input_mean is None:
            return "none"
        return {"mean": self.input_mean.flatten().tolist(), "std": self.input_std.flatten().tolist()}

    @property
    def channel_order(self) -> str:
        """``"rgb"`` or ``"bgr"``: the channel order the backbone is fed."""
        return "rgb" if self.input_channel_perm is None else "bgr"

    def normalize_input(self, x: "torch.Tensor") -> "torch.Tensor":
        """Images in [0, 1] (RGB) -> the pixel space the backbone was pre-trained in (identity for ``"none"``)."""
        if self.input_channel_perm is not None:
            x = x.index_select(1, self.input_channel_perm.to(x.device))
        if self.input_zscore is not None:
            return zscore_per_image(x)
        if self.input_mean is None:
            return x
        return (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
