"""Read pre-trained ViT checkpoints (MedCoSS, timm-style MAE, DINO / Path_DINO, plain timm) into our ViT.

Every format is converted to the key names of :class:`~tpp_monai.backbones.vit.VisionTransformer`
(timm names), the architecture is inferred from the tensors (:class:`ViTConfig`), and the MAE
decoder, if the file has one, is returned separately in timm-MAE names so that the MAE pretext
task can inherit it (``MAEPretext.load_decoder_state``).

==========  ==============================================================================
format      recognised by
==========  ==============================================================================
medcoss     ``fused_encoder.layers.N.*`` / ``video_embed.*`` (MedCoSS ``Unified_Model``)
mae         timm ViT keys plus ``decoder_*`` keys (MAE pre-training file ``{'model': sd}``)
dino        timm ViT keys under ``teacher``/``student`` (``module.``/``backbone.`` prefixes)
            or with DINO projection-head keys ``head.mlp.*`` / ``head.last_layer.*``
timm        timm ViT keys alone (plain backbone state dicts, e.g. released DINO/Path_DINO)
==========  ==============================================================================

Keys the converter knows and drops on purpose (MedCoSS 1D/3D modality tables and heads, DINO
projection heads, classification heads of fine-tuned files) are listed in
``LoadedCheckpoint.ignored`` with the reason; anything else that does not fit our ViT is reported
by name in ``missing`` / ``unexpected`` / ``mismatched`` and, when loading into a model, is an
error unless ``allow_partial=True``.

What a format implies but its tensors cannot show (:data:`FORMAT_DEFAULTS`): the attention heads
of the MAE decoder (MedCoSS and the official MAE decoders have 16 heads at width 512; a width-derived
guess gives 8 and silently changes the reconstruction) and the pixel space the backbone was
pre-trained in (MedCoSS: [0, 1], no mean/std; MAE/DINO/timm: ImageNet mean/std). Files written by
tpp-monai (:func:`tpp_monai.bundle.save_mae_checkpoint`) record both (top-level ``decoder_heads`` /
``input_norm``), which then win over the format's defaults.

Reading is safe by default (``weights_only=True`` through :func:`tpp_monai.safe_io.safe_load`);
MedCoSS ``.pth`` files pickle an ``argparse.Namespace`` under ``'args'`` and need
``allow_pickle=True`` (only for files you trust).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tpp_monai.backbones.vit import ViTConfig, VisionTransformer

__all__ = [
    "CheckpointFormatError", "CheckpointLoadError", "LoadedCheckpoint", "FORMATS", "FORMAT_DEFAULTS", "FormatDefaults",
    "load_vit_checkpoint", "build_vit_from_checkpoint", "convert_state_dict", "detect_format",
]

FORMATS = ("auto", "medcoss", "mae", "dino", "timm")



@dataclass(frozen=True)
class FormatDefaults:
    """What a checkpoint format implies but its tensors cannot show."""

    decoder_heads: int | None  #: attention heads of the format's MAE decoder (None: the format has none)
    input_norm: str  #: pixel space of pre-training, a name of tpp_monai.data.normalization.INPUT_NORMS
    source: str  #: where the values come from
    #: the decoder's position table was trained with it (MedCoSS: an ordinary nn.Parameter; MAE: fixed sin-cos)
    decoder_pos_learnable: bool = False
    #: pixel space of the format's own *segmentation* fine-tuning (None: ``input_norm``)
    seg_input_norm: str | None = None
    #: channel order the backbone saw in pre-training, per modality where it is not RGB (others: "rgb")
    channel_orders: tuple[tuple[str, str], ...] = ()


#: Per format (METHOD.md, "Facts the TPP paper leaves to MedCoSS"); Path_DINO weights are plain timm/DINO
#: files that cannot be told apart from ImageNet DINO: pass ``input_norm="path_dino"`` for them.
FORMAT_DEFAULTS: dict[str, FormatDefaults] = {
    "medcoss": FormatDefaults(16, "none", "MedCoSS Unified_Model(decoder_num_heads=16); pre-training and downstream "
                                          "use ToTensor() images in [0, 1] without mean/std; decoder_pos_embed_2D "
                                          "is a trainable nn.Parameter; segmentation fine-tuning z-scores each "
                                          "image per channel (Downstream/Dim_2/{Glas,QaTa_CoV19}/DSDataset.py); "
                                          "pathology pre-training reads BGR (dataloader/TCGA_dataset.py: "
                                          "cv2.imread -> Image.fromarray -> ToTensor)",
                              decoder_pos_learnable=True, seg_input_norm="zscore",
                              channel_orders=(("pathology", "bgr"),)),
    "mae": FormatDefaults(16, "imagenet", "official MAE mae_vit_*_patch16_dec512d8b (decoder_num_heads=16); "
                                          "ImageNet mean/std"),
    "dino": FormatDefaults(None, "imagenet", "DINO: ImageNet mean/std (Path_DINO: input_norm='path_dino')"),
    "timm": FormatDefaults(None, "imagenet", "timm ViT: ImageNet mean/std (Path_DINO: input_norm='path_dino')"),
}
#: Top-level keys a tpp-monai checkpoint may carry to override :data:`FORMAT_DEFAULTS`.
RECORDED_KEYS = ("decoder_heads", "input_norm", "channel_order")

#: Spellings of the modalities whose channel order can differ (bundle ``modality`` values).
_MODALITY_ALIASES = {"pathology": "pathology", "histology": "pathology", "histopathology": "pathology",
                     "h&e": "pathology", "pathology (h&e)": "pathology"}


def normalize_modality(modality: str | None) -> str | None:
    """Lower-case name of a modality, with the pathology aliases folded ("H&E" -> "pathology")."""
    if modality is None:
        return None
    m = str(modality).strip().lower()
    return _MODALITY_ALIASES.get(m, m) or None

_DECODER_KEY = re.compile(r"^(decoder_|mask_token$)")
_BLOCK_IDX = re.compile(r"^blocks\.(\d+)\.")
_MEDCOSS_LAYER = re.compile(r"^fused_encoder\.layers\.(\d+)\.(.+)$")

#: MedCoSS per-layer names -> ours (inside ``blocks.N.``).
_MEDCOSS_BLOCK_MAP = {
    "self_attn.in_proj_weight": "attn.qkv.weight",
    "self_attn.in_proj_bias": "attn.qkv.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "linear1.weight": "mlp.fc1.weight",
    "linear1.bias": "mlp.fc1.bias",
    "linear2.weight": "mlp.fc2.weight",
    "linear2.bias": "mlp.fc2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "gamma_1": "ls1.gamma",
    "gamma_2": "ls2.gamma",
}
_MEDCOSS_EMBED_MAP = {
    "video_embed.embeddings.weight": "patch_embed.proj.weight",
    "video_embed.embeddings.bias": "patch_embed.proj.bias",
    "video_embed.embeddings_norm.weight": "embed_norm.weight",
    "video_embed.embeddings_norm.bias": "embed_norm.bias",
    "cls_token": "cls_token",
}
_MEDCOSS_SPATIAL = "video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight"
_MEDCOSS_TEMPORAL = "video_embed.embeddings_st_pos_2D.temporal_pos_embed.weight"
#: prefix -> why it is dropped (MedCoSS is a 1D/2D/3D multi-modal model; we read the 2D path).
_MEDCOSS_IGNORED = {
    "video_embed.embeddings_3D.": "MedCoSS 3D patch embedding (3D modality)",
    "video_embed.embeddings_st_pos_3D.": "MedCoSS 3D position tables (3D modality)",
    "video_embed.embeddings_pos.": "MedCoSS unused 1D position table of the video embedding",
    "video_embed.embeddings_type.": "MedCoSS unused token-type table of the video embedding",
    "token_embed.": "MedCoSS text embedding (1D modality)",
    "mlm_head.": "MedCoSS masked-language-model head (1D modality)",
    "decoder_pos_embed_1D.": "MedCoSS text decoder position table (1D modality)",
    "decoder_pos_embed_3D": "MedCoSS 3D decoder position table (3D modality)",
    "decoder_pred_3D.": "MedCoSS 3D decoder prediction (3D modality)",
    "fc_norm.": "classification head of a fine-tuned file (task head, not backbone)",
    "head.": "classification head of a fine-tuned file (task head, not backbone)",
}
_MEDCOSS_DECODER_RENAME = {"decoder_pos_embed_2D": "decoder_pos_embed", "decoder_pred_2D.": "decoder_pred."}

_TIMM_IGNORED = {
    "head.mlp.": "DINO projection head (pretext head, not backbone)",
    "head.last_layer.": "DINO projection head (pretext head, not backbone)",
    "head.": "classification head (task head, not backbone)",
    "fc_norm.": "classification head norm of a fine-tuned file (task head, not backbone)",
    "head_drop.": "classification head (task head, not backbone)",
}

_CONTAINER_KEYS = ("model", "state_dict", "teacher", "student", "model_ema", "module", "network_weights")


class CheckpointFormatError(ValueError):
    """The file cannot be read as a ViT checkpoint of a known format."""


class CheckpointLoadError(ValueError):
    """Loading into a model found missing / unexpected / wrong-shaped keys (named in the message)."""


@dataclass
class LoadedCheckpoint:
    """A ViT checkpoint converted to our key names.

    ``backbone_state``: encoder tensors in our (timm) names. ``decoder_state``: MAE decoder tensors
    in timm-MAE names (empty if none). ``config``: the architecture inferred from the tensors.
    ``missing``/``unexpected``/``mismatched`` compare ``backbone_state`` with the model (the given one,
    or one built from ``config``); ``mismatched`` entries read ``"name: checkpoint (..) vs model (..)"``.
    ``ignored``: ``"name (reason)"`` for keys dropped by design. ``source``/``sha256``: provenance of the
    file (None for an in-memory state dict). ``meta``: epoch / args / container key when present.
    ``decoder_heads``: heads of the MAE decoder (recorded in the file, else the format's default; None if
    unknown). ``input_norm``: pixel space the backbone expects (recorded, else the format's default).
    ``decoder_pos_learnable``: the decoder's position table was trained in pre-training (MedCoSS).
    ``seg_input_norm``: the pixel space of the format's segmentation fine-tuning (MedCoSS: per-image
    z-score; recorded ``input_norm`` wins). ``channel_orders``: modality -> "bgr" where pre-training read
    BGR (MedCoSS pathology; a recorded ``channel_order`` applies to every modality); see :meth:`channel_order`.
    """

    format: str
    backbone_state: dict[str, torch.Tensor]
    decoder_state: dict[str, torch.Tensor]
    config: ViTConfig
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source: str | None = None
    sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    decoder_heads: int | None = None
    input_norm: Any = "imagenet"
    decoder_pos_learnable: bool = False
    seg_input_norm: Any = None
    channel_orders: dict[str, str] = field(default_factory=dict)
    recorded_channel_order: str | None = None

    def pixel_space(self, task: str = "cls", modality: str | None = None) -> tuple[Any, str]:
        """``(input_norm, channel_order)`` the backbone should see for a task ("cls"/"seg") and modality."""
        norm = self.seg_input_norm if task == "seg" and self.seg_input_norm is not None else self.input_norm
        order = self.recorded_channel_order or self.channel_orders.get(normalize_modality(modality) or "", "rgb")
        return norm, order

    @property
    def ok(self) -> bool:
        """True when the backbone state fits the model exactly."""
        return not (self.missing or self.unexpected or self.mismatched)

    def provenance(self) -> dict[str, Any]:
        """What to record next to results: file, hash, format, inferred architecture, epoch."""
        return {
            "source": self.source, "sha256": self.sha256, "format": self.format,
            "config": self.config.to_dict(), "epoch": self.meta.get("epoch"),
            "decoder_heads": self.decoder_heads, "input_norm": self.input_norm,
            "seg_input_norm": self.seg_input_norm, "channel_orders": dict(self.channel_orders),
        }

    def summary(self) -> str:
        parts = [f"{self.format} checkpoint {self.source or '<state dict>'}"]
        for name in ("missing", "unexpected", "mismatched"):
            vals = getattr(self, name)
            if vals:
                parts.append(f"{name} keys ({len(vals)}): {', '.join(vals)}")
        if self.ignored:
            parts.append(f"ignored by design: {len(self.ignored)} keys")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------- reading
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_FILE_CACHE: dict[tuple, tuple[Any, str]] = {}


def read_checkpoint_file(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[Any, str]:
    """A checkpoint file's content and SHA-256, read and hashed once per process: a run builds the backbone and
    then the MAE decoder from the same file. Keyed by the resolved path, inode, modification/change times, size and
    ``allow_pickle`` (a changed or replaced file is read again; a weights-only read never serves a pickle
    request's content or the reverse). Only the latest file is kept (one ViT-B checkpoint, ~344 MB); callers
    copy the tensors they load and must not modify what this returns. :func:`clear_checkpoint_cache` drops it."""
    p = Path(path)
    try:
        st = p.resolve().stat()
    except OSError:
        return _read_file(p, allow_pickle), ""  # raises naming the file
    key = (str(p.resolve()), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, bool(allow_pickle))
    hit = _FILE_CACHE.get(key)
    if hit is None:
        hit = (_read_file(p, allow_pickle), _sha256(p))
        _FILE_CACHE.clear()
        _FILE_CACHE[key] = hit
    return hit


def clear_checkpoint_cache() -> None:
    """Forget the file :func:`read_checkpoint_file` keeps (frees its memory)."""
    _FILE_CACHE.clear()


def _read_file(path: Path, allow_pickle: bool) -> Any:
    from tpp_monai.safe_io import safe_load

    if not path.exists():
        raise FileNotFoundError(f"ViT checkpoint not found: {path}. Check the path (or the bundle override).")
    if not path.is_file():
        raise FileNotFoundError(f"ViT checkpoint {path} is not a file.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors ships with the venv
            raise CheckpointFormatError(f"{path}: reading .safetensors needs the 'safetensors' package") from e
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise CheckpointFormatError(
                f"Could not read safetensors checkpoint {path} (corrupt or truncated?): {e}"
            ) from e
    try:
        return safe_load(path, allow_pickle=allow_pickle)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safe_load's message already says what the file is and the fix
        raise CheckpointFormatError(str(e)) from e


def _is_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the tensor dict inside a training checkpoint; return it and metadata (container, epoch, args)."""
    meta: dict[str, Any] = {}
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{where}: expected a dict of tensors or a training checkpoint dict; "
                                    f"got {type(obj).__name__}")
    if "epoch" in obj and isinstance(obj["epoch"], (int, float)):
        meta["epoch"] = int(obj["epoch"])
    if "args" in obj and obj["args"] is not None:
        args = obj["args"]
        meta["args"] = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                        for k, v in (vars(args) if hasattr(args, "__dict__") else dict(args)).items()}
    recorded = {k: obj[k] for k in RECORDED_KEYS if obj.get(k) is not None}
    if recorded:
        meta["recorded"] = recorded
    if _is_state(obj):
        return dict(obj), meta
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            meta["container"] = key
            return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}, meta
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        return tensors, meta
    raise CheckpointFormatError(
        f"{where}: no tensors found; top-level keys are {sorted(map(str, obj))[:12]} "
        f"(expected a state dict or one under {', '.join(_CONTAINER_KEYS)})."
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove DDP ``module.`` and DINO ``backbone.`` prefixes (also ``encoder.``, when every key has it)."""
    stripped: list[str] = []
    for prefix in ("module.", "_orig_mod.", "backbone.", "encoder."):
        keys = list(state)
        if not keys:
            break
        if all(k.startswith(prefix) for k in keys):
            state = {k[len(prefix):]: v for k, v in state.items()}
            stripped.append(prefix)
        elif prefix == "backbone." and any(k.startswith(prefix) for k in keys):
            # DINO: backbone.* + head.* -> keep the backbone names, head.* stays (ignored later)
            state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
            stripped.append(prefix)
    return state, stripped


def detect_format(state: Mapping[str, torch.Tensor], container: str | None = None) -> str:
    """Name the layout of a (prefix-stripped) state dict: medcoss, mae, dino or timm."""
    keys = list(state)
    if any(_MEDCOSS_LAYER.match(k) for k in keys) or any(k.startswith("video_embed.") for k in keys):
        return "medcoss"
    if "patch_embed.proj.weight" in state or any(_BLOCK_IDX.match(k) for k in keys):
        if any(k.startswith(("decoder_blocks.", "decoder_embed.")) for k in keys):
            return "mae"
        if container in ("teacher", "student") or any(k.startswith(("head.mlp.", "head.last_layer.")) for k in keys):
            return "dino"
        return "timm"
    raise CheckpointFormatError(
        "Unknown ViT checkpoint layout: no MedCoSS keys (fused_encoder.layers.N.*, video_embed.*) and no timm ViT "
        f"keys (patch_embed.proj.weight, blocks.N.*). First keys: {keys[:8]}"
    )


# -------------------------------------------------------------------------------------- conversion
def _split_ignored(key: str, table: Mapping[str, str]) -> str | None:
    for prefix, why in table.items():
        if key == prefix.rstrip(".") or key.startswith(prefix):
            return why
    return None


def _convert_medcoss(state: Mapping[str, torch.Tensor]):
    backbone: dict[str, torch.Tensor] = {}
    decoder: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for k, v in state.items():
        if k in _MEDCOSS_EMBED_MAP:
            backbone[_MEDCOSS_EMBED_MAP[k]] = v
        elif k in (_MEDCOSS_SPATIAL, _MEDCOSS_TEMPORAL):
            continue  # folded below
        elif (m := _MEDCOSS_LAYER.match(k)) is not None:
            i, rest = m.groups()
            if rest in _MEDCOSS_BLOCK_MAP:
                backbone[f"blocks.{i}.{_MEDCOSS_BLOCK_MAP[rest]}"] = v
            else:
                unknown.append(k)
        elif (why := _split_ignored(k, _MEDCOSS_IGNORED)) is not None:
            ignored.append(f"{k} ({why})")
        elif _DECODER_KEY.match(k):
            new = k
            for old, rep in _MEDCOSS_DECODER_RENAME.items():
                if k == old or k.startswith(old):
                    new = rep + k[len(old):]
                    break
            decoder[new] = v
        else:
            unknown.append(k)
    if _MEDCOSS_SPATIAL in state:
        spatial = state[_MEDCOSS_SPATIAL]
        table = spatial.clone()
        if _MEDCOSS_TEMPORAL in state:
            # eval-mode MedCoSS adds temporal row 0 to every 2D patch position; fold it in.
            table = table + state[_MEDCOSS_TEMPORAL][0].to(table.dtype)
            rows = state[_MEDCOSS_TEMPORAL].shape[0]
            if rows > 1:
                ignored.append(f"{_MEDCOSS_TEMPORAL}[1:{rows}] (training-time random temporal rows; "
                               "row 0 is folded into pos_embed)")
        backbone["pos_embed"] = table.unsqueeze(0)
    return backbone, decoder, ignored, unknown


def _convert_timm(state: Mapping[str, torch.Tensor]):
    backbone: dict[str, torch.Tensor] = {}
    decoder: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in state.items():
        if _DECODER_KEY.match(k):
            decoder[k] = v
        elif (why := _split_ignored(k, _TIMM_IGNORED)) is not None:
            ignored.append(f"{k} ({why})")
        else:
            backbone[k] = v
    return backbone, decoder, ignored, []


def convert_state_dict(state: Mapping[str, torch.Tensor], fmt: str):
    """(backbone_state, decoder_state, ignored, unknown) of a prefix-stripped state dict in format ``fmt``."""
    if fmt == "medcoss":
        return _convert_medcoss(state)
    if fmt in ("mae", "dino", "timm"):
        return _convert_timm(state)
    raise CheckpointFormatError(f"Unknown checkpoint format '{fmt}'; use one of {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------- config inference
def _infer_config(state: Mapping[str, torch.Tensor], fmt: str, num_heads: int | None,
                  overrides: Mapping[str, Any]) -> ViTConfig:
    try:
        w = state["patch_embed.proj.weight"]
    except KeyError as e:
        raise CheckpointFormatError(
            f"Cannot infer the ViT architecture: no patch embedding ('patch_embed.proj.weight' after conversion) "
            f"among {sorted(state)[:8]}..."
        ) from e
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointFormatError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; expected a square 2D "
                                    "convolution (D, C, p, p)")
    d, in_chans, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    idx = {int(m.group(1)) for k in state if (m := _BLOCK_IDX.match(k))}
    depth = max(idx) + 1 if idx else 0
    if num_heads is None:
        if d % 64:
            raise CheckpointFormatError(
                f"Cannot infer num_heads for width {d} (not a multiple of 64, the usual head size); pass num_heads=")
        num_heads = d // 64
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / d if fc1 is not None else 4.0
    qkv_bias = "blocks.0.attn.qkv.bias" in state if depth else True
    layer_scale = 1.0 if "blocks.0.ls1.gamma" in state else None
    common: dict[str, Any] = dict(
        patch_size=p, in_chans=in_chans, embed_dim=d, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias, layer_scale_init=layer_scale,
    )
    pos = state.get("pos_embed")
    if fmt == "medcoss":
        rows = int(pos.shape[1]) if pos is not None else 1024
        side = math.isqrt(rows)
        cfg = ViTConfig.medcoss(**common, pos_table_rows=rows, img_size=side * p,
                                embed_norm="embed_norm.weight" in state, final_norm="norm.weight" in state)
    else:
        cls_pos, img = True, 224
        if pos is not None:
            rows = int(pos.shape[1])
            if math.isqrt(rows - 1) ** 2 == rows - 1:
                cls_pos, img = True, math.isqrt(rows - 1) * p
            elif math.isqrt(rows) ** 2 == rows:
                cls_pos, img = False, math.isqrt(rows) * p
            else:
                raise CheckpointFormatError(
                    f"pos_embed has {rows} rows: neither a square grid nor a square grid plus a class token "
                    "(extra prefix tokens such as registers are not supported)")
        cfg = ViTConfig(**common, img_size=img, norm_eps=1e-6, pos_embed_mode="interpolate", cls_pos=cls_pos,
                        embed_norm="embed_norm.weight" in state, final_norm="norm.weight" in state)
    return replace(cfg, **dict(overrides)) if overrides else cfg


# ------------------------------------------------------------------------------------ comparison
def _is_peft_key(name: str) -> bool:
    return any(part.startswith("peft_") for part in name.split("."))


def _compare(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]):
    expected = {k: v for k, v in model_state.items() if not _is_peft_key(k)}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    return missing, unexpected, mismatched


# ---------------------------------------------------------------------------------------- public
def load_vit_checkpoint(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    model: nn.Module | None = None,
    format: str = "auto",  # noqa: A002 - the documented argument name
    allow_partial: bool = False,
    allow_pickle: bool = False,
    num_heads: int | None = None,
    **config_overrides: Any,
) -> LoadedCheckpoint:
    """Read a MedCoSS / MAE / DINO / timm ViT checkpoint, convert it to our names, optionally load it.

    Args:
        path_or_state: a file (``.pth``/``.pt``/``.bin``/``.safetensors``) or an in-memory checkpoint
            (state dict or training dict).
        model: a :class:`VisionTransformer` (PEFT-injected or not) to load the backbone tensors into.
            PEFT-inserted tensors (``peft_*``) are not expected in the checkpoint.
        format: ``"auto"`` or one of ``medcoss``, ``mae``, ``dino``, ``timm``.
        allow_partial: load what fits and report the rest instead of raising
            :class:`CheckpointLoadError` for missing / unexpected / wrong-shaped keys.
        allow_pickle: allow legacy pickled files (MedCoSS .pth with an argparse Namespace); trusted files only.
        num_heads: attention heads (not recoverable from the tensors); default ``embed_dim // 64``.
        config_overrides: ``ViTConfig`` fields to override in the inferred config (e.g. ``img_size``).

    Returns:
        :class:`LoadedCheckpoint`; with ``model`` the comparison is against that model, otherwise
        against a ViT built from the inferred config.
    """
    if format not in FORMATS:
        raise CheckpointFormatError(f"Unknown checkpoint format '{format}'; use one of {', '.join(FORMATS)}")
    source = sha = None
    if isinstance(path_or_state, (str, os.PathLike)):
        p = Path(path_or_state)
        obj, sha = read_checkpoint_file(p, allow_pickle)
        source = str(p)
        where = str(p)
    else:
        obj, where = path_or_state, "<in-memory checkpoint>"
    raw, meta = _unwrap(obj, where)
    from tpp_monai.safe_io import warn_if_non_finite

    warn_if_non_finite(raw, where, "ViT checkpoint")  # a diverged run's weights: say so before training on NaN
    state, stripped = _strip_prefixes(raw)
    if stripped:
        meta["stripped_prefixes"] = stripped
    detected = detect_format(state, meta.get("container"))
    fmt = detected if format == "auto" else format
    if format != "auto" and (detected == "medcoss") != (format == "medcoss"):
        raise CheckpointFormatError(f"{where}: format='{format}' requested but the keys look like '{detected}'")
    backbone, decoder, ignored, unknown = convert_state_dict(state, fmt)
    try:
        cfg = _infer_config(backbone, fmt, num_heads, config_overrides)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{where}: {e}") from e
    for k in unknown:  # unrecognised source keys travel as unexpected names in the backbone state
        backbone[k] = state[k]

    defaults, recorded = FORMAT_DEFAULTS[fmt], meta.get("recorded", {})
    implied = dict(decoder_heads=int(recorded.get("decoder_heads", defaults.decoder_heads or 0)) or None,
                   input_norm=recorded.get("input_norm", defaults.input_norm),
                   decoder_pos_learnable=defaults.decoder_pos_learnable,
                   # a recorded pixel space is the one the file's backbone was trained in: it wins for every task
                   seg_input_norm=None if "input_norm" in recorded else defaults.seg_input_norm,
                   channel_orders=dict(defaults.channel_orders), recorded_channel_order=recorded.get("channel_order"))
    if not decoder:
        implied["decoder_heads"] = None
    if model is not None:
        return _load_converted(
            LoadedCheckpoint(format=fmt, backbone_state=backbone, decoder_state=decoder, config=cfg,
                             ignored=sorted(ignored), source=source, sha256=sha, meta=meta, **implied),
            model, allow_partial,
        )
    with torch.device("meta"):
        missing, unexpected, mismatched = _compare(backbone, VisionTransformer(cfg).state_dict())
    return LoadedCheckpoint(
        format=fmt, backbone_state=backbone, decoder_state=decoder, config=cfg, missing=missing,
        unexpected=unexpected, mismatched=mismatched, ignored=sorted(ignored), source=source, sha256=sha, meta=meta,
        **implied,
    )


def _cfg_brief(cfg: ViTConfig) -> str:
    return (f"embed_dim={cfg.embed_dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, patch={cfg.patch_size}, "
            f"pos_embed_mode={cfg.pos_embed_mode}, layer_scale={cfg.layer_scale_init is not None}, "
            f"final_norm={cfg.final_norm}")


def build_vit_from_checkpoint(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    format: str = "auto",  # noqa: A002
    allow_partial: bool = False,
    allow_pickle: bool = False,
    num_heads: int | None = None,
    **config_overrides: Any,
) -> tuple[VisionTransformer, LoadedCheckpoint]:
    """Build a :class:`VisionTransformer` with the architecture inferred from the checkpoint and load it.

    Returns ``(model, loaded)``; ``loaded.decoder_state`` holds the MAE decoder (if any) for
    ``MAEPretext(..., decoder_mode="inherit_*")``.
    """
    probe = load_vit_checkpoint(path_or_state, None, format=format, allow_partial=True,
                                allow_pickle=allow_pickle, num_heads=num_heads, **config_overrides)
    model = VisionTransformer(probe.config)
    return model, _load_converted(probe, model, allow_partial)


def _load_converted(probe: LoadedCheckpoint, model: nn.Module, allow_partial: bool) -> LoadedCheckpoint:
    """Load an already converted checkpoint into ``model`` (no second file read)."""
    model_state = model.state_dict()
    missing, unexpected, mismatched = _compare(probe.backbone_state, model_state)
    loaded = replace(probe, missing=missing, unexpected=unexpected, mismatched=mismatched)
    if not loaded.ok and not allow_partial:
        raise CheckpointLoadError(
            f"{probe.source or '<in-memory checkpoint>'} ({probe.format}) does not fit the model: "
            f"{loaded.summary()}. Fix the model config (inferred from the checkpoint: {_cfg_brief(probe.config)}) "
            "or pass allow_partial=True to load only the matching tensors."
        )
    bad = {m.split(":", 1)[0] for m in mismatched}
    model.load_state_dict({k: v for k, v in probe.backbone_state.items() if k in model_state and k not in bad},
                          strict=False)
    return loaded
