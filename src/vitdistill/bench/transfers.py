"""Count host<->device copies: every operator that reads a host tensor into a device result, or
reads a device value back to the host. On a GPU each such copy blocks the host until the device
has caught up, so the host cannot queue the next step's kernels while the device works.

Runs on any device that is not the CPU: on a CUDA machine it counts real copies; on a CPU-only
machine the ``meta`` device stands in for the GPU (tests, ``vitdistill bench gpu --smoke``).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class HostDeviceCopies(TorchDispatchMode):
    """Operators that read a host tensor (not a 0-d scalar, which kernels take by value) into a
    device result, or read a device value back to the host (``.item()``, ``.cpu()``...)."""

    def __init__(self):
        super().__init__()
        self.to_device: list[str] = []
        self.to_host: list[str] = []
        self.blocking_to_device: list[str] = []  # of to_device: the copies not issued non_blocking (a host wait on CUDA)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

        def on_device(t):
            return t.device.type != "cpu"

        if any(t.device.type == "cpu" and t.dim() > 0 for t in inputs) and any(on_device(t) for t in outputs):
            self.to_device.append(str(func))
            non_blocking = (kwargs or {}).get("non_blocking", args[2] if func is torch.ops.aten.copy_.default and len(args) > 2 else False)
            if not non_blocking:
                self.blocking_to_device.append(str(func))
        if any(on_device(t) for t in inputs) and (
            func is torch.ops.aten._local_scalar_dense.default or any(t.device.type == "cpu" for t in outputs)
        ):
            self.to_host.append(str(func))
        return out
