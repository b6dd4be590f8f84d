"""MAE pretext task for the TPP stage: mask patches, encode the visible ones with the frozen backbone
(+ target parameters), reconstruct the masked ones with an MAE decoder.

The decoder uses timm-MAE tensor names (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``) so a pre-trained MAE decoder state
(``tpp_monai.backbones.weights``) loads without renaming. Decoder modes:

- ``"new"``: a fresh light decoder, trained;
- ``"inherit_frozen"``: the given pre-trained decoder, frozen (paper default for classification);
- ``"inherit_trainable"``: the given pre-trained decoder, trained (paper default for segmentation).

Loss: MSE between predicted and per-patch normalised target pixels, over masked patches only. The
target is the image in the backbone's own pixel space (``backbone.normalize_input``: [0, 1] for
MedCoSS, ImageNet-normalised for MAE), normalised per patch with the unbiased variance
(``Tensor.var``'s default, as in MAE's and MedCoSS's ``forward_loss``).

Decoder heads cannot be read off the tensors. An inherited decoder given as a
:class:`~tpp_monai.backbones.weights.LoadedCheckpoint` runs with the heads recorded for its
format (MedCoSS / official MAE: 16); given as a plain tensor dict it needs ``decoder_heads``
(else the MAE convention, 16, is assumed with a warning).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.backbones.vit import Block, ViTConfig
from tpp_monai.engines.distributed import rank_rows
from tpp_monai.pretext.base import PretextTask
from tpp_monai.pretext.registry import PRETEXT_TASKS

DECODER_MODES = ("new", "inherit_frozen", "inherit_trainable")
#: Heads of the MedCoSS and official MAE decoders (width 512); assumed for an inherited decoder of unknown format.
MAE_DECODER_HEADS = 16
_DECODER_KEY = re.compile(r"^(decoder_|mask_token$)")


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None,
    generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise.

    Returns ``ids_keep`` (B, n_keep) sorted visible patch indices in the shuffled order,
    ``mask`` (B, L) with 1 for masked and 0 for visible patches, and ``ids_restore`` (B, L) that
    puts the ``[visible, masked]`` sequence back into patch order. ``n_keep = round((1 - r) L)``,
    at least 1. ``noise`` (B, L): the uniform draw to sort, when the caller draws it (DDP: one draw for
    the global batch, see :func:`tpp_monai.engines.distributed.rank_rows`).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")
    n_keep = max(1, int(round((1.0 - mask_ratio) * num_patches)))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    elif tuple(noise.shape) != (batch, num_patches):
        raise ValueError(f"noise must have shape {(batch, num_patches)}; got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major grid order, pixels (p, p, C) per patch (timm MAE)."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    p = patch_size
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sine-cosine position table (1, [1 +] h*w, dim); the class-token row is zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4; got {dim}")
    h, w = grid
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    table = torch.cat([one(gy), one(gx)], dim=1)  # first half encodes rows, second half columns
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def _resize_patch_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, n, D) square patch table -> (1, h*w, D) for another grid (bicubic)."""
    n = table.shape[1]
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"decoder_pos_embed has {n} patch rows, not a square grid; cannot resize to {grid}")
    if (side, side) == tuple(grid):
        return table
    t = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=tuple(grid), mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


