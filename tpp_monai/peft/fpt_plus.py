"""FPT+ (Huang et al.): memory-efficient side tuning for high-resolution classification.

Structure as published (paper + reference code YijinHuang/FPT, ``configs/network/FPT+.yaml``); the
choices are written down in ``docs/FPT_PLUS.md``.

* The frozen ViT sees the high-resolution image (e.g. 512 px) once, under ``torch.no_grad()``.
  For each of its top ``side_depth`` layers we take the keys/values of its own self-attention and
  keep only the most important ``floor(keep_ratio * N)`` of its N tokens (class token included in the
  ranking, not forced in), **per attention head**. The importance of a token is "the average attention
  score of other tokens upon it": the attention probabilities of that layer averaged over all queries
  (``importance="global"``, the default); ``importance="cls"`` ranks by the class-token query's row.
* A light side network learns: its own patch embedding of the down-sampled image (e.g. 128 px),
  ``side_depth`` pre-norm ViT blocks of width ``embed_dim // reduction`` (default /8, 6 layers).
* Fine-grained prompts live at the **frozen** width, ``num_prompts`` per side layer, initialised
  N(0, 1e-6). One fusion module serves all layers: LayerNorm of the prompts (it replaces FPT's
  in-projector) gives the queries of a multi-head cross-attention over the frozen layer's selected
  keys/values; the prompts are added back (residual), one shared out-projector maps to the side
  width, then dropout 0.5. The fused prompts are concatenated to the side sequence, pass through the
  side block, and are dropped again.
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
from typing import Any, ClassVar, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.peft._common import vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

#: frozen features of one batch: per selected layer (k, v), each (B, K, D); column block h*hd:(h+1)*hd
#: of row t holds head h's t-th selected token (heads select their tokens independently)
FrozenFeatures = list[tuple[torch.Tensor, torch.Tensor]]
Importance = Literal["global", "cls"]
IMPORTANCE_MODES = ("global", "cls")
#: version tag of the cached feature files; bump when what a file holds changes
CACHE_FORMAT = "tpp-fpt-plus-features/2"


@dataclass
class FPTPlusConfig(PeftConfig):
    reduction: int = 8
    side_depth: int = 6
    #: heads of the side blocks; None = the frozen model's (the reference builds the side ViT from the
    #: frozen model's config, 12 heads for ViT-B)
    side_num_heads: int | None = None
    side_img_size: int = 128
    side_patch_size: int = 16
    num_prompts: int = 16
    keep_ratio: float = 0.2
    mlp_ratio: float = 4.0
    #: "global": mean attention over all queries (paper); "cls": the class-token query's attention
    importance: Importance = "global"
    prompt_dropout: float = 0.5
    prompt_init_std: float = 1e-6

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"FPT+ importance {self.importance!r} is unknown; use one of {IMPORTANCE_MODES}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"FPT+ keep_ratio must be in (0, 1], got {self.keep_ratio}")


def num_kept_tokens(n_tokens: int, keep_ratio: float) -> int:
    """Tokens kept per layer and head: ``floor(keep_ratio * N)`` of all N tokens (class token included), at least 1."""
    return max(1, min(n_tokens, int(keep_ratio * n_tokens + 1e-9)))


def token_importance(attn: torch.Tensor, mode: Importance = "global") -> torch.Tensor:
    """Importance (B, H, N) of each key token from attention probabilities ``attn`` (B, H, N_query, N).

    ``"global"``: the average attention score the queries give the token (mean over the query axis);
    ``"cls"``: the attention the class token (query 0) gives it.
    """
    if mode == "global":
        return attn.mean(dim=-2)
    if mode == "cls":
        return attn[:, :, 0]
    raise ValueError(f"FPT+ importance {mode!r} is unknown; use one of {IMPORTANCE_MODES}")


def attention_importance(q: torch.Tensor, k: torch.Tensor, mode: Importance = "global", chunk: int = 128) -> torch.Tensor:
    """:func:`token_importance` of ``softmax(q k^T / sqrt(hd))`` for q, k (B, H, N, hd), without holding the
    (B, H, N, N) map: queries are taken ``chunk`` at a time (at 512 px the full map of ViT-B is 50 MB
    per image and layer, more than the side network's whole training step)."""
    scale = q.shape[-1] ** -0.5
    if mode == "cls":
        return token_importance((q[:, :, :1] @ k.transpose(-1, -2) * scale).softmax(-1), mode)
    total = torch.zeros(k.shape[:-1], dtype=torch.float32, device=k.device)
    for s in range(0, q.shape[2], chunk):
        total += (q[:, :, s:s + chunk] @ k.transpose(-1, -2) * scale).float().softmax(-1).sum(dim=-2)
    return total / q.shape[2]


def select_tokens(k: torch.Tensor, v: torch.Tensor, importance: torch.Tensor, keep: int):
    """Per head, the ``keep`` most important tokens of ``k``/``v`` (B, H, N, hd), most important first.

    Returns ``k_sel``, ``v_sel`` (B, H, keep, hd) and the token indices (B, H, keep).
    """
    idx = importance.topk(keep, dim=-1).indices
    gather = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return torch.gather(k, 2, gather), torch.gather(v, 2, gather), idx


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) -> (B, T, H * hd)."""
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, D / H)."""
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(1, 2)


