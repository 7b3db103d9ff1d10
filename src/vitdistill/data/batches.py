"""Which sample indices each process sees in each step.

Training: the epoch's seeded permutation is cut into global batches (the last partial batch is
dropped) and each global batch is split contiguously across processes. Evaluation: the split is
cut into contiguous shards, one per process, nothing dropped.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..rng import CounterRNG


def epoch_order(n: int, rng: CounterRNG, epoch: int, repeats: int = 1) -> torch.Tensor:
    """The ``n`` views of ``epoch``, in order, as view keys: ``index + repeat * n``.

    Without repeats, the epoch's seeded permutation of the indices. With repeated augmentation
    (DeiT's RASampler), the first ``ceil(n / repeats)`` indices of the permutation, each followed
    by its other ``repeats - 1`` views (its own keys, so its own crops, flips, mixing...), cut to
    ``n``: an epoch keeps its length and sees each chosen image several times.
    """
    order = rng.permutation(epoch, n, "order")
    if repeats == 1:
        return order
    chosen = order[: -(-n // repeats)]
    return (chosen[:, None] + n * torch.arange(repeats)[None, :]).reshape(-1)[:n]


def train_batches(
    n: int, batch_size: int, rng: CounterRNG, epoch: int, rank: int = 0, world: int = 1, repeats: int = 1
) -> list[torch.Tensor]:
    """This process's view keys (indices without repeats) for every step of ``epoch`` (global
    ``batch_size``)."""
    if batch_size % world:
        raise UserError(f"optim.batch_size: {batch_size} is not divisible by the {world} processes")
    if n < batch_size:
        raise UserError(f"optim.batch_size: {batch_size} is larger than the {n} training images")
    order = epoch_order(n, rng, epoch, repeats)
    per_rank = batch_size // world
    steps = n // batch_size
    return [order[s * batch_size + rank * per_rank : s * batch_size + (rank + 1) * per_rank] for s in range(steps)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1, device=None) -> list[torch.Tensor]:
    """This process's contiguous shard of ``range(n)``, in batches (made on ``device``: no copy)."""
    start, stop = rank * n // world, (rank + 1) * n // world
    return [torch.arange(i, min(i + batch_size, stop), device=device) for i in range(start, stop, batch_size)]
