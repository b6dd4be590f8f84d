"""FPT+ (Huang et al.): memory-efficient side tuning for high-resolution classification.

* The frozen ViT sees the high-resolution image (e.g. 512 px) once, under ``torch.no_grad()``.
  For each of its top ``side_depth`` layers we take the keys/values of its own self-attention
  (``blocks.i.attn.qkv`` applied to ``norm1`` of the block input) and keep only the class token
  plus the top ``ceil(keep_ratio * n)`` patch tokens ranked by the importance "attention of the
  class-token query to each patch, averaged over heads" of that layer (important-token selection).
* A light side network learns: its own patch embedding of the down-sampled image (e.g. 128 px),
  ``side_depth`` pre-norm ViT blocks of width ``embed_dim // reduction`` (default /8, 6 layers).
* Before side layer j, ``num_prompts`` learnable fine-grained prompts (side width) go through a fusion
  module: LayerNorm -> query projection to the frozen width -> multi-head cross-attention over the
  frozen layer's selected keys/values -> one out-projector shared by all layers back to side width
  (residual on the prompts). The fused prompts are concatenated to the side sequence, pass through
  the side block, and are dropped again.
* Because the frozen features depend on the image only (no augmentation on the high-res branch),
  :class:`FeatureCache` pre-computes them once into safetensors files (one per image id) and training
  streams them: the frozen model is not even needed in memory while training.

Layout: ``apply_peft(vit, "fpt_plus", ...)`` attaches the side network at ``vit.peft_side`` (so it is
the target parameters, saved/loaded by the usual target-parameter checkpoint) and freezes the ViT;
:class:`FPTPlusClassifier` wires frozen ViT + side + head.

TPP and FPT+: the side network is registered like any PEFT method, but the generic ``tpp_pretrain``
runs ``backbone.forward_features`` which never calls the side branch, so its target parameters get no
gradient there. Pre-training the side branch needs a pretext task on the side branch (e.g. MAE on
the low-res side tokens conditioned on the cached frozen features); that is not implemented here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.peft._common import vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

#: frozen features of one batch: per selected layer (k, v), each (B, 1 + K, D)
FrozenFeatures = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FPTPlusConfig(PeftConfig):
    reduction: int = 8
    side_depth: int = 6
    side_num_heads: int = 4
    side_img_size: int = 128
    side_patch_size: int = 16
    num_prompts: int = 16
    keep_ratio: float = 0.2
    mlp_ratio: float = 4.0


def num_kept_tokens(n_patches: int, keep_ratio: float) -> int:
    """Patch tokens kept per layer: ``ceil(keep_ratio * n)`` (at least 1); the class token is kept as well."""
    return max(1, min(n_patches, math.ceil(keep_ratio * n_patches - 1e-9)))


# ------------------------------------------------------------------------------ frozen branch
@torch.no_grad()
def frozen_features(vit: nn.Module, image: torch.Tensor, layers: Sequence[int], keep_ratio: float,
                    return_indices: bool = False):
    """Selected keys/values of ``layers`` (1-based) of the frozen ``vit`` for ``image``, without autograd.

    Returns a list of ``(k, v)`` (B, 1 + K, D) in layer order, the class token first and the kept
    patch tokens in decreasing importance; with ``return_indices`` also the kept patch indices (B, K).
    Each block runs its own ``forward``; the keys/values are read off its ``attn.qkv`` output.
    """
    blocks = vit_blocks(vit)
    wanted = sorted(layers)
    feats: FrozenFeatures = []
    kept: list[torch.Tensor] = []
    tokens, _ = vit.embed(image)
    h = torch.cat([vit.class_token(image.shape[0]), tokens], dim=1)
    for i, blk in enumerate(blocks, start=1):
        if i > wanted[-1]:
            break
        if i not in wanted:
            h = blk(h)
            continue
        b, n, c = h.shape
        attn = blk.attn
        captured: list[torch.Tensor] = []
        handle = attn.qkv.register_forward_hook(lambda mod, inp, out: captured.append(out))
        try:
            h = blk(h)
        finally:
            handle.remove()
        q, k, v = attn.split_heads(captured[0])
        # importance: class-token attention to each patch, averaged over heads
        scores = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)) * attn.head_dim ** -0.5  # (B, H, 1, n-1)
        imp = scores.softmax(-1).mean(1).squeeze(1)  # (B, n-1)
        keep = num_kept_tokens(n - 1, keep_ratio)
        idx = imp.topk(keep, dim=1).indices  # (B, K)
        sel = torch.cat([torch.zeros_like(idx[:, :1]), idx + 1], dim=1)  # class token + kept patches
        k_tok = k.transpose(1, 2).reshape(b, n, c)
        v_tok = v.transpose(1, 2).reshape(b, n, c)
        gather = sel.unsqueeze(-1).expand(-1, -1, c)
        feats.append((torch.gather(k_tok, 1, gather), torch.gather(v_tok, 1, gather)))
        kept.append(idx)
    return (feats, kept) if return_indices else feats


# ------------------------------------------------------------------------------ side network
class FusionModule(nn.Module):
    """LayerNorm -> query projection (side -> frozen width) -> cross-attention over frozen k/v."""

    def __init__(self, side_dim: int, frozen_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(side_dim)
        self.q = nn.Linear(side_dim, frozen_dim)

    def forward(self, prompts: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, p, _ = prompts.shape
        d = k.shape[-1]
        hd = d // self.num_heads
        q = self.q(self.norm(prompts)).reshape(b, p, self.num_heads, hd).transpose(1, 2)
        k = k.to(q.dtype).reshape(b, -1, self.num_heads, hd).transpose(1, 2)
        v = v.to(q.dtype).reshape(b, -1, self.num_heads, hd).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, p, d)


class FPTSideNetwork(nn.Module):
    """Light ViT side branch with fine-grained prompts fused with the frozen model's keys/values."""

    def __init__(self, cfg: FPTPlusConfig, frozen_dim: int, frozen_heads: int, in_chans: int = 3) -> None:
        super().__init__()
        from tpp_monai.backbones.vit import Block, PatchEmbed, ViTConfig

        if frozen_dim % cfg.reduction:
            raise ValueError(f"frozen width {frozen_dim} is not divisible by reduction {cfg.reduction}")
        d = frozen_dim // cfg.reduction
        heads = math.gcd(d, cfg.side_num_heads)
        self.cfg = cfg
        self.embed_dim = d
        self.patch_size = cfg.side_patch_size
        self.patch_embed = PatchEmbed(cfg.side_patch_size, in_chans, d)
        grid = cfg.side_img_size // cfg.side_patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        bcfg = ViTConfig(embed_dim=d, num_heads=heads, depth=cfg.side_depth, mlp_ratio=cfg.mlp_ratio)
        self.blocks = nn.ModuleList([Block(bcfg) for _ in range(cfg.side_depth)])
        self.prompts = nn.Parameter(torch.zeros(cfg.side_depth, cfg.num_prompts, d))
        self.fusion = nn.ModuleList([FusionModule(d, frozen_dim, frozen_heads) for _ in range(cfg.side_depth)])
        self.out_proj = nn.Linear(frozen_dim, d)  # shared by all layers
        self.norm = nn.LayerNorm(d)
        for t in (self.cls_token, self.pos_embed, self.prompts):
            nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(image)
        h, w = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)
        pos = self.pos_embed[:, 1:]
        side = int(math.isqrt(pos.shape[1]))
        if (side, side) != (h, w):
            pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
        return torch.cat([cls, t + pos], dim=1)

    def forward(self, image_lr: torch.Tensor, feats: FrozenFeatures) -> torch.Tensor:
        """Class-token feature (B, d) of the side branch."""
        if len(feats) != len(self.blocks):
            raise ValueError(f"side network has {len(self.blocks)} layers but got {len(feats)} frozen feature layers")
        x = self.embed(image_lr)
        p_n = self.prompts.shape[1]
        for j, blk in enumerate(self.blocks):
            k, v = feats[j]
            prompts = self.prompts[j].unsqueeze(0).expand(x.shape[0], -1, -1)
            fused = prompts + self.out_proj(self.fusion[j](prompts, k, v))
            x = blk(torch.cat([x, fused], dim=1))[:, :-p_n]
        return self.norm(x)[:, 0]


