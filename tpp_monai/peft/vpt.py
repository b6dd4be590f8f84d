"""VPT-deep (Jia et al., ECCV 2022): ``num_tokens`` learnable prompt tokens per block.

Before each block the block's prompts are inserted right after the class token (index 0 stays the
class token; first in a class-token-free forward, ``forward_features(..., cls_token=False)``); after the block the outputs at the prompt positions are dropped, so the token stream
seen by the rest of the network (hidden states, heads, the MAE decoder) has its usual length.
Prompts do not depend on the image or on MAE masking: under masking they simply travel with the
visible tokens.

VPT is **not** zero-initialised: prompts are drawn uniformly in ``[-v, v]`` with
``v = sqrt(6 / (in_chans * patch_size**2 + D))`` (the Xavier-style bound of the VPT paper), so
inserting VPT changes the network's output. Parameters: ``blocks.N.peft_vpt_prompt`` (1, T, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tpp_monai.peft._common import vit_blocks
from tpp_monai.peft.base import PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS


@dataclass
class VPTConfig(PeftConfig):
    num_tokens: int = 10


def _prefix(module: nn.Module) -> int:
    """Tokens before the patches in this pass: 1 (class token), 0 for a class-token-free forward."""
    ctx = getattr(module, "_peft_vpt_context", None)
    return int(getattr(ctx, "num_prefix", 1))


def _insert_prompts(module: nn.Module, args):
    x = args[0]
    k = _prefix(module)
    p = module.peft_vpt_prompt.expand(x.shape[0], -1, -1).to(x.dtype)
    return (torch.cat([x[:, :k], p, x[:, k:]], dim=1),) + tuple(args[1:])


def _remove_prompts(module: nn.Module, args, output):
    n, k = module.peft_vpt_prompt.shape[1], _prefix(module)
    return torch.cat([output[:, :k], output[:, k + n:]], dim=1)


@PEFT_METHODS.register("vpt")
class VPT(PeftMethod):
    name = "vpt"
    config_cls = VPTConfig

    def inject(self, model: nn.Module) -> None:
        blocks = vit_blocks(model)
        if self.config.num_tokens < 1:
            raise ValueError(f"vpt num_tokens must be >= 1, got {self.config.num_tokens}")
        d = model.embed_dim
        in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
        patch = getattr(model, "patch_size", 16)
        bound = math.sqrt(6.0 / float(in_chans * patch * patch + d))
        for blk in blocks:
            prompt = torch.empty(1, self.config.num_tokens, d)
            nn.init.uniform_(prompt, -bound, bound)
            blk.peft_vpt_prompt = nn.Parameter(prompt)
            ctx = getattr(model, "context", None)
            if ctx is not None:
                blk._peft_vpt_context = ctx  # a plain reference, as EVP's
            blk.register_forward_pre_hook(_insert_prompts)
            blk.register_forward_hook(_remove_prompts)
