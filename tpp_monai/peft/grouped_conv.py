"""A grouped convolution with few input channels per group, written as a batched matrix product followed by
a sum of shifted slices ("taps" formulation). Same maths as ``F.conv{1,2,3}d(..., groups=G)``; why it exists:

oneDNN's grouped 3D convolution on CPU is slow for Conv-Adapter's shape (groups of 8 input channels -> 1 output
channel): on STU-Net-small at 64^3 the 32-channel adapter alone took longer forward + backward than the frozen
convolution it runs parallel to, which made a Conv-Adapter training step 1.5x a full fine-tuning step. Here the
``k^d`` kernel taps are applied to all positions at once as one ``(taps x in/G) @ (in/G x N)`` matrix product per
group (MKL GEMM), and the tapped maps are summed into the output by shifted slices (no im2col buffer, exact
zero padding). With a stride ``s``, taps are grouped by the residue of their input offset modulo ``s`` so every
tap is evaluated only at the (sub-sampled) positions it contributes to.

Stride 1 (every Conv-Adapter of a "same" convolution, the full-resolution ones included) runs depth slab by depth
slab instead (:class:`_GroupedConvSlabs`): the tapped maps of a few output slices (about ``SLAB_BYTES``) are made,
summed into the output and dropped while they are still in cache, and the backward pass rebuilds its tapped
gradients slab by slab the same way. The whole-volume tapped maps are ``k^d`` times the adapter's output (27x in
3D): written, read back and allocated for every step they cost more than the arithmetic (STU-Net-small, 64^3, one
thread: the 32-channel decoder adapter 0.35 s -> 0.2 s forward + backward; ``benchmarks/conv_adapter_step.py``).
No padded copy of the input is made: each tap reads only the positions inside the input.

The backward pass of the strided path is autograd's for the matrix product plus :class:`_ShiftAdd`'s (a slice copy). Shapes are
read from the tensors, so this path must not be traced into TorchScript (the plan would be frozen to one input
size): :class:`tpp_monai.peft.conv_adapter.ConvAdapterModule` uses the plain grouped convolution when tracing.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch

__all__ = ["grouped_conv_taps", "conv_output_shape", "SLAB_BYTES"]

#: size of the tapped maps made at once on the stride-1 path (a few MiB: stays in the last-level cache)
SLAB_BYTES = 4 << 20

# one tap class: (residue per axis, flat tap indices, per tap: (out slices, sub-sampled input slices))
_Plan = tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[tuple[slice, ...], tuple[slice, ...]], ...]], ...]


def conv_output_shape(in_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Spatial output size of a convolution (PyTorch's formula)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(in_shape, kernel, stride, padding, dilation))


@functools.lru_cache(maxsize=256)
def _plan(in_shape: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
          dilation: tuple[int, ...]) -> _Plan:
    """For every output position ``q`` and tap ``t`` (per axis): input ``s*q + d*t - p``. Taps with the same
    residue ``(d*t - p) mod s`` read the same sub-sampled input ``x[r::s]``, at offset ``(d*t - p - r) // s``."""
    out_shape = conv_output_shape(in_shape, kernel, stride, padding, dilation)
    per_axis = []  # axis -> residue -> [(tap, out slice, sub-input slice)]
    for n, n_out, k, s, p, d in zip(in_shape, out_shape, kernel, stride, padding, dilation):
        by_res: dict[int, list] = {}
        for t in range(k):
            off = d * t - p
            r = off % s
            o = (off - r) // s
            n_sub = len(range(r, n, s))
            q0, q1 = max(0, -o), min(n_out, n_sub - o)
            if q1 > q0:
                by_res.setdefault(r, []).append((t, slice(q0, q1), slice(q0 + o, q1 + o)))
        per_axis.append(sorted(by_res.items()))
    strides = [math.prod(kernel[i + 1:]) for i in range(len(kernel))]
    classes = []
    for combo in itertools.product(*per_axis):
        residues = tuple(r for r, _ in combo)
        taps, slices = [], []
        for tap_combo in itertools.product(*(entries for _, entries in combo)):
            taps.append(sum(t * st for (t, _, _), st in zip(tap_combo, strides)))
            slices.append((tuple(e[1] for e in tap_combo), tuple(e[2] for e in tap_combo)))
        classes.append((residues, tuple(taps), tuple(slices)))
    return tuple(classes)


