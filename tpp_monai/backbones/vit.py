"""A plain 2D Vision Transformer whose parameter names follow timm, so timm/MAE/DINO state dicts
load without renaming, with the switches MedCoSS needs (first-rows position table, no position on
the class token, LayerNorm after the embedding, no final norm).

PEFT methods attach to it through forward hooks and the shared :class:`ForwardContext`, so the
backbone's own tensor names never change when target parameters are inserted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.backbones.registry import BACKBONES
from tpp_monai.data.normalization import PixelSpaceMixin

VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


@dataclass
class ViTConfig:
    """Architecture of a :class:`VisionTransformer`; stored in checkpoints to identify the backbone."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale_init: float | None = None
    norm_eps: float = 1e-6
    #: "interpolate": timm table of (1, prefix + grid^2, D), resized bicubically for other image sizes.
    #: "first_rows": MedCoSS table of ``pos_table_rows`` rows, the first L rows used, no interpolation.
    pos_embed_mode: Literal["interpolate", "first_rows"] = "interpolate"
    pos_table_rows: int = 1024
    cls_pos: bool = True
    embed_norm: bool = False
    final_norm: bool = True

    @classmethod
    def from_size(cls, size: str, **overrides: object) -> "ViTConfig":
        if size.lower() not in VIT_SIZES:
            raise KeyError(f"Unknown ViT size '{size}'. Known sizes: {', '.join(VIT_SIZES)}.")
        return replace(cls(), **{**VIT_SIZES[size.lower()], **overrides})  # type: ignore[arg-type]

    @classmethod
    def medcoss(cls, **overrides: object) -> "ViTConfig":
        """The MedCoSS ViT-B/16 encoder layout (see docs: MedCoSS ``Unimodel``)."""
        base = dict(
            layer_scale_init=1.0, norm_eps=1e-5, pos_embed_mode="first_rows", pos_table_rows=1024,
            cls_pos=False, embed_norm=True, final_norm=False,
        )
        return replace(cls(), **{**base, **overrides})  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ForwardContext:
    """What the current forward pass knows beyond the token stream (read by PEFT hooks).

    ``image`` is the network input, ``ids_keep`` the indices of visible patches under MAE masking
    (None without masking), ``grid`` the patch grid (h, w), ``num_prefix`` the tokens before the patches
    (1: the class token; 0: a forward without it, as MedCoSS's segmentation model).
    """

    image: torch.Tensor | None = None
    ids_keep: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    extras: dict = field(default_factory=dict)
    num_prefix: int = 1


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear (same row layout as nn.MultiheadAttention)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output of ``self.qkv`` (B, N, 3D) -> q, k, v, each (B, heads, N, head_dim)."""
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v  # unbind returns a list: name the three so the declared tuple is true (TorchScript checks it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.split_heads(self.qkv(x))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(d, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class ViTOutput:
    tokens: torch.Tensor  # (B, 1 + n, D) after the final norm (if any); token 0 is the class token
    #                       ((B, n, D), patches only, for ``forward_features(..., cls_token=False)``)
    hidden_states: dict[int, torch.Tensor]  # 1-based layer index -> (B, 1 + n, D) block output
    grid: tuple[int, int]


class VisionTransformer(PixelSpaceMixin, nn.Module):
    """2D ViT exposing tokens and the hidden states of chosen layers.

    Any image size divisible by the patch size works: timm-style tables are interpolated; the
    MedCoSS table uses its first L rows, like MedCoSS itself.
    """

    num_prefix_tokens = 1

    def __init__(self, cfg: ViTConfig | None = None, **kwargs: object) -> None:
        super().__init__()
        cfg = replace(cfg or ViTConfig(), **kwargs)  # type: ignore[arg-type]
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.context = ForwardContext()
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        grid = cfg.img_size // cfg.patch_size
        if cfg.pos_embed_mode == "interpolate":
            rows = grid * grid + (1 if cfg.cls_pos else 0)
        elif cfg.pos_embed_mode == "first_rows":
            if cfg.cls_pos:
                raise ValueError("pos_embed_mode='first_rows' puts no position on the class token (cls_pos=False)")
            rows = cfg.pos_table_rows
        else:
            raise ValueError(f"Unknown pos_embed_mode '{cfg.pos_embed_mode}': use 'interpolate' or 'first_rows'")
        self.pos_embed = nn.Parameter(torch.zeros(1, rows, d))
        self.embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        # pixel space of pre-training, inside the model (none: images used as given, [0, 1])
        self._init_pixel_space()
        self._init_weights()

    def set_input_norm(self, spec: object = "none", channel_order: str = "rgb") -> "VisionTransformer":
        """Normalise input images as the backbone's pre-training did (``"none"``, ``"imagenet"``,
        ``"path_dino"``, ``[mean, std]``, or ``"zscore"`` per image; see :mod:`tpp_monai.data.normalization`),
        after putting their channels in the pre-training order: ``channel_order="bgr"`` reverses the RGB
        channels the pipelines read (MedCoSS read its pathology images with OpenCV, i.e. BGR).

        Kept in non-persistent buffers: not in ``state_dict`` (checkpoints unchanged), but part of the
        backbone fingerprint, so target parameters trained in another pixel space are refused.
        """
        self._set_pixel_space(spec, channel_order, self.cfg.in_chans, self.cls_token.device)
        return self

    @property
    def input_norm(self) -> object:
        """The pixel space set by :meth:`set_input_norm`: ``"none"``, ``"zscore"`` or ``{"mean": [..], "std": [..]}``."""
        return self._pixel_space_spec()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ embedding
    def patch_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings of the patch tokens for a grid (1, h*w, D)."""
        h, w = grid
        n = h * w
        if self.cfg.pos_embed_mode == "first_rows":
            if n > self.pos_embed.shape[1]:
                raise ValueError(
                    f"Image gives {n} patches but the position table has {self.pos_embed.shape[1]} rows; "
                    f"use an image of at most {self.pos_embed.shape[1] * self.patch_size ** 2} pixels."
                )
            return self.pos_embed[:, :n]
        table = self.pos_embed[:, 1:] if self.cfg.cls_pos else self.pos_embed
        side = int(math.isqrt(table.shape[1]))
        if (side, side) == (h, w) and not torch.jit.is_tracing():
            return table
        # While tracing, always record the resize (the identity at the table's own size) so that a traced
        # export follows the input's grid instead of freezing the trace-time branch.
        table = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, n, -1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens with positions (and the embedding norm), without the class token; ``x`` as
        given to :meth:`forward` (the input normalisation is applied here)."""
        return self._embed(self.normalize_input(x))

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"ViT expects images of shape (B, {self.cfg.in_chans}, H, W); got {tuple(x.shape)}"
            )
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"Image size {tuple(x.shape[-2:])} is not divisible by patch size {self.patch_size}")
        t = self.patch_embed(x)
        grid = (t.shape[-2], t.shape[-1])
        t = t.flatten(2).transpose(1, 2)
        t = t + self.patch_positions(grid)
        return self.embed_norm(t), grid

    def class_token(self, batch: int) -> torch.Tensor:
        cls = self.cls_token
        if self.cfg.cls_pos:
            cls = cls + self.pos_embed[:, :1]
        return cls.expand(batch, -1, -1)

    # ------------------------------------------------------------------ forward
    def forward_features(
        self,
        x: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        return_layers: Sequence[int] = (),
        cls_token: bool = True,
    ) -> ViTOutput:
        """Run the encoder; ``ids_keep`` (B, n_visible) keeps only those patch tokens (MAE).

        ``x`` is normalised first (:meth:`set_input_norm`); PEFT methods reading ``context.image``
        (EVP) see the normalised image, like the patch embedding.

        ``cls_token=False`` runs the blocks on the patch tokens alone (no class token in the sequence), as
        MedCoSS's segmentation model (``Downstream/Dim_2/{Glas,QaTa_CoV19}/model/Unimodel.py``: the video
        embedding's patch tokens go straight into ``fused_encoder``); tokens and hidden states are then
        (B, n, D)."""
        x = self.normalize_input(x)
        ctx = self.context
        ctx.image, ctx.ids_keep, ctx.extras = x, ids_keep, {}
        tokens, grid = self._embed(x)
        ctx.grid = grid
        ctx.num_prefix = 1 if cls_token else 0
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        h = torch.cat([self.class_token(x.shape[0]), tokens], dim=1) if cls_token else tokens
        wanted = set(return_layers)
        bad = [i for i in wanted if not 1 <= i <= len(self.blocks)]
        if bad:
            raise ValueError(f"return_layers {bad} outside 1..{len(self.blocks)}")
        hidden: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks, start=1):
            h = blk(h)
            if i in wanted:
                hidden[i] = h
        out = ViTOutput(self.norm(h), hidden, grid)
        ctx.image = None  # do not keep the batch alive between calls
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).tokens


def build_vit(size: str = "base", **overrides: object) -> VisionTransformer:
    """Build a ViT of a named size (tiny/small/base/large); keyword arguments override ViTConfig."""
    return VisionTransformer(ViTConfig.from_size(size, **overrides))


@BACKBONES.register("vit")
def _vit_factory(size: str = "base", **overrides: object) -> VisionTransformer:
    return build_vit(size, **overrides)


@BACKBONES.register("medcoss_vit")
def _medcoss_factory(**overrides: object) -> VisionTransformer:
    return VisionTransformer(ViTConfig.medcoss(**overrides))
