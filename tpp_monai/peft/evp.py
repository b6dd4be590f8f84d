"""EVP: Explicit Visual Prompting (Liu et al., CVPR 2023), for the ViT backbone.

Two explicit features of the image give the prompts:

* high-frequency components (HFC): ``fftshift(fft2(image))`` with a centred square holding a
  fraction ``freq_nums`` of the spectrum set to zero (the low frequencies), transformed back
  (``|ifft2|``), then patch-embedded by a conv ``in_chans -> D/r`` (``peft_evp.hfc_embed``);
* embedding tune: a Linear ``D -> D/r`` of the patch tokens entering the first block
  (``peft_evp.embed_tune``; here the tokens after position embedding, embedding norm and masking).

Their sum goes through a shared tune (Linear ``D/r -> D/r`` + GELU, ``peft_evp.tune``), and a
per-layer up-projection (``blocks.N.peft_evp_up``, Linear ``D/r -> D``) gives the prompt that is
added to the patch tokens before block N (the class token gets none). ``up`` is zero-initialised,
so EVP is the identity at insertion. (The paper has per-layer lightweight MLPs and a shared
up-projection; we share the tune and keep the up per layer so that zero-init gives identity.)

The shared modules hang off the first block (``blocks.0.peft_evp``). They need the image: the
first block's pre-hook reads ``model.context.image`` (set by the ViT in ``forward_features``) and,
under MAE masking, gathers the HFC tokens of the visible patches with ``model.context.ids_keep``,
so the prompts line up with the visible tokens. The shared feature is passed to the later blocks
through ``model.context.extras["peft_evp"]`` and removed by the last block. Each hooked block keeps
a plain (non-module) reference to the model's context, which deep copies follow.
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


@dataclass
class EVPConfig(PeftConfig):
    #: r: the prompt generator works at width D / r
    scale_factor: int = 4
    #: fraction of the (shifted) spectrum's area, centred, treated as low frequency and removed
    freq_nums: float = 0.25


def high_frequency(x: torch.Tensor, rate: float) -> torch.Tensor:
    """``|ifft2(fft2(x) with the centred low-frequency square of area rate*H*W removed)|``."""
    h, w = x.shape[-2:]
    half = int(math.sqrt(h * w * rate) / 2)
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    keep = torch.ones(h, w, device=x.device)
    if half > 0:
        keep[h // 2 - half: h // 2 + half, w // 2 - half: w // 2 + half] = 0
    spec = spec * keep
    out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), norm="forward")
    return out.real.abs().to(x.dtype)


class EVPShared(nn.Module):
    """HFC patch embedding, embedding tune and the shared tune of EVP (one per backbone)."""

    def __init__(self, dim: int, hidden: int, in_chans: int, patch: int, freq_nums: float) -> None:
        super().__init__()
        self.freq_nums = float(freq_nums)
        self.hfc_embed = nn.Conv2d(in_chans, hidden, kernel_size=patch, stride=patch)
        self.embed_tune = nn.Linear(dim, hidden)
        self.tune = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())

    def forward(self, image: torch.Tensor, patch_tokens: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        hfc = self.hfc_embed(high_frequency(image, self.freq_nums)).flatten(2).transpose(1, 2)
        if ids_keep is not None:
            hfc = torch.gather(hfc, 1, ids_keep.unsqueeze(-1).expand(-1, -1, hfc.shape[-1]))
        return self.tune(hfc + self.embed_tune(patch_tokens))


def _evp_pre_hook(module: nn.Module, args):
    x = args[0]
    ctx = module._peft_evp_context
    if hasattr(module, "peft_evp"):
        if ctx.image is None:
            raise RuntimeError("EVP needs the image: call the ViT's forward/forward_features (it sets context.image)")
        ctx.extras[_KEY] = module.peft_evp(ctx.image, x[:, 1:], ctx.ids_keep)
    feat = ctx.extras[_KEY]
    if module._peft_evp_last:
        del ctx.extras[_KEY]  # do not keep graph tensors in the model after the pass
    prompt = module.peft_evp_up(feat)
    x = torch.cat([x[:, :1], x[:, 1:] + prompt.to(x.dtype)], dim=1)
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
        d = model.embed_dim
        hidden = max(1, d // self.config.scale_factor)
        in_chans = model.cfg.in_chans
        blocks[0].peft_evp = EVPShared(d, hidden, in_chans, model.patch_size, self.config.freq_nums)
        for i, blk in enumerate(blocks):
            up = nn.Linear(hidden, d)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
            blk.peft_evp_up = up
            blk._peft_evp_context = ctx
            blk._peft_evp_last = i == len(blocks) - 1
            blk.register_forward_pre_hook(_evp_pre_hook)
