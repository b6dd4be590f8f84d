"""FLOPs of one training step, counted (``torch.utils.flop_counter``) and estimated from the shapes.

Why: the MAE-TPP step should cost about half a fine-tuning step (the encoder sees 25% of the tokens, a
narrow decoder sees all of them). Counting what autograd really runs and comparing it with the
estimate tells "our step does extra work" (encoder on all tokens, weight gradients of frozen layers)
apart from "the hardware runs the smaller matrices slower".

The estimate counts matrix products only (2 FLOPs per multiply-add, as ``FlopCounterMode``):
forward once; backward 1x forward for a frozen linear layer (input gradient only), 2x for a trained
one (input and weight gradient) and for the attention products (both operands are activations); no
backward for the patch embedding nor for the first block's frozen layers (nothing before the first
adapter needs a gradient).

``FlopCounterMode`` has no formula for the CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``);
:func:`count_flops` adds one (forward: ``q k^T`` and ``attn v``; backward: the four gradient products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "StepShape", "finetune_step_flops", "mae_step_flops", "mae_finetune_ratio"]


def _attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    b, h, n_q, d = q_shape
    return 4 * b * h * n_q * k_shape[2] * d


def _attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return 2 * _attention_flops(q_shape, k_shape, v_shape)


def _cpu_attention_formulas() -> dict:
    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {ops._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
            ops._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products ``fn()`` runs (forward and any ``backward`` inside it)."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class StepShape:
    """What the estimate needs: encoder width/depth/MLP ratio, patches per image, patch pixels,
    adapter bottleneck (0: none), MAE decoder width/depth/MLP ratio and mask ratio."""

    embed_dim: int
    depth: int
    num_patches: int
    patch_pixels: int  # patch_size**2 * in_chans
    mlp_ratio: float = 4.0
    bottleneck: int = 0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75

    @property
    def visible(self) -> int:
        return max(1, int(round((1.0 - self.mask_ratio) * self.num_patches)))


def _block(n: int, d: int, mlp_ratio: float, linear_bwd: float, bottleneck: int = 0, backward: bool = True) -> float:
    """Forward + backward FLOPs of one pre-norm transformer block on ``n`` tokens of width ``d``
    (``backward=False``: only its trained adapter gets a weight gradient, as in the first block)."""
    linear = 2.0 * n * d * d * (4 + 2 * mlp_ratio)  # qkv (3d), proj (d), fc1 + fc2 (2 r d)
    attn = 4.0 * n * n * d  # q k^T and attn v
    adapter = 4.0 * n * d * bottleneck  # down + up projection, trained
    if not backward:
        return linear + attn + adapter * 2.5  # adapter: weight gradients, and the input gradient of its up layer
    return linear * (1 + linear_bwd) + attn * 3 + adapter * 3


def _encoder(s: "StepShape", n: int) -> float:
    """Frozen encoder (+ adapters) on ``n`` tokens, backward down to the first block's adapter."""
    first = _block(n, s.embed_dim, s.mlp_ratio, 1, s.bottleneck, backward=False)
    return first + (s.depth - 1) * _block(n, s.embed_dim, s.mlp_ratio, 1, s.bottleneck)


def finetune_step_flops(s: StepShape, batch: int = 1) -> float:
    """Encoder on all tokens (frozen, + trained adapters), backward to the first adapter."""
    n = s.num_patches + 1
    embed = 2.0 * s.num_patches * s.patch_pixels * s.embed_dim
    return batch * (embed + _encoder(s, n))


def mae_step_flops(s: StepShape, decoder_trainable: bool, batch: int = 1) -> float:
    """Encoder on the visible tokens, decoder on all tokens (frozen: input gradients only)."""
    nv, n = s.visible + 1, s.num_patches + 1
    bwd = 2 if decoder_trainable else 1
    embed = 2.0 * s.num_patches * s.patch_pixels * s.embed_dim
    encoder = _encoder(s, nv)
    dec_in = 2.0 * nv * s.embed_dim * s.decoder_dim * (1 + bwd)
    dec_out = 2.0 * n * s.decoder_dim * s.patch_pixels * (1 + bwd)
    decoder = s.decoder_depth * _block(n, s.decoder_dim, s.decoder_mlp_ratio, bwd)
    return batch * (embed + encoder + dec_in + decoder + dec_out)


def mae_finetune_ratio(s: StepShape, decoder_trainable: bool) -> float:
    """Estimated MAE-TPP step / fine-tuning step FLOPs (ViT-B/224, decoder 8 x 512: 0.55 frozen, 0.70 trained)."""
    return mae_step_flops(s, decoder_trainable) / finetune_step_flops(s)
