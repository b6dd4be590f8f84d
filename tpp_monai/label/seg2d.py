"""2D ViT + PEFT segmentation for annotation servers (MONAI Label): build, save, load, predict, TPP + PEFT train.

Nothing here imports ``monailabel``; the app in ``apps/tpp_label`` is a thin wrapper around it.

Model file (``model.pt``, written atomically, readable with ``weights_only=True``)::

    {"format": "tpp-label-seg2d", "version": 1,
     "config": Seg2DConfig.to_dict(),          # enough to rebuild the network
     "backbone_fingerprint": sha256,            # the frozen ViT the weights belong to
     "state_dict": {name: tensor},              # trainable tensors only: PEFT target params + decoder
     "meta": {"trained": bool, "version": int, "tpp_ckpt": ..., "num_labelled": ..., "dice": ...}}

Only the target parameters and the decoder are stored (the TPP idea: the backbone never changes);
the backbone is rebuilt from ``config.backbone_ckpt`` (or the seeded random ViT when it is empty)
and checked against the fingerprint, so a model file never silently loads onto another backbone.

Images: 2D PNG/JPG/TIF (grey or RGB) or a 2D NIfTI slice (trailing size-1 axes allowed); labels also NRRD.
They are scaled to [0, 1] (uint8 by /255, other types by min-max), repeated/reduced to
``in_chans`` channels and resized to ``img_size`` x ``img_size`` (the backbone maps [0, 1] into its
pre-training pixel space itself: ``Seg2DConfig.input_norm``, "auto" = the checkpoint's format decides,
MedCoSS none, MAE/DINO ImageNet mean/std, the same as in the bundles); predictions are resized back
to the input's size and written in the input's format and orientation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.safe_io import CheckpointMismatch, atomic_save, safe_load

logger = logging.getLogger("tpp_monai.label")

MODEL_FORMAT = "tpp-label-seg2d"
PNG_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_EXT = (".nii", ".nii.gz")


class ImageReadError(ValueError):
    """An image or label file could not be read as a 2D image (message names the file and why)."""


class ImageTooLarge(ImageReadError):
    """An image has more pixels than the caller allows (checked from the header, before decoding)."""


#: default pixel cap of the label server (``--conf max_image_pixels``): 8192 x 8192
MAX_IMAGE_PIXELS = 8192 * 8192


def _check_pixels(shape: Sequence[int], path, max_pixels: int | None) -> None:
    n = int(np.prod([int(s) for s in shape])) if len(shape) else 0
    if max_pixels is not None and n > max_pixels:
        raise ImageTooLarge(f"{Path(path).name}: {' x '.join(str(int(s)) for s in shape)} = {n} pixels is more than "
                            f"the limit of {max_pixels} pixels; send a smaller image")


@dataclass
class Seg2DConfig:
    """Everything needed to rebuild the segmentation network (stored inside the model file)."""

    labels: dict[str, int] = field(default_factory=lambda: {"soft_tissue": 1, "bone": 2})
    size: str = "tiny"
    img_size: int = 96
    in_chans: int = 3
    backbone_ckpt: str = ""
    allow_pickle: bool = False
    init_seed: int = 0
    peft_method: str = "adapter"
    peft_config: dict[str, Any] = field(default_factory=dict)
    feature_size: int = 16
    vit_overrides: dict[str, Any] = field(default_factory=dict)
    #: pixel space the backbone normalises its [0, 1] input into ("auto": from the checkpoint's format)
    input_norm: Any = "auto"
    #: image modality ("pathology": a MedCoSS backbone is fed BGR, as it was pre-trained); None: RGB
    modality: str | None = None

    @property
    def num_classes(self) -> int:
        return max([0, *self.labels.values()]) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Seg2DConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Seg2DConfig keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(d))


def parse_labels(spec: str | Sequence[str] | Mapping[str, int]) -> dict[str, int]:
    """``"soft_tissue,bone"`` / ``["a", "b"]`` -> {"soft_tissue": 1, "bone": 2}; ``'{"a": 1}'`` or a dict as is."""
    if isinstance(spec, Mapping):
        out = {str(k): int(v) for k, v in spec.items()}
    elif isinstance(spec, str) and spec.strip().startswith("{"):
        out = {str(k): int(v) for k, v in json.loads(spec).items()}
    else:
        names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
        out = {n: i + 1 for i, n in enumerate(names)}
    if not out or any(v < 1 for v in out.values()):
        raise ValueError(f"labels must name at least one foreground class with index >= 1 (0 is background); got {spec!r}")
    return out


# ------------------------------------------------------------------------------------------ network
def build_backbone(cfg: Seg2DConfig) -> nn.Module:
    from tpp_monai.bundle.networks import build_backbone as _bb

    return _bb(cfg.backbone_ckpt, size=cfg.size, img_size=cfg.img_size, in_chans=cfg.in_chans,
               allow_pickle=cfg.allow_pickle, init_seed=cfg.init_seed, vit_overrides=cfg.vit_overrides or None,
               input_norm=cfg.input_norm, task="seg", modality=cfg.modality)


def build_model(cfg: Seg2DConfig, tpp_ckpt: str | os.PathLike | None = None) -> nn.Module:
    """Backbone (+ PEFT method, + TPP target parameters if ``tpp_ckpt``) + UNETR 2D decoder."""
    from tpp_monai.bundle.networks import build_segmenter
    from tpp_monai.peft.api import apply_peft
    from tpp_monai.tpp import load_for_finetuning

    backbone = build_backbone(cfg)
    if tpp_ckpt:
        load_for_finetuning(backbone, cfg.peft_method, dict(cfg.peft_config), tpp_ckpt)
    else:
        apply_peft(backbone, cfg.peft_method, dict(cfg.peft_config))
    return build_segmenter(backbone, cfg.num_classes, feature_size=cfg.feature_size)


def _fingerprint(model: nn.Module) -> str:
    from tpp_monai.peft.api import backbone_fingerprint

    return backbone_fingerprint(model.backbone)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k in names or k.startswith("decoder.")}


def save_model(path: str | os.PathLike, model: nn.Module, cfg: Seg2DConfig, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the model file atomically (temporary file + rename): readers never see half a file."""
    obj = {
        "format": MODEL_FORMAT, "version": 1, "config": cfg.to_dict(),
        "backbone_fingerprint": _fingerprint(model), "state_dict": trainable_state_dict(model),
        "meta": {"saved_at": time.time(), **dict(meta or {})},
    }
    return atomic_save(obj, path)