class MAEDecoder(nn.Module):
    """MAE decoder with timm key names (``decoder_*`` and ``mask_token`` at this module's top level)."""

    def __init__(
        self, embed_dim: int, patch_size: int, in_chans: int, grid: tuple[int, int], decoder_dim: int = 512,
        decoder_depth: int = 8, decoder_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
        learnable_pos: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size, self.in_chans, self.grid = patch_size, in_chans, tuple(grid)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_dim, self.grid, cls_token=True), requires_grad=learnable_pos
        )
        cfg = ViTConfig(embed_dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
                        mlp_ratio=mlp_ratio, qkv_bias=True, norm_eps=norm_eps)
        self.decoder_blocks = nn.ModuleList([Block(cfg) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self.learnable_pos = learnable_pos
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def pos_table(self, grid: tuple[int, int]) -> torch.Tensor:
        cls, patches = self.decoder_pos_embed[:, :1], self.decoder_pos_embed[:, 1:]
        return torch.cat([cls, _resize_patch_table(patches, grid)], dim=1)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``latent`` (B, 1 + n_keep, D) encoder tokens [cls, visible] -> (B, L, p*p*C) predictions."""
        x = self.decoder_embed(latent)
        b, n_vis = x.shape[0], x.shape[1] - 1
        L = ids_restore.shape[1]
        masks = self.mask_token.expand(b, L - n_vis, -1)
        x_ = torch.cat([x[:, 1:], masks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_table(grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def _read_decoder_state(state: Any) -> dict[str, torch.Tensor]:
    if hasattr(state, "decoder_state") and hasattr(state, "format"):  # a LoadedCheckpoint
        state = state.decoder_state
    if isinstance(state, (str, os.PathLike)):
        from tpp_monai.safe_io import safe_load

        state = safe_load(state)
        for key in ("decoder", "state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise TypeError(f"decoder_state must be a mapping of tensors or a path; got {type(state).__name__}")
    out = {k: v for k, v in state.items() if _DECODER_KEY.match(k)}
    if not out:
        raise ValueError(
            "decoder_state holds no MAE decoder tensors (expected timm-MAE names decoder_embed.*, mask_token, "
            f"decoder_pos_embed, decoder_blocks.N.*, decoder_norm.*, decoder_pred.*); got e.g. {list(state)[:5]}"
        )
    return out


def _decoder_dims(state: Mapping[str, torch.Tensor]) -> tuple[int, int, float]:
    """(width, depth, mlp_ratio) of a timm-MAE decoder state."""
    try:
        width = state["decoder_embed.weight"].shape[0]
    except KeyError as e:
        raise ValueError("decoder_state has no 'decoder_embed.weight'; cannot infer the decoder width") from e
    idx = {int(m.group(1)) for k in state if (m := re.match(r"decoder_blocks\.(\d+)\.", k))}
    depth = max(idx) + 1 if idx else 0
    ratio = state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
    return width, depth, ratio


@PRETEXT_TASKS.register("mae")
class MAEPretext(PretextTask):
    """MAE reconstruction on the backbone with target parameters.

    Args:
        backbone: a ``VisionTransformer`` with a PEFT method already applied (``apply_peft``).
        mask_ratio: fraction of masked patches (0.75).
        decoder_mode: ``"new"``, ``"inherit_frozen"`` or ``"inherit_trainable"``.
        decoder_state: the pre-trained decoder: a
            :class:`~tpp_monai.backbones.weights.LoadedCheckpoint` (its format gives the heads), a
            dict of tensors with timm-MAE names, or a file path; required by the ``inherit_*`` modes;
            its width/depth are read from the tensors.
        decoder_dim, decoder_depth: decoder size for ``"new"``.
        decoder_heads: attention heads; default: ``decoder_dim // 64`` for ``"new"``, the checkpoint's
            recorded/format heads when inheriting (MedCoSS, MAE: 16). Give it to override.
        norm_pix_loss: normalise target pixels per patch (mean 0, variance 1).
        learnable_pos: train ``decoder_pos_embed`` (when the decoder trains). None: as in pre-training for an
            inherited decoder of known format (MedCoSS: trainable, its table is an ordinary parameter), else
            fixed sin-cos as in MAE.
        img_size: image side the decoder table is built for (default: the backbone's ``img_size``).
    """

    name = "mae"
    #: MAE's recipe (METHOD.md section 1): AdamW lr 1.5e-3, weight decay 0.015, betas (0.9, 0.95), 40 warm-up epochs.
    defaults = {"lr": 1.5e-3, "weight_decay": 1.5e-2, "weight_decay_end": None, "warmup_epochs": 40,
                "betas": (0.9, 0.95), "min_lr": 0.0}

    def __init__(
        self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_mode: str = "new",
        decoder_state: Any = None,
        decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int | None = None,
        decoder_mlp_ratio: float = 4.0, decoder_norm_eps: float = 1e-6, norm_pix_loss: bool = True,
        learnable_pos: bool | None = None, img_size: int | None = None,
    ) -> None:
        super().__init__(backbone)
        if decoder_mode not in DECODER_MODES:
            raise ValueError(f"Unknown decoder_mode '{decoder_mode}'; use one of {DECODER_MODES}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")
        cfg = getattr(backbone, "cfg", None)
        if cfg is None or not hasattr(backbone, "forward_features"):
            raise TypeError("MAE pretext needs a tpp_monai VisionTransformer-like backbone (cfg, forward_features)")
        self.mask_ratio = float(mask_ratio)
        self.decoder_mode = decoder_mode
        self.norm_pix_loss = norm_pix_loss
        self.patch_size, self.in_chans = cfg.patch_size, cfg.in_chans
        side = (img_size or cfg.img_size) // cfg.patch_size
        state = None
        if decoder_mode != "new":
            if decoder_state is None:
                raise ValueError(
                    f"decoder_mode='{decoder_mode}' needs decoder_state (the pre-trained MAE decoder); "
                    "use decoder_mode='new' for a fresh decoder"
                )
            state = _read_decoder_state(decoder_state)
            decoder_dim, decoder_depth, decoder_mlp_ratio = _decoder_dims(state)
            pos = state.get("decoder_pos_embed")
            if pos is not None and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1:
                side = math.isqrt(pos.shape[1] - 1)
            if decoder_heads is None:
                decoder_heads = getattr(decoder_state, "decoder_heads", None)
            if decoder_heads is None:
                warnings.warn(
                    f"The inherited MAE decoder's attention heads are unknown (they cannot be read off the tensors); "
                    f"assuming {MAE_DECODER_HEADS} (MedCoSS / official MAE). Pass decoder_heads=, or the "
                    "LoadedCheckpoint from tpp_monai.backbones.weights.load_vit_checkpoint as decoder_state.",
                    stacklevel=2,
                )
                decoder_heads = MAE_DECODER_HEADS
        if learnable_pos is None:
            learnable_pos = bool(getattr(decoder_state, "decoder_pos_learnable", False)) if state is not None else False
        heads = decoder_heads or max(1, decoder_dim // 64)
        self.decoder_heads = heads
        self.decoder = MAEDecoder(
            backbone.embed_dim, cfg.patch_size, cfg.in_chans, (side, side), decoder_dim, decoder_depth, heads,
            decoder_mlp_ratio, decoder_norm_eps, learnable_pos,
        )
        if state is not None:
            self.load_decoder_state(state)
        self.set_decoder_trainable(decoder_mode != "inherit_frozen")

    # ------------------------------------------------------------------ decoder
    def set_decoder_trainable(self, trainable: bool) -> None:
        for n, p in self.decoder.named_parameters():
            p.requires_grad_(trainable and (n != "decoder_pos_embed" or self.decoder.learnable_pos))

    def load_decoder_state(self, state: Any) -> None:
        """Load a timm-MAE decoder state after checking names and shapes; raises naming what differs."""
        state = _read_decoder_state(state)
        own = self.decoder.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(
            f"{k}: given {tuple(state[k].shape)} vs decoder {tuple(own[k].shape)}"
            for k in set(own) & set(state)
            if tuple(state[k].shape) != tuple(own[k].shape) and k != "decoder_pos_embed"
        )
        if "decoder_pos_embed" in state and "decoder_pos_embed" in own:
            a, b = state["decoder_pos_embed"].shape, own["decoder_pos_embed"].shape
            if a[0] != 1 or a[-1] != b[-1] or math.isqrt(a[1] - 1) ** 2 != a[1] - 1:
                shapes.append(f"decoder_pos_embed: given {tuple(a)} vs decoder {tuple(b)}")
        if missing or unexpected or shapes:
            parts = [f"missing {missing[:6]}" if missing else "", f"unexpected {unexpected[:6]}" if unexpected else "",
                     f"shape mismatch {shapes[:6]}" if shapes else ""]
            raise ValueError(
                "MAE decoder state does not fit the decoder (" + "; ".join(p for p in parts if p) + "). "
                "Pass the decoder of the same pre-trained MAE (timm-MAE key names) or decoder_heads/mode='new'."
            )
        with torch.no_grad():
            for k, v in state.items():
                if k == "decoder_pos_embed" and v.shape != own[k].shape:
                    v = torch.cat([v[:, :1], _resize_patch_table(v[:, 1:].float(), self.decoder.grid)], dim=1)
                own_t = dict(self.decoder.named_parameters()).get(k)
                (own_t if own_t is not None else own[k]).copy_(v.to(own[k].dtype))

    # ------------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [cls, visible...] (B, 1 + n_keep, D); prompt tokens (VPT) are dropped."""
        out = self.backbone.forward_features(images, ids_keep=ids_keep)
        tokens = out.tokens
        n_keep = ids_keep.shape[1]
        if tokens.shape[1] != 1 + n_keep:  # extra tokens (prompts) sit between cls and the patches
            tokens = torch.cat([tokens[:, :1], tokens[:, -n_keep:]], dim=1)
        return tokens

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Patches of ``images`` in the backbone's pixel space, per-patch normalised (unbiased variance, as MAE)."""
        norm = getattr(self.backbone, "normalize_input", None)
        t = patchify(norm(images) if norm is not None else images, self.patch_size)
        if self.norm_pix_loss:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def compute_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE to the (normalised) target."""
        per_patch = ((pred - self.target(images)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"Image size {tuple(images.shape[-2:])} is not divisible by patch {self.patch_size}")
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        b, L = images.shape[0], grid[0] * grid[1]
        # drawn for the global batch, this rank's rows kept: a DDP run masks like one process does
        noise = rank_rows(lambda n: torch.rand(n, L, device=images.device), b)
        ids_keep, mask, ids_restore = random_masking(b, L, self.mask_ratio, device=images.device, noise=noise)
        latent = self.encode(images, ids_keep)
        pred = self.decoder(latent, ids_restore, grid)
        loss = self.compute_loss(images, pred, mask)
        return {"loss": loss, "pred": pred, "mask": mask, "ids_keep": ids_keep}

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}, decoder_mode='{self.decoder_mode}', norm_pix_loss={self.norm_pix_loss}"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "mask_ratio": self.mask_ratio, "decoder_mode": self.decoder_mode,
                "decoder_heads": self.decoder_heads}
