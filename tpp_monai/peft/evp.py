"""EVP: Explicit Visual Prompting (Liu et al., CVPR 2023), for the ViT backbone.

As in the reference ``PromptGenerator`` (NiFangBaAGe/Explicit-Visual-Prompt, ViT variant), at width
``D/r`` (``r = scale_factor``):

* high-frequency components (HFC): ``fftshift(fft2(image))`` with a centred square holding a
  fraction ``freq_nums`` of the spectrum set to zero (the low frequencies), transformed back
  (``|Re ifft2|``), then patch-embedded by a conv ``in_chans -> D/r`` (``peft_evp.hfc_embed``);
* embedding tune: a Linear ``D -> D/r`` of the backbone's raw patch embedding (the output of
  ``patch_embed``, before positions and norm; ``peft_evp.embed_tune``);
* for every block i a *per-layer* lightweight MLP (Linear ``D/r -> D/r`` + GELU,
  ``blocks.i.peft_evp_mlp``) and one *shared* up-projection (Linear ``D/r -> D``,
  ``peft_evp.shared_up``): ``prompt_i = shared_up(mlp_i(hfc + embed_tune(patches)))``, added to the
  patch tokens entering block i (the class token gets none).

Initialisation follows the reference (Linear: trunc-normal std 0.02, bias 0; conv: normal with
std ``sqrt(2 / (k*k*out))``) except ``shared_up``, which starts at zero so that EVP is the identity
at insertion (our rule for inserted branches; every prompt is zero until the first update).
Capacity with ``r = 4`` on ViT-B: 888,192 parameters (the TPP paper's 0.961% cls / 2.94% seg).

The shared modules hang off the first block (``blocks.0.peft_evp``). A forward hook on
``patch_embed`` keeps the raw patch embedding for the pass; the first block's pre-hook reads the
image from ``model.context.image`` (set by the ViT in ``forward_features``) and, under MAE masking,
keeps the HFC and embedding tokens of the visible patches (``model.context.ids_keep``), so the
prompts line up with the visible tokens. The shared feature reaches later blocks through
``model.context.extras`` and is removed by the last block. Hooked modules keep plain
(non-module) references to the context and to the shared generator, which deep copies follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tpp_monai.peft._common import vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS

_KEY = "peft_evp"
_EMBED_KEY = "peft_evp_patch_embed"


@dataclass
class EVPConfig(PeftConfig):
    #: r: the prompt generator works at width D / r (the EVP paper's scale factor; 4 reproduces the TPP Ratio)
    scale_factor: int = 4
    #: fraction of the (shifted) spectrum's area, centred, treated as low frequency and removed
    freq_nums: float = 0.25


def high_frequency(x: torch.Tensor, rate: float) -> torch.Tensor:
    """``|Re ifft2(fft2(x) with the centred low-frequency square of area rate*H*W removed)|``."""
    h, w = x.shape[-2:]
    # tensor arithmetic (float64 sqrt, as math.sqrt) and arange masks instead of Python ints and slices, so that
    # a traced export recomputes the square for each input size instead of freezing the trace-time one
    half = torch.floor(torch.sqrt(torch.as_tensor(h * w * rate, dtype=torch.float64)) / 2).long()
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    low_rows = (rows >= h // 2 - half) & (rows < h // 2 + half)
    low_cols = (cols >= w // 2 - half) & (cols < w // 2 + half)
    keep = (~(low_rows[:, None] & low_cols[None, :])).to(torch.float32)
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    spec = spec * keep
    out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), norm="forward")
    return out.real.abs().to(x.dtype)


def _keep_visible(tokens: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
    if ids_keep is None:
        return tokens
    return torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class EVPGenerator(nn.Module):
    """HFC patch embedding, embedding tune and the shared up-projection of EVP (one per backbone)."""

    def __init__(self, dim: int, hidden: int, in_chans: int, patch: int, freq_nums: float) -> None:
        super().__init__()
        self.freq_nums = float(freq_nums)
        self.hfc_embed = nn.Conv2d(in_chans, hidden, kernel_size=patch, stride=patch)
        self.embed_tune = nn.Linear(dim, hidden)
        self.shared_up = nn.Linear(hidden, dim)
        nn.init.normal_(self.hfc_embed.weight, 0.0, math.sqrt(2.0 / (patch * patch * hidden)))
        nn.init.zeros_(self.hfc_embed.bias)
        nn.init.trunc_normal_(self.embed_tune.weight, std=0.02)
        nn.init.zeros_(self.embed_tune.bias)
        nn.init.zeros_(self.shared_up.weight)
        nn.init.zeros_(self.shared_up.bias)

    def features(self, image: torch.Tensor, patch_tokens: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """``hfc + embed_tune(patch_tokens)`` (B, n, D/r); ``patch_tokens`` are the raw patch embeddings."""
        hfc = self.hfc_embed(high_frequency(image, self.freq_nums)).flatten(2).transpose(1, 2)
        return _keep_visible(hfc, ids_keep) + self.embed_tune(_keep_visible(patch_tokens, ids_keep))


def lightweight_mlp(hidden: int) -> nn.Sequential:
    """EVP's per-layer MLP (Linear D/r -> D/r + GELU), trunc-normal std 0.02 like the reference."""
    mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())
    nn.init.trunc_normal_(mlp[0].weight, std=0.02)
    nn.init.zeros_(mlp[0].bias)
    return mlp