# ------------------------------------------------------------------------------ frozen branch
@torch.no_grad()
def frozen_features(vit: nn.Module, image: torch.Tensor, layers: Sequence[int], keep_ratio: float,
                    return_indices: bool = False, importance: Importance = "global"):
    """Selected keys/values of ``layers`` (1-based) of the frozen ``vit`` for ``image``, without autograd.

    Returns a list of ``(k, v)`` (B, K, D) in layer order (see :data:`FrozenFeatures`: each head's
    slice holds that head's own top-K tokens, most important first); with ``return_indices`` also the
    selected token indices (B, H, K) per layer (0 = class token). Each block runs its own ``forward``;
    the keys/values and the importance (:func:`attention_importance`) are computed from its ``attn.qkv`` output.
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
        attn = blk.attn
        captured: list[torch.Tensor] = []
        handle = attn.qkv.register_forward_hook(lambda mod, inp, out: captured.append(out))
        try:
            h = blk(h)
        finally:
            handle.remove()
        q, k, v = attn.split_heads(captured[0])
        imp = attention_importance(q, k, importance)
        k_sel, v_sel, idx = select_tokens(k, v, imp, num_kept_tokens(k.shape[2], keep_ratio))
        feats.append((_merge_heads(k_sel), _merge_heads(v_sel)))
        kept.append(idx)
    return (feats, kept) if return_indices else feats


# ------------------------------------------------------------------------------ side network
class FusionModule(nn.Module):
    """FPT+ fusion, one module for all side layers: fine-grained prompts at the frozen width.

    ``fused_j = Dropout(out_proj(CrossAttn(LN(P_j), K_j, V_j) + P_j))``: LayerNorm instead of FPT's
    in-projector, heads of the frozen model, one shared LayerNorm/out-projector/dropout.
    """

    def __init__(self, num_layers: int, frozen_dim: int, side_dim: int, num_heads: int, num_prompts: int,
                 dropout: float = 0.5, init_std: float = 1e-6) -> None:
        super().__init__()
        if frozen_dim % num_heads:
            raise ValueError(f"frozen width {frozen_dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.prompts = nn.Parameter(torch.empty(num_layers, num_prompts, frozen_dim))
        self.norm = nn.LayerNorm(frozen_dim)
        self.out_proj = nn.Linear(frozen_dim, side_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.prompts, std=init_std)

    def forward(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Fused prompts (B, P, side_dim) of side layer ``layer`` from its frozen k/v (B, K, D)."""
        prompts = self.prompts[layer].unsqueeze(0).expand(k.shape[0], -1, -1)
        q = _split_heads(self.norm(prompts), self.num_heads)
        k = _split_heads(k.to(q.dtype), self.num_heads)
        v = _split_heads(v.to(q.dtype), self.num_heads)
        ctx = _merge_heads(F.scaled_dot_product_attention(q, k, v))
        return self.dropout(self.out_proj(ctx + prompts))


