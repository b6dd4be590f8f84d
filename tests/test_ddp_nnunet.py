"""The nnU-Net TPP stage under DDP, at module level.

nnU-Net 2.8.1 runs ``-num_gpus N`` only on CUDA with NCCL (``run_training.py`` asserts a CUDA device
and calls ``init_process_group("nccl")``), so its DDP cannot run in CPU CI. What the stage relies on is
tested here with 2 gloo processes on the object it trains (3D DINO on STU-Net + Conv-Adapter): wrapped
by ``wrap_ddp``, with gradient accumulation through ``accumulation_context``, ranks that see different
patches end with identical target parameters and centre, while unsynchronised ranks drift apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tpp_monai.engines.distributed import accumulation_context, spawn_cpu, wrap_ddp
from tpp_monai.peft import apply_peft, target_state_dict

STRIDES = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


def _stage(rank: int, sync: bool, steps: int = 2, accumulation: int = 2) -> dict:
    from tpp_monai.backbones.stunet import STUNet
    from tpp_monai.pretext import PRETEXT_TASKS

    torch.manual_seed(0)
    net = STUNet(1, 2, size="small", strides=STRIDES)
    apply_peft(net, "conv_adapter")
    task = PRETEXT_TASKS.get("dino3d")(net, global_size=16, local_size=12, n_local_crops=1, out_dim=16, hidden_dim=16,
                                        bottleneck_dim=8)
    # unused: on encoder-only DINO the decoder adapters get no gradient
    fwd = wrap_ddp(task, torch.device("cpu"), find_unused_parameters=True) if sync else task
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # every rank draws its own patches, as nnU-Net's loaders do
    task.train()
    for it in range(steps):
        opt.zero_grad(set_to_none=True)
        for k in range(accumulation):
            with accumulation_context(fwd, last=k == accumulation - 1):
                (fwd(torch.randn(2, 1, 20, 20, 20, generator=g))["loss"] / accumulation).backward()
        opt.step()
        task.after_step(it, steps)
    return {"targets": {k: v.clone() for k, v in target_state_dict(net).items()}, "center": task.center.clone()}


def _worker(rank: int, world: int, out: str) -> None:
    torch.save({"sync": _stage(rank, True), "local": _stage(rank, False)}, Path(out) / f"r{rank}.pt")


def test_ddp_tpp_stage_keeps_ranks_identical(tmp_path):
    spawn_cpu(_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))

    def diff(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    assert diff(r0["sync"]["targets"], r1["sync"]["targets"]) == 0.0
    assert torch.equal(r0["sync"]["center"], r1["sync"]["center"])
    assert diff(r0["local"]["targets"], r1["local"]["targets"]) > 1e-4  # without DDP every rank trains its own