class _ShiftAdd(torch.autograd.Function):
    """``out[..., q] = sum_t z_t[..., q + offset_t]`` over the planned slices (each ``z`` is ``(B, G, taps, *sub)``)."""

    @staticmethod
    def forward(ctx, out_shape: tuple[int, ...], plan: _Plan, *zs: torch.Tensor) -> torch.Tensor:
        z0 = zs[0]
        lead = (slice(None), slice(None))
        full = tuple(slice(0, n) for n in out_shape)
        # start from a tap that covers every output position (the centre tap of a "same" convolution): a
        # copy instead of zero-filling the output and adding to it
        first = next(((c, j) for c, (_, _, slices) in enumerate(plan) for j, (o_sl, _) in enumerate(slices)
                      if o_sl == full), None)
        acc = torch.float32 if z0.dtype in (torch.float16, torch.bfloat16) else z0.dtype  # AMP: sum in fp32
        if first is None:
            out = z0.new_zeros(*z0.shape[:2], *out_shape, dtype=acc)
        else:
            c, j = first
            out = zs[c][lead + (j,) + plan[c][2][j][1]].to(acc, memory_format=torch.contiguous_format, copy=True)
        for c, (z, (_, _, slices)) in enumerate(zip(zs, plan)):
            for j, (o_sl, i_sl) in enumerate(slices):
                if (c, j) != first:
                    out[lead + o_sl] += z[lead + (j,) + i_sl]
        out = out.to(z0.dtype)
        ctx.plan = plan
        ctx.z_shapes = [z.shape for z in zs]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lead = (slice(None), slice(None))
        grads = []
        for shape, (_, _, slices) in zip(ctx.z_shapes, ctx.plan):
            g = grad.new_empty(shape)
            for j, (o_sl, i_sl) in enumerate(slices):
                g[lead + (j,) + i_sl] = grad[lead + o_sl]  # each (tap, position) is read once in forward
                for axis, sl in enumerate(i_sl):  # positions this tap never read get a zero gradient
                    before, after = [slice(None)] * len(i_sl), [slice(None)] * len(i_sl)
                    before[axis], after[axis] = slice(0, sl.start), slice(sl.stop, None)
                    g[lead + (j,) + tuple(before)] = 0
                    g[lead + (j,) + tuple(after)] = 0
            grads.append(g)
        return (None, None, *grads)


