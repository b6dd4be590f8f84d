"""Distributed data parallel (torchrun) helpers shared by the TPP stage, fine-tuning and the benchmark.

Why: a DDP run must give the *same* result as a single-process run with the same global batch and
seed (the schedule sees the global batch, whatever the world size). Three things make that hold:

- :func:`global_batch_sampler`: every run, world size 1 included, draws its order from one
  ``DistributedSampler`` permutation, so the ``W`` per-rank batches of one step together are the
  single-process batch of that step (rank ``r`` holds its global positions ``r, r + W, ...``);
- :func:`rank_rows`: per-sample random draws (MAE masks) are made for the whole global batch with
  the same seed on every rank, and each rank keeps its rows, so sample ``i`` gets the same mask;
- DDP averages gradients and :func:`global_mean` averages batch statistics (DINO's centre) across
  ranks, which equals the single-process mean when the per-rank batches have equal sizes.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import AbstractContextManager, closing, nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

logger = logging.getLogger("tpp_monai.distributed")


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes checkpoints and logs."""
    return rank_world()[0] == 0


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and return this rank's device.

    Outside torchrun (no ``WORLD_SIZE`` in the environment) nothing is initialised and the device is
    ``cuda:0``/``cpu``.
    """
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    return device


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_batch_size(global_batch: int, world_size: int | None = None) -> int:
    """Per-rank batch of a global batch; the global batch must split evenly (the schedule and the
    loss average depend on it)."""
    world = rank_world()[1] if world_size is None else int(world_size)
    if global_batch < world or global_batch % world:
        raise ValueError(
            f"global batch {global_batch} does not split evenly over {world} processes; "
            f"choose a batch size divisible by the number of processes (e.g. {max(world, global_batch // world * world)})"
        )
    return global_batch // world


def global_batch_sampler(dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> DistributedSampler:
    """The sampler of every TPP/fine-tuning run, world size 1 included (see the module docstring).

    MONAI's workflows call ``set_epoch`` on it at each epoch start.
    """
    rank, world = rank_world()
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=int(seed or 0),
                              drop_last=drop_last)


def global_batch_loader(
    dataset: Dataset, global_batch: int, shuffle: bool = True, seed: int | None = 0, drop_last: bool | None = None,
    num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool | None = None, **kw: Any,
) -> DataLoader:
    """DataLoader of this rank's share of a ``global_batch`` (see :func:`global_batch_sampler`).

    ``drop_last`` (default: when the dataset is larger than one global batch) keeps every step at the
    full global batch, as the single-process run has it.
    """
    bs = local_batch_size(global_batch)
    if drop_last is None:
        drop_last = len(dataset) > global_batch  # type: ignore[arg-type]
    # the sampler drops the same tail, so ranks get floor(N / global) full steps like one process does
    sampler = global_batch_sampler(dataset, shuffle=shuffle, seed=seed or 0, drop_last=drop_last)
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return DataLoader(dataset, batch_size=bs, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=persistent_workers, **kw)


def rank_rows(draw: Callable[[int], torch.Tensor], local_batch: int) -> torch.Tensor:
    """Draw per-sample randomness for the global batch and keep this rank's rows.

    ``draw(n)`` returns a tensor whose first dimension is ``n`` samples. Every rank must call it with
    the same RNG state (the TPP trainer seeds each iteration). Rank ``r`` keeps rows ``r, r + W, ...``,
    the global positions :func:`global_batch_sampler` hands it.
    """
    rank, world = rank_world()
    if world == 1:
        return draw(local_batch)
    return draw(local_batch * world)[rank::world]


def global_mean(t: torch.Tensor, dim: int = 0, keepdim: bool = True) -> torch.Tensor:
    """Mean over ``dim`` across all ranks (equal per-rank sizes), e.g. DINO's batch centre."""
    if not is_distributed():
        return t.mean(dim=dim, keepdim=keepdim)
    s = t.sum(dim=dim, keepdim=keepdim).detach().clone()
    n = torch.tensor([t.shape[dim]], dtype=torch.float64, device=t.device)
    dist.all_reduce(s)
    dist.all_reduce(n)
    return s / n.to(s.dtype)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average of a scalar over ranks (logging and the finite-loss check agree on every rank)."""
    if not is_distributed():
        return value.detach()
    v = value.detach().clone().float()
    dist.all_reduce(v)
    return v / dist.get_world_size()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` from every rank, concatenated in rank order; the ranks may hold different numbers of
    rows (validation shards of ``DistributedSampler(even_divisible=False)``, none padded or repeated).

    Why not ``ignite.distributed.all_gather``: it assumes equal sizes (``zeros_like`` buffers), which fails or
    hangs on uneven shards. Every rank must call this (a collective), also with zero rows."""
    if not is_distributed():
        return t
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat([torch.as_tensor(x) for x in parts], 0).to(t.device)