def read_model_file(path: str | os.PathLike) -> dict:
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise CheckpointMismatch(f"{path} is not a tpp-monai label model (format '{MODEL_FORMAT}'); "
                                 "write one with tpp_monai.label.seg2d.save_model or the app's train task.")
    return obj


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               overrides: Mapping[str, Any] | None = None) -> tuple[nn.Module, Seg2DConfig, dict]:
    """Rebuild the network from the file's config, check the backbone fingerprint, load the weights.

    ``overrides``: config fields to replace (e.g. ``{"backbone_ckpt": "/new/place/of/vit.pth"}``).
    """
    obj = read_model_file(path)
    cfg = Seg2DConfig.from_dict({**obj["config"], **dict(overrides or {})})
    model = build_model(cfg)
    fp = _fingerprint(model)
    if fp != obj["backbone_fingerprint"]:
        raise CheckpointMismatch(f"{path} was trained on another backbone (fingerprint {obj['backbone_fingerprint'][:12]} "
                                 f"vs {fp[:12]} for backbone_ckpt={cfg.backbone_ckpt!r}); use the same backbone checkpoint.")
    _, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    expected = set(trainable_state_dict(model))
    lacking = sorted(expected - set(obj["state_dict"]))
    if unexpected or lacking:
        raise CheckpointMismatch(f"{path}: tensors do not fit the network (missing {lacking[:5]}, unexpected {list(unexpected)[:5]})")
    model.to(device).eval()
    return model, cfg, dict(obj.get("meta", {}))


