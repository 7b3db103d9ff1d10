"""Time-budgeted training: "the best model this machine can train in N minutes".

With ``optim.budget`` (``8m``, ``90s``, ``1h30m``) the engine trains a few steps, measures what
each costs once compilation and warm-up are behind it (a training step, one evaluation, one
checkpoint write), and fixes the total number of steps so that the whole schedule -- warmup,
cosine decay to its end, every evaluation and checkpoint -- ends when the budget does. The
schedule keeps the recipe's shape, compressed: warmup takes the same fraction of the steps as
``optim.warmup_epochs`` of ``optim.epochs``, and ``optim.epochs`` stays an upper bound. The plan
is corrected a few times from the epochs since (warm-up and first-call costs make the first
estimate pessimistic, and a machine's speed drifts), and saved in the checkpoint, so a resumed
run keeps it. The budget counts from the start of the run (data, model, compilation included).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from ..config.parsing import parse_duration  # noqa: F401  (re-exported: the budget's unit)

@dataclass
class BudgetPlan:
    """How a budgeted run was planned (saved in the checkpoint and the run's summary)."""

    budget_s: float
    total_steps: int  # training steps of the whole schedule
    steps_per_epoch: int
    planned_at_step: int  # steps done when the plan was made
    planned_at_s: float  # seconds since the run started, then
    step_s: float  # measured seconds per training step (after warm-up)
    eval_s: float  # measured seconds per evaluation
    checkpoint_s: float  # measured seconds per epoch besides training and evaluation: the checkpoint write, logs, batching
    evaluations: int  # evaluations still to come, then
    epochs: int  # epochs of the schedule (the last may be partial)
    planned_end_s: float  # when the plan expects the run to end
    capped_by_epochs: bool  # optim.epochs, not the budget, limited the schedule

    def to_dict(self) -> dict:
        return asdict(self)


def evaluations_after(done_epochs: int, total_steps: int, steps_per_epoch: int, eval_every: int) -> int:
    """Evaluations still to run after ``done_epochs`` epochs: every ``eval_every``-th epoch and the last."""
    epochs = math.ceil(total_steps / steps_per_epoch)
    return sum(1 for e in range(done_epochs + 1, epochs + 1) if e % eval_every == 0 or e == epochs)


def plan_steps(
    budget_s: float,
    elapsed_s: float,
    steps_done: int,
    step_s: float,
    eval_s: float,
    checkpoint_s: float,
    steps_per_epoch: int,
    eval_every: int,
    max_steps: int,
    reserve_s: float = 0.0,
) -> BudgetPlan:
    """The largest total number of steps whose remaining training, evaluations and checkpoint
    writes fit in ``budget_s - elapsed_s - reserve_s``, at most ``max_steps``."""
    done_epochs = steps_done // steps_per_epoch

    def cost(total: int) -> float:
        epochs = math.ceil(total / steps_per_epoch)
        return (
            (total - steps_done) * step_s
            + evaluations_after(done_epochs, total, steps_per_epoch, eval_every) * eval_s
            + (epochs - done_epochs) * checkpoint_s
        )

    available = budget_s - elapsed_s - reserve_s
    low, high = steps_done, max(steps_done, min(max_steps, steps_done + max(0, int(available / max(step_s, 1e-9)))))
    while low < high:  # the cost grows with the total: binary search for the largest that fits
        mid = (low + high + 1) // 2
        if cost(mid) <= available:
            low = mid
        else:
            high = mid - 1
    total = max(low, 1)
    epochs = math.ceil(total / steps_per_epoch)
    return BudgetPlan(
        budget_s=budget_s,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        planned_at_step=steps_done,
        planned_at_s=elapsed_s,
        step_s=step_s,
        eval_s=eval_s,
        checkpoint_s=checkpoint_s,
        evaluations=evaluations_after(done_epochs, total, steps_per_epoch, eval_every),
        epochs=epochs,
        planned_end_s=elapsed_s + cost(total),
        capped_by_epochs=total == max_steps,
    )


class BudgetClock:
    """The measuring side of a budgeted run: the trainer calls :meth:`measure` after every step
    until it returns the seconds per step, then asks :meth:`plan` for the schedule.

    Step time is measured over a window after ``warmup_steps`` (compilation and allocator
    warm-up), long enough to be stable (at least ``min_steps`` steps and about 3% of the
    budget, at most 15 s); the device is synchronised only at the window's two ends.
    """

    def __init__(self, budget_s: float, clock_start: float, sync, warmup_steps: int = 3, min_steps: int = 10):
        self.budget_s = budget_s
        self.clock_start = clock_start
        self.sync = sync  # waits for the device (a no-op on the CPU)
        self.warmup_steps = warmup_steps
        self.min_steps = min_steps
        self.window_start: tuple[int, float] | None = None
        self.window_steps = min_steps
        self.plan: BudgetPlan | None = None
        self.revisions = 0  # corrections of the plan from later epochs so far (Trainer.revise_plan)
        self.cut_short = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock_start

    def measure(self, steps_done: int) -> float | None:
        """Seconds per step once the measuring window is complete, else None."""
        if self.window_start is None:
            if steps_done >= self.warmup_steps:
                self.sync()
                self.window_start = (steps_done, time.perf_counter())
            return None
        first, began = self.window_start
        if steps_done - first < self.window_steps:
            return None
        self.sync()
        seconds, steps = time.perf_counter() - began, steps_done - first
        target = min(0.03 * self.budget_s, 15.0)
        if seconds < target:  # too short to trust: extend the window to about `target`
            self.window_steps = steps + max(1, math.ceil(steps * (target - seconds) / max(seconds, 1e-9)))
            return None
        return seconds / steps

    def partial_rate(self, steps_done: int) -> float | None:
        """Seconds per step of an unfinished window (an epoch ended first), if it has any steps."""
        if self.window_start is None or steps_done <= self.window_start[0]:
            return None
        self.sync()
        return (time.perf_counter() - self.window_start[1]) / (steps_done - self.window_start[0])

    def out_of_time(self, reserve_s: float) -> bool:
        """True when less than ``reserve_s`` (the final evaluation and save) is left: a safety net
        when the measured rate did not hold (the schedule then ends early, marked cut short)."""
        return self.elapsed() > self.budget_s - reserve_s