def wrap_ddp(module: nn.Module, device: torch.device | str | None = None, find_unused_parameters: bool = False) -> nn.Module:
    """DDP wrapper over a task/network whose frozen tensors have ``requires_grad=False``: only target
    parameters and trainable heads get gradient all-reduce. Returns ``module`` unchanged outside DDP.

    Buffers are not re-broadcast each step (``broadcast_buffers=False``): the frozen ones are equal on
    every rank and the changing ones (DINO's centre) are averaged by :func:`global_mean`.
    """
    if not is_distributed():
        return module
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("Nothing to train under DDP: the module has no parameter with requires_grad=True")
    device = torch.device(device) if device is not None else next(module.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused_parameters
    )


def accumulation_context(module: nn.Module, last: bool) -> AbstractContextManager:
    """Gradient accumulation under DDP: skip the all-reduce on every micro-batch but the last of a step
    (the gradients are summed locally, then averaged once); a no-op outside DDP."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not last:
        return module.no_sync()
    return nullcontext()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads_per_rank(start_method: str = "fork") -> int:
    """The torch threads of each :func:`spawn_cpu` process: ``TPP_THREADS_PER_RANK`` (default 1), but 1 for
    ``fork``-started processes, with a ``RuntimeWarning``: OpenMP's thread pool does not survive ``fork``, and a
    forked child that computes with more than one thread hangs once the parent has computed in parallel."""
    n = max(1, int(os.environ.get("TPP_THREADS_PER_RANK", "1")))
    if n > 1 and start_method == "fork":
        import warnings

        warnings.warn(f"TPP_THREADS_PER_RANK={n} with fork-started processes: a forked process computing with more "
                      "than one thread hangs in OpenMP once the parent has computed in parallel, so each rank uses "
                      f"1 thread. For {n} threads per rank pass start_method='spawn' (a module-level fn) or start the "
                      "ranks with torchrun.", RuntimeWarning, stacklevel=3)
        return 1
    return n


def _spawned(rank: int, fn: Callable, world: int, port: int, args: Sequence[Any], threads: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        cleanup_distributed()  # ``fn`` may have left the group already (a bundle's finalize)


def spawn_cpu(fn: Callable, world_size: int, *args: Any, start_method: str = "fork",
              timeout: float | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes joined by gloo (tests and the
    benchmark; real runs use torchrun). ``fork`` (default) skips re-importing torch/MONAI in every child;
    each child computes with ``TPP_THREADS_PER_RANK`` threads (default 1; always 1 under ``fork``, see
    :func:`threads_per_rank`). With ``"spawn"``, ``fn`` must be importable (a module-level function).
    ``timeout`` (seconds): a run still going then (a hung collective) is killed and ``TimeoutError`` raised,
    so a test fails instead of blocking."""
    import time

    import torch.multiprocessing as mp

    threads = threads_per_rank(start_method)
    ctx = mp.start_processes(_spawned, args=(fn, world_size, free_port(), args, threads), nprocs=world_size,
                             join=timeout is None, start_method=start_method)
    if timeout is None:
        return
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
            raise TimeoutError(f"{world_size} processes of {getattr(fn, '__name__', fn)} still running after "
                               f"{timeout:.0f} s (a rank waits in a collective the others never reach?)")