# ------------------------------------------------------------------------------ PEFT method
@PEFT_METHODS.register("fpt_plus")
class FPTPlus(PeftMethod):
    """Attaches :class:`FPTSideNetwork` at ``model.peft_side`` (the target parameters)."""

    name = "fpt_plus"
    config_cls = FPTPlusConfig
    #: the generic MAE/DINO TPP stage cannot train it (the side branch is not on backbone.forward's path)
    tpp_supported: ClassVar[bool] = False
    tpp_refusal: ClassVar[str] = "its side network is not on the backbone's forward path that MAE/DINO train"

    def inject(self, model: nn.Module) -> None:
        blocks = vit_blocks(model)
        if self.config.side_depth > len(blocks):
            raise ValueError(f"side_depth {self.config.side_depth} exceeds the frozen depth {len(blocks)}")
        in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
        model.peft_side = FPTSideNetwork(self.config, model.embed_dim, blocks[0].attn.num_heads, in_chans)

    def frozen_layers(self, model: nn.Module) -> list[int]:
        """1-based indices of the frozen layers feeding the side layers: the top ``side_depth``."""
        n = len(vit_blocks(model))
        return list(range(n - self.config.side_depth + 1, n + 1))


class FPTPlusClassifier(nn.Module):
    """Frozen ViT (high-res, no_grad) + side network (low-res) + linear head.

    ``forward(image_hr)`` computes the frozen features on the fly; ``forward(image_lr=..., features=...)``
    uses cached ones (then ``image_hr`` is not needed). ``image_lr`` defaults to ``image_hr`` resized
    (bilinear, antialiased) to ``side_img_size``.
    """

    def __init__(self, frozen_vit: nn.Module, side: FPTSideNetwork | None = None, head: nn.Module | None = None,
                 num_classes: int = 2, **config: Any) -> None:
        super().__init__()
        from tpp_monai.peft.api import apply_peft

        if side is None:
            if getattr(frozen_vit, "peft_side", None) is None:
                apply_peft(frozen_vit, "fpt_plus", config or None)
            side = frozen_vit.peft_side
        for n, p in frozen_vit.named_parameters():
            if not n.startswith("peft_side."):
                p.requires_grad_(False)
        self.frozen = frozen_vit
        self.side = side
        self.head = head if head is not None else nn.Linear(side.embed_dim, num_classes)
        n = len(vit_blocks(frozen_vit))
        self.layers = list(range(n - side.cfg.side_depth + 1, n + 1))

    def train(self, mode: bool = True) -> "FPTPlusClassifier":
        super().train(mode)
        self.frozen.eval()  # frozen branch always in inference mode
        return self

    def extract(self, image_hr: torch.Tensor) -> FrozenFeatures:
        return frozen_features(self.frozen, image_hr, self.layers, self.side.cfg.keep_ratio)

    def low_res(self, image_hr: torch.Tensor) -> torch.Tensor:
        s = self.side.cfg.side_img_size
        return F.interpolate(image_hr, size=(s, s), mode="bilinear", align_corners=False, antialias=True)

    def forward(self, image_hr: torch.Tensor | None = None, image_lr: torch.Tensor | None = None,
                features: FrozenFeatures | None = None) -> torch.Tensor:
        if features is None:
            if image_hr is None:
                raise ValueError("FPTPlusClassifier needs image_hr or cached features")
            features = self.extract(image_hr)
        if image_lr is None:
            if image_hr is None:
                raise ValueError("with cached features pass image_lr (or image_hr to down-sample)")
            image_lr = self.low_res(image_hr)
        return self.head(self.side(image_lr, features))


