"""Non-finite values never reach a checkpoint: the loss of every step and the whole state before
every write are checked, and a diverged run stops with one line, keeping its last finite
checkpoint.

Two policies (``engine.nan_policy``):

* ``stop`` (default): each step's ``isfinite(loss)`` is accumulated on the device, with no
  per-step synchronisation; the flag is read where the loop synchronises anyway (every progress
  update and the epoch's end), and the run stops naming the first bad step.
* ``skip_step``: the update of a step whose loss or gradient norm is not finite is skipped and
  counted (one synchronisation per step); after ``engine.max_skipped_steps`` skipped steps the
  run stops.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..device import DistEnv
from ..errors import UserError

NO_STEP = 2**62  # "no bad step yet" (a min-reduction keeps the first bad step across processes)


class TrainingDiverged(UserError):
    """The loss or the weights became non-finite; the run stopped before saving them."""


def nonfinite_count(tensors: Iterable[torch.Tensor]) -> int:
    """How many values of the floating-point ``tensors`` are NaN or infinite (one sync)."""
    counts = [(~torch.isfinite(t)).sum() for t in tensors if t.is_floating_point() or t.is_complex()]
    return int(torch.stack(counts).sum()) if counts else 0


def state_tensors(*modules: torch.nn.Module | None) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules`` (``None`` entries are skipped)."""
    tensors: list[torch.Tensor] = []
    for module in modules:
        if module is not None:
            tensors += [t.detach() for t in module.parameters()] + [t.detach() for t in module.buffers()]
    return tensors


class FiniteGuard:
    """Watches the training loss for NaN/inf under ``policy`` (see the module docstring)."""

    def __init__(self, policy: str, max_skipped: int, env: DistEnv):
        self.policy = policy
        self.max_skipped = max_skipped
        self.env = env
        self.skipped_total = 0
        self.start_epoch()

    def start_epoch(self) -> None:
        device = self.env.device
        self.first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.skipped = 0

    def record(self, loss: torch.Tensor, step: int) -> None:
        """``stop`` policy: remember (on the device) the first step whose loss is not finite."""
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad == NO_STEP), torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_loss = torch.where(bad & (self.bad_loss == 0), loss.detach().float(), self.bad_loss)

    def skip_update(self, loss: torch.Tensor, grad_norm: torch.Tensor, epoch: int, step: int) -> bool:
        """``skip_step`` policy: True when this step's update must be skipped (synchronises)."""
        bad = (~torch.isfinite(loss.detach().float())) | (~torch.isfinite(grad_norm.float()))
        if self.env.world > 1:  # one process's NaN loss must skip the step everywhere
            bad = bad.to(torch.int32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bool(bad):
            return False
        self.skipped += 1
        self.skipped_total += 1
        if self.skipped_total > self.max_skipped:
            raise TrainingDiverged(
                f"training diverged: {self.skipped_total} steps with a non-finite loss or gradient were skipped "
                f"(the last in epoch {epoch + 1}, step {step + 1}; engine.max_skipped_steps={self.max_skipped}); "
                f"{self.kept_message(epoch)}; try a lower optim.lr or set optim.clip_grad"
            )
        return True

    def check(self, epoch: int) -> None:
        """Stop (all processes together) if a recorded loss was not finite."""
        if self.policy != "stop":
            return
        first = self.first_bad.clone()
        if self.env.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)
        if step != NO_STEP:
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1} at step {step + 1} (loss {float(self.bad_loss)}); "
                f"{self.kept_message(epoch)}; try a lower optim.lr or set optim.clip_grad (or engine.nan_policy=skip_step)"
            )

    @staticmethod
    def kept_message(epoch: int) -> str:
        if epoch == 0:
            return "nothing was saved (no epoch finished with finite weights)"
        return f"checkpoint.pt keeps epoch {epoch}, the last finite state"


def check_finite_state(epoch: int, *modules: torch.nn.Module | None) -> None:
    """Raise :class:`TrainingDiverged` if any parameter or buffer of ``modules`` is NaN or inf."""
    bad = nonfinite_count(state_tensors(*modules))
    if bad:
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1}: the weights hold {bad:,} non-finite values although the losses were finite; "
            f"{FiniteGuard.kept_message(epoch)}; try a lower optim.lr or set optim.clip_grad"
        )