def install_model_file(upload: str | os.PathLike, dest: str | os.PathLike, expect: Seg2DConfig,
                       device: str | torch.device = "cpu") -> dict:
    """Put an uploaded model file in place of ``dest`` only if it is one this server can serve; atomically.

    The upload must load weights-only (no pickled code), be a :data:`MODEL_FORMAT` file whose tensors fit
    its network and whose backbone fingerprint matches, and predict the server's classes at the server's
    input size (``expect``: labels, img_size, in_chans). Then it is copied next to ``dest`` and renamed
    over it: a reader (or a crash) never sees half a model, and a refused upload leaves ``dest`` untouched.
    Returns the file's ``meta``.
    """
    from tpp_monai.safe_io import atomic_write

    try:
        _, cfg, meta = load_model(upload, device=device)
    except CheckpointMismatch:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable / pickled / not a model: one clear refusal
        raise CheckpointMismatch(f"the uploaded file is not a usable tpp-monai label model ({type(e).__name__}: "
                                 f"{str(e)[:300]})") from e
    for field_name in ("labels", "img_size", "in_chans"):
        got, want = getattr(cfg, field_name), getattr(expect, field_name)
        if got != want:
            raise CheckpointMismatch(f"the uploaded model has {field_name}={got!r} but this server serves "
                                     f"{field_name}={want!r}; train it with the same --conf settings")

    def copy(f) -> None:
        with open(upload, "rb") as src:
            while chunk := src.read(1 << 20):
                f.write(chunk)

    atomic_write(dest, copy)
    return meta


# ----------------------------------------------------------------------------------------------- io
def _ext(path: str | os.PathLike) -> str:
    p = str(path).lower()
    return ".nii.gz" if p.endswith(".nii.gz") else os.path.splitext(p)[1]


def _squeeze_2d(arr: np.ndarray, path) -> np.ndarray:
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: a 2D slice is expected, got shape {arr.shape}")
    return arr


def read_image_2d(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, dict]:
    """(H, W) or (H, W, C) array in row/column order, plus what :func:`write_mask_2d` needs to write a match.

    ``max_pixels``: refuse (:class:`ImageTooLarge`) an image with more pixels, judged from the file's
    header before any pixel is decoded (a 160 KB PNG can hold 13000 x 13000 pixels, 5 GB decoded).

    NIfTI and NRRD store a slice as ``data[x, y(, 1)]`` (x along a row): they are transposed to
    ``(y, x)`` here, the order of PNG pixels and of ITK / 3D Slicer's view of a PNG, so images and
    labels in different formats (PNG image + NIfTI label saved by Slicer) line up.
    """
    arr, info = _read_2d(path, max_pixels)
    _check_finite(arr, path)
    return arr, info


def _check_finite(arr: np.ndarray, path) -> None:
    """NaN / Inf pixels have no intensity: min-max scaling would turn the whole image black (and train on it)."""
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ImageReadError(f"{Path(path).name}: {bad} of {np.size(arr)} pixels are NaN or Inf; fix or remove "
                                 "this image (replace the non-finite pixels, e.g. with numpy.nan_to_num) and send it again")


def _read_2d(path: str | os.PathLike, max_pixels: int | None) -> tuple[np.ndarray, dict]:
    ext = _ext(path)
    try:
        if ext in NIFTI_EXT:
            import nibabel as nib

            img = nib.load(str(path))
            _check_pixels(img.shape[:2], path, max_pixels)
            arr = _squeeze_2d(np.asarray(img.dataobj), path).T
            return arr, {"format": "nifti", "affine": np.asarray(img.affine)}
        if ext == ".nrrd":
            import nrrd

            _check_pixels(nrrd.read_header(str(path)).get("sizes", [])[:2], path, max_pixels)
            data, _ = nrrd.read(str(path))
            return _squeeze_2d(np.asarray(data), path).T, {"format": "nrrd"}
        from PIL import Image

        with Image.open(str(path)) as im:
            _check_pixels(im.size[::-1], path, max_pixels)
            im.load()
            if im.mode in ("P", "CMYK", "LA", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3):
            raise ImageReadError(f"{path}: a 2D image is expected, got shape {arr.shape}")
        return arr, {"format": "png"}
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file and the reason
        if type(e).__name__ == "DecompressionBombError":  # PIL's own cap (2 x Image.MAX_IMAGE_PIXELS)
            raise ImageTooLarge(f"{Path(path).name}: {e}") from e
        raise ImageReadError(f"cannot read {Path(path).name} as a 2D image ({type(e).__name__}: {e})") from e


