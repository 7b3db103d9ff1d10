"""Gather source pixels for upcoming steps in background threads (host-resident images only).

JPEG records (:mod:`.jpeg`) are decoded by the same threads on the CPU, into the same pinned
buffers; with the CUDA decoder the threads fetch each step's bytes and the main thread decodes
them in one batched call when the step comes.

When the decoded images do not fit on the GPU they stay in host memory (RAM, or a memory-mapped
file for ImageNet-sized data). Worker threads copy each step's images into pinned buffers ahead
of time (``index_select`` runs without the GIL, page faults included), and the main thread issues
non-blocking copies to the GPU. The result does not depend on the number of workers: they only
move bytes; every random choice is made later, from the sample index.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def gather(images: torch.Tensor, index: torch.Tensor, pin: bool) -> torch.Tensor:
    """``images[index]``, into a pinned buffer when ``pin`` (PyTorch's caching host allocator
    keeps a buffer alive until the non-blocking copy that reads it has finished). JPEG records
    decode here on the CPU, or fetch the bytes that ``.to(device)`` decodes in one GPU call."""
    index = index.cpu()
    if not isinstance(images, torch.Tensor):
        return images.gather(index, pin)
    out = torch.empty((index.numel(), *images.shape[1:]), dtype=images.dtype, pin_memory=pin)
    return torch.index_select(images, 0, index, out=out)


def prefetch(
    images: torch.Tensor, indices: Iterable[torch.Tensor], device: torch.device, workers: int, depth: int = 3
) -> Iterator[torch.Tensor]:
    """Yield ``images[i].to(device)`` for each ``i`` in ``indices``, gathered ``depth`` steps ahead."""
    pin = device.type == "cuda"
    if workers <= 0:
        for index in indices:
            yield gather(images, index, pin).to(device, non_blocking=True)
        return
    pending: deque = deque()
    source = iter(indices)
    with ThreadPoolExecutor(workers, thread_name_prefix="vitdistill-gather") as pool:
        for index in source:
            pending.append(pool.submit(gather, images, index, pin))
            if len(pending) > depth:
                yield pending.popleft().result().to(device, non_blocking=True)
        while pending:
            yield pending.popleft().result().to(device, non_blocking=True)
