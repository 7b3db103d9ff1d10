"""Where the work runs: the device (and its CUDA math settings), the precision, and the process
group (torchrun: one process per GPU; or a single process).

A bottom module: the engine, the runner and every teacher-side writer (``cache``, ``labelmaps``,
``verify``) import it, so it imports nothing of vitdistill but the errors."""

from __future__ import annotations

import atexit
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistEnv:
    """This process's place in the group (rank of world) and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(setting: str) -> torch.device:
    """The device of ``engine.device`` (``auto``: CUDA when available); every entry point (train,
    eval, cache, labelmaps, verify, analyze, benchmarks) comes through here, so the CUDA math
    settings are made here, once."""
    if setting == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(setting)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"engine.device: {setting} was asked for, but CUDA is not available")
    if device.type == "cuda":
        use_fast_cuda_math()
    return device


def use_fast_cuda_math() -> None:
    """TF32 matmuls and convolutions (fp32 parts of bf16 runs; 10-bit mantissa, as timm's
    training scripts) and cuDNN autotuning for fixed input shapes."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def setup_distributed(device_setting: str) -> DistEnv:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; else a one-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_setting)
    if world == 1:
        return DistEnv(rank=0, world=1, device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # left to the interpreter's exit, gloo's threads were torn down after their owner and the
        # process aborted ("terminate called without an active exception", exit -6) after a
        # finished run: the group is destroyed first
        atexit.register(_destroy_group)
    return DistEnv(rank=rank, world=world, device=device)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def uses_bf16(device: torch.device, precision: str) -> bool:
    """``precision: auto`` is bf16 on CUDA and fp32 on the CPU; ``bf16``/``fp32`` force it."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """bf16 autocast where :func:`uses_bf16`, else nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, precision) else nullcontext()


def describe_machine(device: str) -> dict:
    """The machine a benchmark ran on: the device's name and type, torch, timm, CUDA and Python
    versions, and the CPU cores this process may use."""
    import timm

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": name,
        "device_type": dev.type,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": len(os.sched_getaffinity(0)),
    }
