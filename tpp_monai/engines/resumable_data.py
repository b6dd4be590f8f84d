"""A data-loader wrapper whose batch stream can be resumed exactly after a crash.

The engine sees one endless stream made of *passes* over the loader. Pass ``p`` shuffles with a
generator seeded from ``(data_seed, p)`` (the sampler's and the loader's worker-seed generator;
``set_epoch(p)`` for a distributed sampler) and reseeds the dataset's random transforms (MONAI
``Randomizable``: random crops, flips) from it, so neither the order nor the augmentation depends on
the global RNG or on when the engine happens to create the iterator. ``state_dict()`` = (seed, pass, batches taken in
it); after ``load_state_dict`` the next batch is the one an uninterrupted run would have drawn
(a resume inside a pass re-reads and drops the batches already used in it).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

_PASS_STRIDE = 1_000_003  # keeps (seed, pass) -> generator seed distinct across nearby seeds


class ResumableLoader:
    """Wraps ``loader``; ``len()`` and iteration behave like the loader's own (see module docstring)."""

    def __init__(self, loader: Iterable, data_seed: int) -> None:
        self.loader = loader
        self.data_seed = int(data_seed)
        self.pass_index = 0  # pass in progress (or next to start)
        self.taken = 0  # batches handed out in that pass
        self._len = _length(loader)

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the wrapped data loader has no len()")
        return self._len

    def _seed_pass(self, p: int) -> None:
        seed = (self.data_seed * _PASS_STRIDE + p) % (2**63 - 1)
        sampler = getattr(self.loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(p)
        elif sampler is not None and hasattr(sampler, "generator"):
            sampler.generator = torch.Generator().manual_seed(seed)
        if hasattr(self.loader, "generator"):  # worker base seeds come from it
            self.loader.generator = torch.Generator().manual_seed(seed + 1)
        dataset = getattr(self.loader, "dataset", None)
        if dataset is not None:  # random transforms in this process (workers reseed from the base seed)
            from monai.data.utils import set_rnd

            set_rnd(dataset, (seed + 2) % (2**32))

    def __iter__(self) -> Iterator[Any]:
        if self._len is not None and self.taken >= self._len:  # the previous pass is used up
            self.pass_index, self.taken = self.pass_index + 1, 0
        self._seed_pass(self.pass_index)
        it = iter(self.loader)
        for _ in range(self.taken):  # resuming inside a pass
            next(it)
        return self._count(it)

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self.taken += 1
            yield batch
        self.pass_index, self.taken = self.pass_index + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"data_seed": self.data_seed, "pass": self.pass_index, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.data_seed, self.pass_index, self.taken = int(state["data_seed"]), int(state["pass"]), int(state["taken"])


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