class FPTSideNetwork(nn.Module):
    """Light ViT side branch with fine-grained prompts fused with the frozen model's keys/values."""

    def __init__(self, cfg: FPTPlusConfig, frozen_dim: int, frozen_heads: int, in_chans: int = 3) -> None:
        super().__init__()
        from tpp_monai.backbones.vit import Block, PatchEmbed, ViTConfig

        if frozen_dim % cfg.reduction:
            raise ValueError(f"frozen width {frozen_dim} is not divisible by reduction {cfg.reduction}")
        d = frozen_dim // cfg.reduction
        heads = math.gcd(d, cfg.side_num_heads or frozen_heads)
        self.cfg = cfg
        self.embed_dim = d
        self.patch_size = cfg.side_patch_size
        self.patch_embed = PatchEmbed(cfg.side_patch_size, in_chans, d)
        grid = cfg.side_img_size // cfg.side_patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        bcfg = ViTConfig(embed_dim=d, num_heads=heads, depth=cfg.side_depth, mlp_ratio=cfg.mlp_ratio)
        self.blocks = nn.ModuleList([Block(bcfg) for _ in range(cfg.side_depth)])
        self.norm = nn.LayerNorm(d)
        # side ViT initialised like a fresh (HF) ViT: trunc normal 0.02, zero biases
        for t in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # the fusion module is a plain module in the reference: PyTorch's default Linear init
        self.fusion = FusionModule(cfg.side_depth, frozen_dim, d, frozen_heads, cfg.num_prompts,
                                   cfg.prompt_dropout, cfg.prompt_init_std)

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
        p_n = self.cfg.num_prompts
        for j, blk in enumerate(self.blocks):
            fused = self.fusion(j, *feats[j])
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
    bundle_refusal: ClassVar[str] = (
        "a bundle's network calls the backbone's forward, which never runs FPT+'s side network (only the head would "
        "train). Train it from Python with tpp_monai.peft.fpt_plus.FPTPlusClassifier (+ FeatureCache for the frozen "
        "features), as docs/FPT_PLUS.md shows")

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
        cfg = self.side.cfg
        return frozen_features(self.frozen, image_hr, self.layers, cfg.keep_ratio, importance=cfg.importance)

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
    ``k{j}``, ``v{j}`` (K, D) and ``idx{j}`` (H, K) per side layer j (see :func:`frozen_features`); the
    file's metadata records :data:`CACHE_FORMAT`, the importance mode, the keep ratio and the frozen layers.
    Files are written atomically and existing ones with the same settings are skipped (resumable); a
    file made with other settings or by an older version is an error naming it, never silently reused.
    ``get(ids)`` returns batched ``[(k, v), ...]``.
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

        from tpp_monai.safe_io import atomic_file

        if self.model is None:
            raise RuntimeError("FeatureCache.build needs the FPTPlusClassifier (frozen model) it caches for")
        self.root.mkdir(parents=True, exist_ok=True)
        model = self.model
        was = model.training
        model.eval()
        written: list[Path] = []
        pending: list[tuple[Any, torch.Tensor]] = []
        settings = self.settings(model)

        def flush() -> None:
            ids = [i for i, _ in pending]
            imgs = torch.stack([im for _, im in pending]).to(device)
            feats, kept = frozen_features(model.frozen, imgs, model.layers, model.side.cfg.keep_ratio,
                                          return_indices=True, importance=model.side.cfg.importance)
            for b, image_id in enumerate(ids):
                tensors = {}
                for j, ((k, v), idx) in enumerate(zip(feats, kept)):
                    tensors[f"k{j}"] = k[b].to("cpu", self.dtype).contiguous()
                    tensors[f"v{j}"] = v[b].to("cpu", self.dtype).contiguous()
                    tensors[f"idx{j}"] = idx[b].cpu().contiguous()
                path = self.path(image_id)
                with atomic_file(path) as tmp:
                    save_file(tensors, str(tmp), metadata={**settings, "id": str(image_id)})
                written.append(path)
            pending.clear()

        for item in dataset:
            if isinstance(item, dict):
                image_id, image = item[id_key], item[image_key]
            else:
                image_id, image = item[0], item[1]
            if not overwrite and self.path(image_id).is_file():
                self._read(self.path(image_id), tensors=False)
                written.append(self.path(image_id))
                continue
            pending.append((image_id, torch.as_tensor(image)))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        model.train(was)
        return written

    @staticmethod
    def settings(model: FPTPlusClassifier) -> dict[str, str]:
        """What the cached features depend on besides the image (stored in each file's metadata)."""
        cfg = model.side.cfg
        return {"format": CACHE_FORMAT, "importance": cfg.importance, "keep_ratio": repr(float(cfg.keep_ratio)),
                "layers": ",".join(map(str, model.layers))}

    def _read(self, path: Path, tensors: bool = True) -> dict[str, torch.Tensor]:
        """Tensors of one cache file after checking its metadata against this cache's settings."""
        from safetensors import safe_open

        if not path.is_file():
            raise FileNotFoundError(f"FPT+ feature cache file {path} is missing; build the cache first "
                                    f"(FeatureCache(root, model).build(dataset)).")
        want = self.settings(self.model) if self.model is not None else {"format": CACHE_FORMAT}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
            if diff:
                found = ", ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in diff.items())
                raise ValueError(f"FPT+ feature cache file {path} was made with other settings: {found}. Rebuild "
                                 f"it: FeatureCache(root, model).build(..., overwrite=True), or use a new cache folder.")
            return {k: f.get_tensor(k) for k in f.keys()} if tensors else {}

    def get_one(self, image_id: Any) -> dict[str, torch.Tensor]:
        return self._read(self.path(image_id))

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