def write_mask_2d(mask: np.ndarray, path: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write a (H, W) class-index mask in the input's format: NIfTI (x, y, 1) with the input's affine, else PNG."""
    path = Path(path)
    mask = np.asarray(mask).astype(np.uint8)
    if info.get("format") == "nifti":
        import nibabel as nib

        nib.save(nib.Nifti1Image(np.ascontiguousarray(mask.T[..., None]), info.get("affine", np.eye(4))), str(path))
    else:
        from PIL import Image

        Image.fromarray(mask).save(str(path))
    return path


def to_model_input(arr: np.ndarray, img_size: int, in_chans: int = 3) -> torch.Tensor:
    """(H, W[, C]) array -> (in_chans, img_size, img_size) float tensor in [0, 1]."""
    a = np.asarray(arr)
    x = torch.from_numpy(a.astype(np.float32))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if a.dtype == np.uint8:
        x = x / 255.0
    else:
        if not torch.isfinite(x).all():
            raise ImageReadError("the image has NaN or Inf pixels: it has no meaningful intensities to segment")
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if x.shape[0] != in_chans:
        x = x.mean(0, keepdim=True).repeat(in_chans, 1, 1)
    from tpp_monai.data.transforms import resize_image

    return resize_image(x, (img_size, img_size), "bilinear")  # anti-aliased, as the bundles' chains


def check_label_classes(arr: np.ndarray, num_classes: int, path: str | os.PathLike | None = None) -> None:
    """A label holds class indices 0..num_classes-1; anything else is refused, naming the file and the fix.

    A 0/255 mask (what many tools save for a binary mask) is the common case: it is refused rather than
    guessed at (255 could be a class of its own); the message says to save 0/1 (divide by 255).
    """
    a = np.asarray(arr)
    a = a[..., 0] if a.ndim == 3 else a
    if a.size == 0:
        return
    classes = np.unique(a)
    bad = [v for v in classes.tolist() if not float(v).is_integer() or not 0 <= v < num_classes]
    if bad:
        name = f"label {Path(path).name}" if path is not None else "label"
        hint = (" It looks like a 0/255 mask: save class indices instead (0 background, 1 foreground; "
                "divide the mask by 255)." if 255 in bad else "")
        raise ImageReadError(f"{name} has class value(s) {[int(v) if float(v).is_integer() else v for v in bad][:8]} "
                             f"but the model has {num_classes} classes (0..{num_classes - 1}, --conf labels).{hint}")


def to_model_label(arr: np.ndarray, img_size: int, num_classes: int) -> torch.Tensor:
    """(H, W) class-index mask -> (1, img_size, img_size) long tensor (nearest); values >= num_classes are an error."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[..., 0]
    if a.max(initial=0) >= num_classes:
        raise ValueError(f"label has class {int(a.max())} but the model has {num_classes} classes (0..{num_classes - 1})")
    y = torch.from_numpy(a.astype(np.int64))[None, None].float()
    return F.interpolate(y, size=(img_size, img_size), mode="nearest")[0].long()


@torch.no_grad()
def predict(model: nn.Module, arr: np.ndarray, cfg: Seg2DConfig, device: str | torch.device = "cpu") -> np.ndarray:
    """Class-index mask (H, W) uint8 at the input's size."""
    x = to_model_input(arr, cfg.img_size, cfg.in_chans)[None].to(device)
    logits = model(x)
    logits = F.interpolate(logits, size=tuple(np.asarray(arr).shape[:2]), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


# -------------------------------------------------------------------------------------------- train
def _dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean foreground Dice over classes present in target or prediction."""
    ds = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        s = p.sum() + t.sum()
        if s > 0:
            ds.append(float(2 * (p & t).sum()) / float(s))
    return float(np.mean(ds)) if ds else 1.0


def read_labelled_pairs(labelled: Sequence[tuple[str | os.PathLike, str | os.PathLike]]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read every (image, label) pair; a label whose size differs from its image is refused, never stretched."""
    pairs = []
    for img_path, lbl_path in labelled:
        img, lbl = read_image_2d(img_path)[0], read_image_2d(lbl_path)[0]
        if img.shape[:2] != lbl.shape[:2]:
            raise ValueError(f"label {lbl_path} is {lbl.shape[0]} x {lbl.shape[1]} pixels but its image {img_path} is "
                             f"{img.shape[0]} x {img.shape[1]}: save the label on the image it belongs to (same size)")
        pairs.append((img, lbl))
    return pairs


def check_train_args(*, tpp_epochs: int, ft_epochs: int, batch_size: int, ft_lr: float,
                     tpp_lr: float | None = None) -> None:
    """Refuse settings under which no model would train (``ft_epochs=-1`` published an untrained "trained" model)."""
    errors = []
    for name, v, lo in (("ft_epochs", ft_epochs, 1), ("tpp_epochs", tpp_epochs, 0), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            errors.append(f"{name} must be an integer >= {lo}, got {v!r}")
    for name, v in (("ft_lr", ft_lr), ("tpp_lr", tpp_lr)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            errors.append(f"{name} must be a finite number > 0, got {v!r}")
    if errors:
        raise ValueError("train_tpp_peft: " + "; ".join(errors))


def run_tpp_stage(cfg: Seg2DConfig, images: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                  pretext: str = "mae", pretext_config: Mapping[str, Any] | None = None, epochs: int = 1,
                  batch_size: int = 8, lr: float | None = None, device: str | torch.device = "cpu", seed: int = 0,
                  log: Callable[[str], None] | None = None, handlers: Sequence | None = None) -> str:
    """TPP: the frozen backbone's target parameters + the pretext head learn on every image (labelled or not).

    Returns the target-parameter checkpoint that :func:`build_model` hands over to fine-tuning.
    ``handlers``: objects with ``attach(engine)`` for the TPP engine (the label server's progress report).
    """
    from tpp_monai.tpp import tpp_pretrain

    log = log or logger.info
    t0 = time.time()
    pool = torch.stack([to_model_input(read_image_2d(p)[0], cfg.img_size, cfg.in_chans) for p in images])
    log(f"TPP: {pretext} on {len(pool)} images, {epochs} epoch(s), PEFT {cfg.peft_method}")
    ckpt = tpp_pretrain(
        build_backbone(cfg), cfg.peft_method, pretext, pool, peft_config=dict(cfg.peft_config),
        pretext_config=dict(pretext_config or {}), epochs=epochs, batch_size=min(batch_size, len(pool)),
        lr=lr, output_dir=Path(output_dir), seed=seed, device=torch.device(device), tensorboard=False,
        checkpoint_every_epochs=epochs, log_every=10**9, handlers=handlers,
    )
    log(f"TPP done in {time.time() - t0:.1f} s -> {Path(ckpt).name}")
    from tpp_monai.engines.tpp_report import REPORT_NAME, one_line, read_report

    log(one_line(read_report(Path(ckpt).parent / REPORT_NAME)))  # the learning report, in the train task's log
    return str(ckpt)


def check_trained(model: nn.Module, losses: Sequence[float], lr: float) -> None:
    """Refuse to publish a model whose fine-tuning produced no finite loss or non-finite weights."""
    bad = [n for n, v in trainable_state_dict(model).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not losses or not all(math.isfinite(v) for v in losses) or bad:
        raise FloatingPointError(
            f"fine-tuning did not produce a usable model (losses {list(losses)[-3:]}, non-finite tensors {bad[:3]}); "
            f"the previous model is kept. Check the images and labels, or lower lr (now {lr}).")


def check_labelled(labelled: Sequence[tuple[str | os.PathLike, str | os.PathLike]], num_classes: int) -> None:
    """Read every labelled pair once before training: a size mismatch or an unknown class stops the run at once."""
    for (_, lbl_path), (_, lbl) in zip(labelled, read_labelled_pairs(labelled)):
        check_label_classes(lbl, num_classes, lbl_path)


def train_tpp_peft(
    cfg: Seg2DConfig,
    images: Sequence[str | os.PathLike],
    labelled: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    output: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    pretext: str = "mae",
    pretext_config: Mapping[str, Any] | None = None,
    tpp_epochs: int = 1,
    ft_epochs: int = 1,
    batch_size: int = 8,
    tpp_lr: float | None = None,
    ft_lr: float = 1e-3,
    tpp: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    version: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """TPP (pretext on every image, labelled or not) then PEFT fine-tuning on the labelled pairs.

    Writes ``output`` atomically (infer tasks watching its mtime pick it up) and returns stats.
    ``tpp=False`` skips the TPP stage (PEFT from the method's own initialisation).
    """
    from monai.losses import DiceCELoss

    from tpp_monai.engines.optim import build_optimizer

    log = log or logger.info
    device = torch.device(device)
    check_train_args(tpp_epochs=tpp_epochs, ft_epochs=ft_epochs, batch_size=batch_size, ft_lr=ft_lr, tpp_lr=tpp_lr)
    if not labelled:
        raise ValueError("no labelled images in the datastore: save at least one label before training")
    pairs = read_labelled_pairs(labelled)  # before TPP: a mismatched pair stops the run at once
    t0 = time.time()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    # --- TPP stage: backbone frozen, target parameters + pretext head train on all images
    tpp_ckpt = None
    tpp_seconds = 0.0
    if tpp and tpp_epochs > 0:
        tpp_ckpt = run_tpp_stage(cfg, images, work_dir / "tpp", pretext=pretext, pretext_config=pretext_config,
                                 epochs=tpp_epochs, batch_size=batch_size, lr=tpp_lr, device=device, seed=seed, log=log)
        tpp_seconds = time.time() - t0

    # --- fine-tuning: same target parameters (loaded) + decoder on the labelled images
    torch.manual_seed(seed)
    model = build_model(cfg, tpp_ckpt=tpp_ckpt).to(device)
    xs = torch.stack([to_model_input(img, cfg.img_size, cfg.in_chans) for img, _ in pairs])
    ys = torch.stack([to_model_label(lbl, cfg.img_size, cfg.num_classes) for _, lbl in pairs])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = build_optimizer(model, lr=ft_lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for ep in range(ft_epochs):
        perm = torch.randperm(len(xs), generator=g)
        tot = 0.0
        for i in range(0, len(xs), batch_size):
            idx = perm[i:i + batch_size]
            x, y = xs[idx].to(device), ys[idx].to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss) * len(idx)
        losses.append(tot / len(xs))
        log(f"fine-tune epoch {ep + 1}/{ft_epochs}: loss {losses[-1]:.4f}")
    check_trained(model, losses, ft_lr)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xs[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(xs), batch_size)])
    dice = _dice(pred, ys[:, 0], cfg.num_classes)
    stats = {  # tpp_ckpt relative to work_dir: /info shows these stats to clients, server paths stay out
        "trained": True, "version": int(version if version is not None else time.time_ns()),
        "tpp": bool(tpp_ckpt), "tpp_ckpt": os.path.relpath(tpp_ckpt, work_dir) if tpp_ckpt else "",
        "pretext": pretext if tpp_ckpt else "",
        "tpp_epochs": tpp_epochs if tpp_ckpt else 0, "ft_epochs": ft_epochs, "num_images": len(images),
        "num_labelled": len(labelled), "final_loss": losses[-1] if losses else None, "train_dice": dice,
        "tpp_seconds": round(tpp_seconds, 2), "total_seconds": round(time.time() - t0, 2),
    }
    save_model(output, model, cfg, meta=stats)
    log(f"saved {Path(output).name}: {json.dumps(stats)}")
    return stats
