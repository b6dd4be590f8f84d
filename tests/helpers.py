"""Equality bounds derived from the computation, for tests that compare two floating-point runs.

Two runs that do the same arithmetic in another order (one process vs two, 1 vs 2 threads, another CPU's
GEMM blocking, gloo's sum) round differently. How much, follows from the computation, not from what one
machine gave:

* One reduction (dot product, sum, mean) of length n in another order differs, relative to the sum of
  the magnitudes of its terms, by at most ``lambda * sqrt(n) * u`` with probability >= 1 - 2 n exp(-lambda^2 / 2)
  (probabilistic rounding-error analysis, Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019); the worst case
  ``n * u`` (Higham, Accuracy and Stability, 2nd ed., section 3.1) is never reached in practice. u is the
  unit roundoff (2^-24 float32, 2^-53 float64); LAMBDA = 6 makes the failure chance < 1e-7 for n < 1e6.
  Errors along a chain of reductions add, so n is the chain's total length (``chain_length``).
* Training: after T optimiser steps the gradients, and the parameters that depend on them, have drifted by
  at most ``d = T * LAMBDA * sqrt(n) * u`` relative to the update. AdamW (the TPP and fine-tuning optimiser)
  normalises every element's step to ~lr, so an element whose gradient lies within that noise of zero (a
  fraction ~d of them, for gradients spread smoothly around 0) can take a different step of its full size:
  max|a - b| is therefore NOT bounded by d * max|update| (measured, bundle TPP 1 vs 2 processes at 1 vs 2
  threads: max|a - b| = 2.5e-3 of a tensor's largest update, 7.7e-6 absolute, while ||a - b|| = 1.0e-5
  ||a - w0||), but the L2 norm is: ||a - b|| <= (d + sqrt(d)) * ||a - w0||.
* A real bug is far above that: a skipped step moves the result by ~1/T of the update, a rank that trains
  on other data by O(1) of it (``tests/test_equality_bounds.py`` shows both fail the bound).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

LAMBDA = 6.0


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u = eps / 2 of ``dtype`` (2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def chain_length(block_widths: Iterable[int], rows: int = 0) -> int:
    """Total length n of the reductions one gradient element of a transformer goes through: per block of
    width d the forward does qkv, proj and fc1 (d each), fc2 (4 d) and attention (head dim + tokens, <= d),
    ~8 d, and the backward as much again (16 d per block); plus the weight gradient's sum over the
    ``rows`` = batch x tokens that the layer saw."""
    return 16 * sum(int(w) for w in block_widths) + int(rows)


def reduction_noise(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative difference of one length-``n`` reduction computed in two orders: LAMBDA * sqrt(n) * u."""
    return LAMBDA * math.sqrt(n) * unit_roundoff(dtype)


def update_tolerance(steps: int, n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative L2 tolerance on trained parameters after ``steps`` AdamW steps: d + sqrt(d), d = steps x
    the per-step reduction noise (see the module docstring)."""
    d = steps * reduction_noise(n, dtype)
    return d + math.sqrt(d)


def _sq(t: torch.Tensor) -> float:
    return float(t.detach().cpu().double().pow(2).sum())


def update_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                    w0: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(||a - b||, ||a - w0||) over all tensors together (float64)."""
    assert set(a) == set(b) == set(w0) and a, (sorted(a), sorted(b), sorted(w0))
    diff = math.sqrt(sum(_sq(a[k].cpu() - b[k].cpu()) for k in a))
    upd = math.sqrt(sum(_sq(a[k].cpu() - w0[k].cpu()) for k in a))
    return diff, upd


def assert_close_to_update(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                           w0: Mapping[str, torch.Tensor], *, steps: int, n: int,
                           dtype: torch.dtype | None = None) -> float:
    """Assert ``||a - b|| <= update_tolerance(steps, n) * ||a - w0||`` (a, b: trained state dicts of two runs
    of the same training, w0: their common initial values); returns the measured ratio. Also asserts that
    the run trained something (otherwise any a == b would pass)."""
    dtype = dtype or next(iter(a.values())).dtype
    diff, upd = update_distance(a, b, w0)
    assert upd > 0, "the parameters did not move from w0: the comparison says nothing"
    tol = update_tolerance(steps, n, dtype)
    assert diff <= tol * upd, (f"||a - b|| = {diff:.3e} > {tol:.3e} x ||a - w0|| = {tol * upd:.3e} "
                               f"(ratio {diff / upd:.3e}; {steps} steps, chain length {n}, {dtype})")
    return diff / upd


def forward_tolerance(n: int, magnitude: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute bound on the difference of two evaluations of one forward whose reductions total ``n`` and
    whose values are of size ``magnitude``: each is off by <= reduction_noise(n) * magnitude."""
    return 2 * reduction_noise(n, dtype) * magnitude


def mean_tolerance(count: int, magnitude: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute bound on two means of the same ``count`` values (of size <= ``magnitude``) summed in other
    orders: each is off by <= (count - 1) u magnitude (worst case, Higham 4.2), so twice that."""
    return 2 * max(count - 1, 1) * unit_roundoff(dtype) * magnitude