class _SubLattices(torch.autograd.Function):
    """Contiguous copies of ``x[..., r0::s0, r1::s1, ...]`` for several residue tuples; the backward writes
    each gradient back into its lattice of one gradient tensor (autograd's slice backward would allocate a
    zero tensor of ``x``'s size per lattice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: tuple[int, ...], residues: tuple[tuple[int, ...], ...]):
        ctx.shape, ctx.stride, ctx.residues = x.shape, stride, residues
        lead = (slice(None), slice(None))
        return tuple(x[lead + tuple(slice(r, None, st) for r, st in zip(res, stride))].contiguous()
                     for res in residues)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        lead = (slice(None), slice(None))
        covered = len(set(ctx.residues)) == math.prod(ctx.stride)  # every position is in one lattice
        g = grads[0].new_empty(ctx.shape) if covered else grads[0].new_zeros(ctx.shape)
        for res, gr in zip(ctx.residues, grads):
            g[lead + tuple(slice(r, None, st) for r, st in zip(res, ctx.stride))] = gr
        return g, None, None


def _windows(n_in: int, n_out: int, k: int, p: int, d: int) -> list[tuple[slice, slice] | None]:
    """Per tap of one axis (stride 1): (output slice, input slice) of the positions it reads inside the input."""
    out = []
    for t in range(k):
        o = d * t - p  # output q reads input q + o
        q0, q1 = max(0, -o), min(n_out, n_in - o)
        out.append((slice(q0, q1), slice(q0 + o, q1 + o)) if q1 > q0 else None)
    return out


def _depth_taps(depth: list[tuple[slice, slice] | None], d0: int, n: int):
    """(depth tap, first and end output slice of the slab ``[d0, d0 + n)`` it reaches, input offset) per depth
    tap that reads inside the input there."""
    for td, win in enumerate(depth):
        if win is None:
            continue
        q0, q1 = max(win[0].start, d0), min(win[0].stop, d0 + n)
        if q1 > q0:
            yield td, q0, q1, win[1].start - win[0].start


class _GroupedConvSlabs(torch.autograd.Function):
    """Stride-1 grouped convolution of ``(B, C, D, H, W)`` (2D: ``D = 1``), depth slab by depth slab.

    Per depth tap ``td`` one matrix product ``(G, ocg * kh * kw, in/G) @ (in/G, slices * H * W)`` makes the
    in-plane tapped maps of a slab; shifted slices add them into the output. The backward pass builds the
    in-plane tapped gradients of a slab once (a zero buffer whose windows are overwritten: outside them it stays
    zero) and applies every depth tap's two matrix products to it (input and weight gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, ...],
                dilation: tuple[int, ...], slab_bytes: int) -> torch.Tensor:
        b, c, d_in, h_in, w_in = x.shape
        out_ch, pg, kd, kh, kw = weight.shape
        groups = c // pg
        ocg, t2 = out_ch // groups, kh * kw
        out_shape = conv_output_shape((d_in, h_in, w_in), (kd, kh, kw), (1, 1, 1), padding, dilation)
        d_out = out_shape[0]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # AMP: sum in fp32
        # (kd, G, ocg * kh * kw, in/G): row (o, th, tw) of group g for depth tap td
        wt = weight.reshape(groups, ocg, pg, kd, t2).permute(3, 0, 1, 4, 2).reshape(kd, groups, ocg * t2, pg)
        wt = wt.contiguous()
        per_slice = b * out_ch * t2 * h_in * w_in * x.element_size()
        n_slab = max(1, min(d_out, slab_bytes // max(per_slice, 1)))
        planes = [(i, hw, ww) for i, (hw, ww) in enumerate(itertools.product(
            _windows(h_in, out_shape[1], kh, padding[1], dilation[1]),
            _windows(w_in, out_shape[2], kw, padding[2], dilation[2]))) if hw is not None and ww is not None]
        depth = _windows(d_in, d_out, kd, padding[0], dilation[0])
        out = x.new_zeros(b, out_ch, *out_shape, dtype=acc)
        grouped = out.view(b, groups, ocg, *out_shape)
        for d0 in range(0, d_out, n_slab):
            n = min(n_slab, d_out - d0)
            for td, q0, q1, off in _depth_taps(depth, d0, n):
                xs = x[:, :, q0 + off:q1 + off].reshape(b, groups, pg, -1)
                z = torch.matmul(wt[td], xs).view(b, groups, ocg, t2, q1 - q0, h_in, w_in)
                oq = grouped[:, :, :, q0:q1]
                for i, (ho, hi), (wo, wi) in planes:
                    oq[:, :, :, :, ho, wo] += z[:, :, :, i, :, hi, wi]
        if bias is not None:
            out += bias.view(1, -1, 1, 1, 1)
        ctx.save_for_backward(x, wt)
        ctx.meta = (tuple(weight.shape), n_slab, planes, depth, bias is not None)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, wt = ctx.saved_tensors
        wshape, n_slab, planes, depth, has_bias = ctx.meta
        out_ch, pg, kd, kh, kw = wshape
        b, c = x.shape[:2]
        h_in, w_in = x.shape[3:]
        groups = c // pg
        ocg, t2 = out_ch // groups, kh * kw
        d_out = grad.shape[2]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        g = grad.contiguous().view(b, groups, ocg, *grad.shape[2:])
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if ctx.needs_input_grad[0] else None
        gwt = torch.zeros(wt.shape, dtype=acc, device=x.device)
        buf = None
        for d0 in range(0, d_out, n_slab):
            n = min(n_slab, d_out - d0)
            if buf is None or buf.shape[4] != n:  # windows are the same for every slab: outside them it stays 0
                buf = g.new_zeros(b, groups, ocg, t2, n, h_in, w_in)
            gs = g[:, :, :, d0:d0 + n]
            for i, (ho, hi), (wo, wi) in planes:
                buf[:, :, :, i, :, hi, wi] = gs[:, :, :, :, ho, wo]
            for td, q0, q1, off in _depth_taps(depth, d0, n):
                gz = buf if (q0, q1) == (d0, d0 + n) else buf[:, :, :, :, q0 - d0:q1 - d0]
                gz = gz.reshape(b, groups, ocg * t2, -1)
                xs = x[:, :, q0 + off:q1 + off].reshape(b, groups, pg, -1)
                gwt[td] += torch.matmul(gz, xs.transpose(-1, -2)).sum(0)
                if gx is not None:
                    gx[:, :, q0 + off:q1 + off] += torch.matmul(wt[td].transpose(-1, -2), gz).view(
                        b, c, q1 - q0, h_in, w_in)
        gw = gwt.view(kd, groups, ocg, t2, pg).permute(1, 2, 4, 0, 3).reshape(wshape).to(wt.dtype)
        gb = grad.sum((0, 2, 3, 4)) if has_bias else None
        return (None if gx is None else gx.to(x.dtype)), gw, gb, None, None, None


def grouped_conv_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """``F.conv{n}d(x, weight, bias, stride, padding, dilation, groups=weight.shape[0] * ...)`` with
    ``groups = in_channels / weight.shape[1]`` (zero padding), as matrix products and shifted slices."""
    b, c, *spatial = x.shape
    out_ch, per_group, *kernel = weight.shape
    groups = c // per_group
    if groups * per_group != c or out_ch % groups:
        raise ValueError(f"grouped_conv_taps: weight {tuple(weight.shape)} does not fit {c} input channels")
    ocg = out_ch // groups  # output channels per group
    nd = len(kernel)
    stride, padding, dilation = (tuple(int(v) for v in a) for a in (stride, padding, dilation))
    if nd in (2, 3) and all(s == 1 for s in stride):
        if nd == 2:  # a unit depth axis: the 3D slab path
            out = _GroupedConvSlabs.apply(x.unsqueeze(2), weight.unsqueeze(2), bias, (0, *padding), (1, *dilation),
                                          SLAB_BYTES)
            return out.squeeze(2)
        return _GroupedConvSlabs.apply(x, weight, bias, padding, dilation, SLAB_BYTES)
    plan = _plan(tuple(spatial), tuple(kernel), stride, padding, dilation)
    out_shape = conv_output_shape(spatial, kernel, stride, padding, dilation)
    taps = math.prod(kernel)
    # (groups, ocg * taps, per_group): row (o, t) of group g applies tap t of output channel g*ocg + o
    w = weight.reshape(groups, ocg, per_group, taps).permute(0, 1, 3, 2).reshape(groups, ocg * taps, per_group)
    if not plan:  # every output position reads padding only
        out = x.new_zeros(b, out_ch, *out_shape) + 0 * weight.sum()
        return out if bias is None else out + bias.view(1, -1, *([1] * nd))
    zs = []
    if any(s > 1 for s in stride):
        lattices = _SubLattices.apply(x, stride, tuple(res for res, _, _ in plan))
    else:
        lattices = (x,)
    for xs, (residues, tap_idx, _) in zip(lattices, plan):
        sub = xs.shape[2:]
        idx = torch.tensor(tap_idx, device=x.device)
        rows = (torch.arange(ocg, device=x.device)[:, None] * taps + idx[None, :]).reshape(-1)
        wc = w if len(tap_idx) == taps else w[:, rows]
        z = torch.matmul(wc, xs.reshape(b, groups, per_group, -1))  # (b, groups, ocg * taps_c, N_sub)
        zs.append(z.view(b, out_ch, len(tap_idx), *sub))  # rows (g, o, t) -> channel g*ocg + o, tap t
    out = _ShiftAdd.apply(out_shape, plan, *zs)
    if bias is not None:
        out = out + bias.view(1, -1, *([1] * nd))
    return out
