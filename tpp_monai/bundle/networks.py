"""Network factories used by the bundles' ``network_def`` (plain arguments, type hints, loud errors).

    backbone  = build_backbone(backbone_ckpt, size="base", img_size=224)          # "" -> random init (warned)
    backbone  = build_peft_backbone(backbone_ckpt, ..., peft_method="adapter", peft_config={...},
                                    tpp_ckpt="models/tpp_target_params.pt")       # stage-2 hand-over
    network   = build_classifier(...) / build_segmenter(...)                       # backbone + task head
    encoder   = build_peft_cnn_backbone(backbone_ckpt, peft_method="conv_adapter")  # 2D CNN (EfficientNet-Lite0)
    network   = build_cnn_classifier(encoder, ...) / build_cnn_segmenter(encoder, ...)  # pool+linear / FlexibleUNet
    network   = load_target_params(network, tpp_ckpt)                             # bundles' ``network`` id

A backbone built without a checkpoint is seeded (``init_seed``), so the TPP stage and the
fine-tuning stage build the *same* random backbone and the target-parameter checkpoint's
fingerprint check passes.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tpp_monai.backbones import BACKBONES
from tpp_monai.backbones.vit import VisionTransformer

logger = logging.getLogger("tpp_monai.bundle")

TPP_MISSING_HELP = (
    "Run the TPP stage first (python -m monai.bundle run --config_file <bundle>/configs/tpp_pretrain.json "
    "--dataset_dir ... --backbone_ckpt ...), point --tpp_ckpt to its models/tpp_target_params.pt, "
    "or pass --tpp_ckpt \"\" to fine-tune from the method's own initialisation (\"without TPP\")."
)


class TPPCheckpointMissing(FileNotFoundError):
    """The stage-2 target-parameter checkpoint named by ``tpp_ckpt`` does not exist."""


def _is_empty(path: str | os.PathLike | None) -> bool:
    return path is None or str(path).strip() in ("", "None", "none")


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` under ``seed``, leaving the caller's RNG stream as it was: the TPP and the fine-tuning stage
    build the same random backbone, and the rest of the run draws the same numbers as with a checkpoint."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def build_backbone(
    backbone_ckpt: str | os.PathLike | None = "",
    size: str = "base",
    img_size: int = 224,
    in_chans: int = 3,
    patch_size: int = 16,
    allow_pickle: bool = False,
    ckpt_format: str = "auto",
    init_seed: int = 0,
    vit_overrides: Mapping[str, Any] | None = None,
    input_norm: Any = "auto",
    task: str = "cls",
    modality: str | None = None,
    channel_order: str = "auto",
) -> VisionTransformer:
    """A ViT from a pre-trained checkpoint (MedCoSS / MAE / DINO / timm), or a seeded random one.

    ``task`` ("cls"/"seg") and ``modality`` (e.g. "pathology") choose the checkpoint format's pixel space
    for ``input_norm="auto"`` / ``channel_order="auto"``: MedCoSS segmentation z-scores each image (its
    ``DSDataset.py``), MedCoSS pathology is fed BGR (its TCGA pre-training read OpenCV's BGR); everything
    else is RGB in the format's space. A random backbone: "none", RGB.

    ``input_norm``: the pixel space the backbone normalises its [0, 1] input images into (inside the
    model, so every stage agrees): ``"auto"`` takes the checkpoint's (recorded, else its format's:
    MedCoSS ``"none"``, MAE/DINO/timm ``"imagenet"``; a random backbone ``"none"``); or ``"none"``,
    ``"imagenet"``, ``"path_dino"``, ``[mean, std]`` (see :mod:`tpp_monai.data.normalization`).

    ``backbone_ckpt`` empty: random initialisation with a loud warning (smoke tests only).
    With a checkpoint, the architecture is inferred from its tensors (``size``/``vit_overrides``
    are then ignored, except ``img_size``; ``vit_overrides`` e.g. ``{"depth": 4}``); ``allow_pickle`` opts into legacy pickled files
    (MedCoSS ``.pth``) from trusted sources only.
    """
    if _is_empty(backbone_ckpt):
        msg = ("No --backbone_ckpt given: the ViT backbone is RANDOMLY INITIALISED (seed %d). This is only useful "
               "for smoke tests; pass --backbone_ckpt /path/to/medcoss_or_mae.pth for real results." % init_seed)
        warnings.warn(msg, stacklevel=2)
        overrides = dict(vit_overrides or {})  # e.g. {"depth": 6, "patch_size": 8}: overrides win
        overrides.setdefault("patch_size", patch_size)
        # the registered factory (tpp_monai.backbones.BACKBONES), as a new backbone would be
        model = _seeded(lambda: BACKBONES.get("vit")(size, img_size=img_size, in_chans=in_chans, **overrides),
                        init_seed)
        return model.set_input_norm("none" if _is_auto(input_norm) else input_norm,
                                    "rgb" if _is_auto(channel_order) else channel_order)
    from tpp_monai.backbones.weights import build_vit_from_checkpoint

    p = Path(backbone_ckpt)  # type: ignore[arg-type]
    if not p.is_file():
        raise FileNotFoundError(f"--backbone_ckpt {p} does not exist; give the pre-trained ViT checkpoint "
                                "(MedCoSS/MAE/DINO/timm) or \"\" for a random backbone (smoke tests only).")
    model, loaded = build_vit_from_checkpoint(p, format=ckpt_format, allow_pickle=allow_pickle, img_size=img_size)
    auto_norm, auto_order = loaded.pixel_space(task, modality)
    model.set_input_norm(auto_norm if _is_auto(input_norm) else input_norm,
                         auto_order if _is_auto(channel_order) else channel_order)
    logger.info("backbone: %s; input normalisation %s, channel order %s", loaded.summary(), model.input_norm,
                model.channel_order)
    from tpp_monai.safe_io import warn_if_non_finite

    warn_if_non_finite(model.state_dict(), p, "backbone checkpoint")
    return model


def _is_auto(input_norm: Any) -> bool:
    return input_norm is None or (isinstance(input_norm, str) and input_norm.strip().lower() in ("auto", ""))


def read_backbone_checkpoint(backbone_ckpt: str | os.PathLike | None, allow_pickle: bool = False,
                             ckpt_format: str = "auto"):
    """The converted backbone checkpoint (:class:`~tpp_monai.backbones.weights.LoadedCheckpoint`:
    MAE decoder, its heads, the pixel space), or None without a checkpoint."""
    if _is_empty(backbone_ckpt):
        return None
    from tpp_monai.backbones.weights import load_vit_checkpoint

    return load_vit_checkpoint(backbone_ckpt, format=ckpt_format, allow_partial=True, allow_pickle=allow_pickle)


def load_target_params(network: nn.Module, tpp_ckpt: str | os.PathLike | None) -> nn.Module:
    """Load the TPP stage's target parameters into ``network`` (or ``network.backbone``), checked.

    ``tpp_ckpt`` ``""``: nothing is loaded and the log says so (fine-tuning without TPP); ``None``: nothing is
    loaded or logged (evaluation / inference load the whole network from model.pt afterwards). A missing file is a
    :class:`TPPCheckpointMissing` telling how to produce it.
    """
    if tpp_ckpt is None:
        return network
    if _is_empty(tpp_ckpt):
        logger.info("no --tpp_ckpt: fine-tuning WITHOUT TPP (target parameters keep their default init)")
        return network
    p = Path(tpp_ckpt)  # type: ignore[arg-type]
    if not p.is_file():
        raise TPPCheckpointMissing(f"TPP target-parameter checkpoint not found: {p}. {TPP_MISSING_HELP}")
    from tpp_monai.peft.target_checkpoint import load_target_checkpoint

    backbone = getattr(network, "backbone", network)
    meta = load_target_checkpoint(p, backbone)
    logger.info("loaded TPP target parameters from %s (pretext %s, iteration %s)", p, meta.get("pretext"),
                meta.get("iteration"))
    return network


def refuse_in_bundles(peft_method: str, backbone_kind: str = "vit") -> None:
    """A ``ValueError`` naming the method, why a bundle cannot train it and the route that can (the method class's
    ``bundle_refusal``: FPT+, SH-PEFT), before any weights are read; it lists the methods the bundle's kind of
    backbone (``"vit"`` or ``"cnn"``) can train."""
    from tpp_monai.peft.registry import PEFT_METHODS

    cls = PEFT_METHODS.get(peft_method)
    if cls.bundle_refusal:
        ok = [n for n in PEFT_METHODS.names() if backbone_kind in PEFT_METHODS.get(n).applies_to
              and not PEFT_METHODS.get(n).bundle_refusal]
        raise ValueError(f"--peft_method {peft_method} is not supported in the bundles: {cls.bundle_refusal}. "
                         f"Bundles train: {', '.join(ok)}.")


def build_peft_backbone(
    backbone_ckpt: str | os.PathLike | None = "",
    size: str = "base",
    img_size: int = 224,
    in_chans: int = 3,
    peft_method: str = "adapter",
    peft_config: Mapping[str, Any] | None = None,
    tpp_ckpt: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    init_seed: int = 0,
    vit_overrides: Mapping[str, Any] | None = None,
    input_norm: Any = "auto",
    task: str = "cls",
    modality: str | None = None,
    channel_order: str = "auto",
) -> VisionTransformer:
    """:func:`build_backbone` + ``apply_peft`` (+ the TPP target parameters when ``tpp_ckpt`` is set; the bundles
    load them on the whole network instead, so the default ``None`` neither loads nor logs anything here)."""
    from tpp_monai.peft.api import apply_peft

    refuse_in_bundles(peft_method)
    backbone = build_backbone(backbone_ckpt, size=size, img_size=img_size, in_chans=in_chans,
                              allow_pickle=allow_pickle, init_seed=init_seed, vit_overrides=vit_overrides,
                              input_norm=input_norm, task=task, modality=modality, channel_order=channel_order)
    apply_peft(backbone, peft_method, dict(peft_config or {}))
    return load_target_params(backbone, tpp_ckpt)  # type: ignore[return-value]


def build_classifier(backbone: nn.Module, num_classes: int, pool: str = "mean", fc_norm: bool = True,
                     drop_path: float = 0.0, head: str = "linear_cls") -> nn.Module:
    """ViT (+ PEFT) + the registered head ``head`` (``tpp_monai.heads.HEADS``, default the linear head):
    ``forward(image) -> logits (B, num_classes)``; ``drop_path``: stochastic depth of the backbone's blocks while
    training (MedCoSS fine-tunes with 0.1)."""
    from tpp_monai.backbones.drop_path import set_drop_path
    from tpp_monai.networks import build_vit_classifier

    return build_vit_classifier(set_drop_path(backbone, drop_path), num_classes, pool=pool, fc_norm=fc_norm, head=head)


def build_segmenter(backbone: nn.Module, num_classes: int, feature_size: int = 16,
                    norm_name: str = "instance", drop_path: float = 0.0, head: str = "unetr2d") -> nn.Module:
    """ViT (+ PEFT) + the registered head ``head`` (``HEADS``, default the UNETR 2D decoder):
    ``forward(image) -> logits (B, num_classes, H, W)``; ``drop_path`` as in :func:`build_classifier`."""
    from tpp_monai.backbones.drop_path import set_drop_path
    from tpp_monai.heads.segmentation import build_vit_segmenter

    return build_vit_segmenter(set_drop_path(backbone, drop_path), num_classes, feature_size=feature_size,
                               norm_name=norm_name, head=head)


# ---------------------------------------------------------------------------------------------- 2D CNN encoders
CNN_BACKBONES = ("efficientnet_lite0",)


def build_cnn_backbone(
    backbone_ckpt: str | os.PathLike | None = "",
    backbone: str = "efficientnet_lite0",
    in_chans: int = 3,
    init_seed: int = 0,
    input_norm: Any = "auto",
    channel_order: str = "auto",
    padding: str = "same",
) -> nn.Module:
    """A 2D CNN encoder (``BACKBONES[backbone]``, EfficientNet-Lite0) with its real pre-trained weights from
    ``backbone_ckpt`` (read by :mod:`tpp_monai.backbones.efficientnet_weights`, which names every missing /
    unexpected / mis-shaped key), or a seeded random one with a loud warning (``""``: smoke tests only).

    ``input_norm`` / ``channel_order`` ``"auto"``: the pixel space the weights were trained in (the encoder's
    default, recorded with the format: ``efficientnet_lite``, RGB); a random encoder: ``"none"``, RGB.
    ``padding``: ``"same"`` (TensorFlow, as the weights were trained) or ``"symmetric"`` (timm's).
    """
    if backbone not in CNN_BACKBONES:
        raise ValueError(f"--cnn_backbone {backbone!r} is not a 2D CNN encoder the bundles build; choose one of "
                         f"{list(CNN_BACKBONES)}")
    factory = BACKBONES.get(backbone)
    if _is_empty(backbone_ckpt):
        warnings.warn(f"No --backbone_ckpt given: the {backbone} encoder is RANDOMLY INITIALISED (seed {init_seed}). "
                      "This is only useful for smoke tests; fetch the ImageNet weights (scripts/fetch_weights.py, "
                      ".tpp_cache/weights/) and pass --backbone_ckpt for real results.", stacklevel=2)
        model = _seeded(lambda: factory(in_channels=in_chans, padding=padding), init_seed)
        return model.set_input_norm("none" if _is_auto(input_norm) else input_norm,
                                    "rgb" if _is_auto(channel_order) else channel_order)
    p = Path(backbone_ckpt)  # type: ignore[arg-type]
    if not p.is_file():
        raise FileNotFoundError(f"--backbone_ckpt {p} does not exist; fetch the {backbone} ImageNet weights "
                                "(scripts/fetch_weights.py writes .tpp_cache/weights/...) or pass \"\" for a random "
                                "encoder (smoke tests only).")
    from tpp_monai.backbones.efficientnet_weights import load_efficientnet_lite0_weights

    model = factory(in_channels=in_chans, padding=padding)
    fmt = load_efficientnet_lite0_weights(model, p)["format"]  # strict: names every key that does not fit
    model.set_input_norm(fmt["input_norm"] if _is_auto(input_norm) else input_norm,
                         fmt["channel_order"] if _is_auto(channel_order) else channel_order)
    logger.info("backbone: %s from %s; input normalisation %s, channel order %s", backbone, p, model.input_norm,
                model.channel_order)
    return model


def build_peft_cnn_backbone(
    backbone_ckpt: str | os.PathLike | None = "",
    backbone: str = "efficientnet_lite0",
    in_chans: int = 3,
    peft_method: str = "conv_adapter",
    peft_config: Mapping[str, Any] | None = None,
    init_seed: int = 0,
    input_norm: Any = "auto",
    channel_order: str = "auto",
    padding: str = "same",
) -> nn.Module:
    """:func:`build_cnn_backbone` + ``apply_peft`` on the encoder only (the decoder / head is not a target: it
    trains in fine-tuning). A method that does not apply to CNNs (the ViT methods) is refused by name."""
    from tpp_monai.peft.api import apply_peft
    from tpp_monai.peft.registry import PEFT_METHODS, methods_for

    refuse_in_bundles(peft_method, "cnn")
    if "cnn" not in PEFT_METHODS.get(peft_method).applies_to:
        raise ValueError(f"--peft_method {peft_method} does not apply to a CNN encoder; the CNN methods are: "
                         f"{', '.join(methods_for('cnn'))}")
    model = build_cnn_backbone(backbone_ckpt, backbone=backbone, in_chans=in_chans, init_seed=init_seed,
                               input_norm=input_norm, channel_order=channel_order, padding=padding)
    apply_peft(model, peft_method, dict(peft_config or {}))
    return model


def build_cnn_classifier(backbone: nn.Module, num_classes: int, head: str = "linear_cls",
                         fc_norm: bool = False) -> nn.Module:
    """CNN encoder (+ PEFT) + global average pool + the registered head ``head`` (:class:`tpp_monai.networks.
    CNNClassifier`): ``forward(image) -> logits (B, num_classes)``."""
    from tpp_monai.networks import build_cnn_classifier as build

    return build(backbone, num_classes, head=head, fc_norm=fc_norm)


def build_cnn_segmenter(backbone: nn.Module, num_classes: int,
                        decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 32, 16)) -> nn.Module:
    """MONAI FlexibleUNet with the CNN encoder (+ PEFT) and FlexibleUNet's decoder (:class:`tpp_monai.networks.
    FlexUNetSegmenter`): ``forward(image) -> logits (B, num_classes, H, W)``."""
    from tpp_monai.backbones.efficientnet import FLEXUNET_NAME
    from tpp_monai.networks import build_flexunet_segmenter

    return build_flexunet_segmenter(backbone, num_classes, decoder_channels=tuple(decoder_channels),
                                    encoder_name=FLEXUNET_NAME)


def poly_lr(optimizer: torch.optim.Optimizer, num_iterations: int, epoch_length: int | None = None,
            power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """MedCoSS's fine-tuning schedule, stepped every iteration: ``lr * (1 - e / E) ** power`` with
    ``e = iteration // epoch_length`` (MedCoSS sets the lr once per epoch) and ``E`` epochs covering
    ``num_iterations``; ``epoch_length=None`` or 1 gives the smooth per-iteration poly decay.  No warm-up
    (MedCoSS's warm-up branch is for negative epochs and never runs)."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    step = max(1, int(epoch_length or 1))
    epochs = max(1, -(-int(num_iterations) // step))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: max(0.0, 1.0 - min(i // step, epochs) / epochs) ** power)


def trainable_report(network: nn.Module) -> dict[str, float]:
    """Trainable / total parameters (the paper's "Ratio", task head included)."""
    from tpp_monai.peft.api import count_parameters

    train, total = count_parameters(network)
    return {"trainable": train, "total": total, "ratio_percent": 100.0 * train / max(total, 1)}


def log_trainable(network: nn.Module) -> nn.Module:
    r = trainable_report(network)
    logger.info("trainable parameters: %d / %d (%.3f%%)", r["trainable"], r["total"], r["ratio_percent"])
    print(f"[tpp-monai] trainable parameters: {r['trainable']:,} / {r['total']:,} ({r['ratio_percent']:.3f}%)",
          flush=True)
    return network