def _store_patch_embed(module: nn.Module, args, output):
    module._peft_evp_context.extras[_EMBED_KEY] = output.flatten(2).transpose(1, 2)
    return None


def _evp_pre_hook(module: nn.Module, args):
    x = args[0]
    ctx = module._peft_evp_context
    gen = module._peft_evp_generator
    if hasattr(module, "peft_evp"):
        if ctx.image is None or _EMBED_KEY not in ctx.extras:
            raise RuntimeError("EVP needs the image: call the ViT's forward/forward_features (it sets context.image)")
        ctx.extras[_KEY] = gen.features(ctx.image, ctx.extras.pop(_EMBED_KEY), ctx.ids_keep)
    feat = ctx.extras[_KEY]
    if module._peft_evp_last:
        del ctx.extras[_KEY]  # do not keep graph tensors in the model after the pass
    prompt = gen.shared_up(module.peft_evp_mlp(feat))
    n = prompt.shape[1]  # one prompt per patch token: the last n tokens (class token / VPT prompts before them)
    x = torch.cat([x[:, : x.shape[1] - n], x[:, x.shape[1] - n:] + prompt.to(x.dtype)], dim=1)
    return (x,) + tuple(args[1:])


@PEFT_METHODS.register("evp")
class EVP(PeftMethod):
    name = "evp"
    config_cls = EVPConfig

    def inject(self, model: nn.Module) -> None:
        blocks = vit_blocks(model)
        ctx = getattr(model, "context", None)
        if ctx is None or not hasattr(ctx, "extras"):
            raise TypeError(f"evp needs a backbone with a ForwardContext (.context); {type(model).__name__} has none")
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None:
            raise TypeError(f"evp needs the backbone's patch_embed module; {type(model).__name__} has none")
        d = model.embed_dim
        hidden = max(1, d // self.config.scale_factor)
        gen = EVPGenerator(d, hidden, model.cfg.in_chans, model.patch_size, self.config.freq_nums)
        blocks[0].peft_evp = gen
        patch_embed._peft_evp_context = ctx
        patch_embed.register_forward_hook(_store_patch_embed)
        for i, blk in enumerate(blocks):
            blk.peft_evp_mlp = lightweight_mlp(hidden)
            blk._peft_evp_context = ctx
            object.__setattr__(blk, "_peft_evp_generator", gen)  # plain reference, not a second sub-module
            blk._peft_evp_last = i == len(blocks) - 1
            blk.register_forward_pre_hook(_evp_pre_hook)
