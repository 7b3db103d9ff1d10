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

:class:`Budget` is the controller the training loop calls; :class:`BudgetClock` measures and
:func:`plan_steps` plans.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..config.parsing import parse_duration
from ..device import DistEnv
from ..formatting import format_duration

EXPORT_RESERVE_S = 0.5  # a budgeted run keeps this for writing model.safetensors at the end
PLAN_MARGIN = 0.02  # ... and plans to end this fraction of its budget early (the rate drifts)
REVISIONS = 4  # corrections of a budgeted run's plan from its later epochs
DRIFT = 0.5  # ... made before a quarter of the planned time has passed when the step time is off by more than this


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
    """The measuring side of a budgeted run: :class:`Budget` calls :meth:`measure` after every
    step until it returns the seconds per step, then plans the schedule.

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


class Budget:
    """A budgeted run's schedule: planned from measurements, corrected, cut short when the rate
    did not hold. The training loop calls it at each step (:meth:`after_step`, then
    :meth:`out_of_time` where the loop synchronises anyway) and at each epoch's end
    (:meth:`end_epoch`); :meth:`after_step` and :meth:`end_epoch` return a new plan, or None,
    and the loop applies it (the schedule's length and its cosine).

    ``probe(epoch)`` measures one evaluation and one checkpoint write (the trainer does both);
    every process plans the same schedule (the measurements' maximum over processes).
    """

    def __init__(
        self,
        budget: str,
        clock_start: float,
        env: DistEnv,
        sync: Callable[[], None],
        steps_per_epoch: int,
        eval_every: int,
        max_steps: int,
        probe: Callable[[int], tuple[float, float]],
    ):
        self.clock = BudgetClock(parse_duration(budget), clock_start, sync)
        self.env = env
        self.steps_per_epoch, self.eval_every, self.max_steps = steps_per_epoch, eval_every, max_steps
        self.probe = probe
        self.plan: BudgetPlan | None = None
        self.revisions = 0  # corrections of the plan from later epochs so far (end_epoch)
        self.cut_short = False
        self.epoch_costs: list[tuple[int, float, float | None, float | None]] = []  # (steps, train, eval, checkpoint) s per epoch
        self.costs_from = 0  # epoch_costs index where the measurements after the plan begin

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict | None:
        return self.plan.to_dict() if self.plan is not None else None

    def load_state_dict(self, state: dict) -> BudgetPlan:
        """A resumed run keeps the plan as saved, not a new one (and makes no more corrections)."""
        self.plan = BudgetPlan(**state)
        self.revisions = REVISIONS
        return self.plan

    # ---------------------------------------------------------------- the loop's calls
    def after_step(self, steps_done: int) -> BudgetPlan | None:
        """After each step until the first plan: measure the step time; plan once it is known."""
        if self.plan is not None:
            return None
        step_s = self.clock.measure(steps_done)
        if step_s is None:
            return None
        plan = self.make_plan(steps_done, step_s)
        self.costs_from = len(self.epoch_costs) + 1  # this epoch's times include the warm-up and the probes
        return plan

    def out_of_time(self) -> bool:
        """True when what is left of the budget no longer holds the run's end (a last evaluation,
        checkpoint and export): the loop ends the schedule there, marked cut short. (The plan's
        margin is not kept: a slightly slow run may use it before being cut.)"""
        reserve = EXPORT_RESERVE_S + (self.plan.eval_s + self.plan.checkpoint_s if self.plan is not None else 0.0)
        if not self.clock.out_of_time(reserve):
            return False
        self.cut_short = True
        return True

    def end_epoch(self, steps_done: int, train_steps: int, train_s: float, eval_s: float | None, epoch_s: float) -> BudgetPlan | None:
        """At an epoch's end (not the last), with its steps and seconds of training, evaluation
        (None: none this epoch) and in all: plan now if the first epoch ended before the
        measuring window did; later, each time a quarter of the remaining planned time has
        passed (at most ``REVISIONS`` times), re-plan from the epochs since the last plan (their
        training, evaluation and other per-epoch times: free of warm-up, and recent when the
        machine's speed drifts), so that the schedule still ends on the budget. The cosine is
        rebuilt for the new length: a change of a few percent moves the lr by as little."""
        rest_s = epoch_s - train_s - (eval_s or 0.0)  # checkpoint, log, batching...
        self.epoch_costs.append((train_steps, train_s, eval_s, rest_s))
        if self.plan is None:
            step_s = self.clock.partial_rate(steps_done) or self.epoch_costs[-1][1] / max(self.epoch_costs[-1][0], 1)
            plan = self.make_plan(steps_done, step_s)
            self.costs_from = len(self.epoch_costs)
            return plan
        plan = self.plan
        since = self.epoch_costs[self.costs_from :]
        if self.revisions >= REVISIONS or len(since) < 2:
            return None
        steps, train_s = sum(c[0] for c in since), sum(c[1] for c in since)
        due = plan.planned_at_s + 0.25 * (plan.planned_end_s - plan.planned_at_s)
        # a rate far from the plan's is corrected at once: a first plan measured while the machine
        # was busy can be many times too slow, and the run would end long before the revision was due
        drifted = abs(train_s / max(steps, 1) / plan.step_s - 1) > DRIFT
        if self.clock.elapsed() < due and not drifted:
            return None
        evals = [c[2] for c in since if c[2] is not None]
        others = [c[3] for c in since if c[3] is not None]
        eval_s = sum(evals) / len(evals) if evals else plan.eval_s
        other_s = sum(others) / len(others) if others else plan.checkpoint_s
        self.revisions += 1
        plan = self.make_plan(steps_done, train_s / max(steps, 1), eval_s, other_s, announce=False)
        self.costs_from = len(self.epoch_costs)
        return plan

    # ---------------------------------------------------------------- planning
    def make_plan(
        self, steps_done: int, step_s: float, eval_s: float | None = None, checkpoint_s: float | None = None, announce: bool = True
    ) -> BudgetPlan:
        """Fix the schedule's length from the measured step time and the cost of an evaluation
        and a checkpoint (measured now when not given)."""
        if eval_s is None or checkpoint_s is None:
            eval_s, checkpoint_s = self.probe(steps_done // self.steps_per_epoch)
        measured = torch.tensor([step_s, eval_s, checkpoint_s, self.clock.elapsed()], dtype=torch.float64, device=self.env.device)
        if self.env.world > 1:  # every process plans the same schedule
            torch.distributed.all_reduce(measured, op=torch.distributed.ReduceOp.MAX)
        step_s, eval_s, checkpoint_s, elapsed = measured.tolist()
        budget_s = self.clock.budget_s
        self.plan = plan_steps(
            budget_s,
            elapsed,
            steps_done,
            step_s,
            eval_s,
            checkpoint_s,
            self.steps_per_epoch,
            self.eval_every,
            self.max_steps,
            reserve_s=EXPORT_RESERVE_S + PLAN_MARGIN * budget_s,
        )
        if announce and self.env.is_main:
            self.announce(self.plan)
        return self.plan

    def announce(self, plan: BudgetPlan) -> None:
        limit = " (optim.epochs is the limit)" if plan.capped_by_epochs else ""
        print(
            f"vitdistill: budget {format_duration(plan.budget_s)}: {1000 * plan.step_s:.1f} ms/step, {plan.eval_s:.2f} s/evaluation, "
            f"{plan.checkpoint_s:.2f} s/checkpoint -> {plan.total_steps:,} steps ({plan.total_steps / self.steps_per_epoch:.1f} epochs){limit}, "
            f"planned to end at {format_duration(plan.planned_end_s)}",
            flush=True,
        )