# ------------------------------------------------------------------------------ feature cache
def _safe_id(i: Any) -> str:
    s = str(i)
    if not s or any(ch in s for ch in "/\\\0") or s.startswith("."):
        raise ValueError(f"image id {s!r} cannot be a file name")
    return s


class FeatureCache:
    """Pre-computed frozen features, one safetensors file per image id, in ``root``.

    ``build(dataset)`` runs the frozen model once (no_grad, eval) over items ``(id, image_hr)`` or
    dicts with ``id_key``/``image_key`` (image (C, H, W)) and writes ``{id}.safetensors`` with
    ``k{j}``, ``v{j}`` (1 + K, D) and ``idx{j}`` (K,) per side layer j; files are written atomically and
    existing ones are skipped (resumable). ``get(ids)`` returns batched ``[(k, v), ...]``.
    """

    def __init__(self, root: str | os.PathLike, model: FPTPlusClassifier | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.root = Path(root)
        self.model = model
        self.dtype = dtype

    def path(self, image_id: Any) -> Path:
        return self.root / f"{_safe_id(image_id)}.safetensors"

    def build(self, dataset: Iterable[Any], batch_size: int = 8, device: str | torch.device = "cpu",
              id_key: str = "id", image_key: str = "image", overwrite: bool = False) -> list[Path]:
        from safetensors.torch import save_file

        if self.model is None:
            raise RuntimeError("FeatureCache.build needs the FPTPlusClassifier (frozen model) it caches for")
        self.root.mkdir(parents=True, exist_ok=True)
        model = self.model
        was = model.training
        model.eval()
        written: list[Path] = []
        pending: list[tuple[Any, torch.Tensor]] = []

        def flush() -> None:
            ids = [i for i, _ in pending]
            imgs = torch.stack([im for _, im in pending]).to(device)
            feats, kept = frozen_features(model.frozen, imgs, model.layers, model.side.cfg.keep_ratio, return_indices=True)
            for b, image_id in enumerate(ids):
                tensors = {}
                for j, ((k, v), idx) in enumerate(zip(feats, kept)):
                    tensors[f"k{j}"] = k[b].to("cpu", self.dtype).contiguous()
                    tensors[f"v{j}"] = v[b].to("cpu", self.dtype).contiguous()
                    tensors[f"idx{j}"] = idx[b].cpu().contiguous()
                path = self.path(image_id)
                tmp = path.with_name(f".{path.name}.tmp")
                save_file(tensors, str(tmp), metadata={"format": "tpp-fpt-plus-features", "id": str(image_id)})
                os.replace(tmp, path)
                written.append(path)
            pending.clear()

        for item in dataset:
            if isinstance(item, dict):
                image_id, image = item[id_key], item[image_key]
            else:
                image_id, image = item[0], item[1]
            if not overwrite and self.path(image_id).is_file():
                written.append(self.path(image_id))
                continue
            pending.append((image_id, torch.as_tensor(image)))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        model.train(was)
        return written

    def get_one(self, image_id: Any) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(image_id)))

    def get(self, ids: Sequence[Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FrozenFeatures:
        items = [self.get_one(i) for i in ids]
        n = sum(1 for key in items[0] if key.startswith("k"))
        return [
            (torch.stack([it[f"k{j}"] for it in items]).to(device, dtype),
             torch.stack([it[f"v{j}"] for it in items]).to(device, dtype))
            for j in range(n)
        ]

    def indices(self, ids: Sequence[Any]) -> list[torch.Tensor]:
        items = [self.get_one(i) for i in ids]
        n = sum(1 for key in items[0] if key.startswith("idx"))
        return [torch.stack([it[f"idx{j}"] for it in items]) for j in range(n)]


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Streams cached frozen features during training: item ``i`` is
    ``{"id", "image_lr", "label", "features": [(k, v), ...]}`` read from the cache on access
    (so only a mini-batch of features is in memory). ``items``: sequence of ``(id, image_lr, label)``
    or dicts with ``id`` / ``image_lr`` / ``label``. Batch with :func:`collate_cached`.
    """

    def __init__(self, cache: FeatureCache, items: Sequence[Any], dtype: torch.dtype = torch.float32) -> None:
        self.cache, self.items, self.dtype = cache, list(items), dtype

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        image_id, image_lr, label = (it["id"], it["image_lr"], it["label"]) if isinstance(it, dict) else it
        raw = self.cache.get_one(image_id)
        n = sum(1 for key in raw if key.startswith("k"))
        feats = [(raw[f"k{j}"].to(self.dtype), raw[f"v{j}"].to(self.dtype)) for j in range(n)]
        return {"id": image_id, "image_lr": torch.as_tensor(image_lr), "label": torch.as_tensor(label), "features": feats}


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of :class:`CachedFeatureDataset` items into a batch."""
    n = len(batch[0]["features"])
    return {
        "id": [b["id"] for b in batch],
        "image_lr": torch.stack([b["image_lr"] for b in batch]),
        "label": torch.stack([b["label"] for b in batch]),
        "features": [(torch.stack([b["features"][j][0] for b in batch]), torch.stack([b["features"][j][1] for b in batch]))
                     for j in range(n)],
    }
