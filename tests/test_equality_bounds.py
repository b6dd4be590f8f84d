"""The shared equality bound (tests/helpers.py) accepts the same AdamW training done in another reduction
order and rejects the bugs it is meant to catch: a skipped step and a share of the batch replaced by other
data (what a rank reading the wrong shard does). Tiny MLP, seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import assert_close_to_update, chain_length, update_distance, update_tolerance  # noqa: E402

WIDTH, DEPTH, BATCH, STEPS = 64, 2, 8, 6


def _train(dtype: torch.dtype, split: int = 1, skip: int | None = None, other_half: bool = False):
    """AdamW on an MLP, the global batch processed as ``split`` micro-batches whose gradients are summed
    (another reduction order, as DDP's ranks or gradient accumulation)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, 4)).to(dtype)
    w0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(BATCH, WIDTH, generator=g).to(dtype)
        y = torch.randint(0, 4, (BATCH,), generator=g)
        if other_half:
            x[BATCH // 2:] = torch.randn(BATCH // 2, WIDTH, generator=torch.Generator().manual_seed(99 + step))
        if step == skip:
            continue
        opt.zero_grad()
        for xs, ys in zip(x.chunk(split), y.chunk(split)):
            (torch.nn.functional.cross_entropy(net(xs), ys) * len(ys) / BATCH).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, w0


N = chain_length([WIDTH] * DEPTH, rows=BATCH)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_accepts_another_reduction_order_and_rejects_bugs(dtype):
    ref, w0 = _train(dtype)
    for split in (2, 4):
        ratio = assert_close_to_update(ref, _train(dtype, split=split)[0], w0, steps=STEPS, n=N)
        assert ratio < 1e-3 if dtype == torch.float32 else ratio < 1e-9
    tol = update_tolerance(STEPS, N, dtype)
    for bug in (dict(skip=STEPS - 1), dict(skip=2), dict(other_half=True)):
        got = _train(dtype, split=2, **bug)[0]
        diff, upd = update_distance(ref, got, w0)
        assert diff > 5 * tol * upd, (bug, diff / upd, tol)  # a clear margin, not a near miss
        with pytest.raises(AssertionError, match="ratio"):
            assert_close_to_update(ref, got, w0, steps=STEPS, n=N)


def test_bound_refuses_a_run_that_trained_nothing():
    ref, w0 = _train(torch.float32)
    with pytest.raises(AssertionError, match="did not move"):
        assert_close_to_update(w0, w0, w0, steps=STEPS, n=N)
