"""Time-budgeted training: "the best model this machine can train in N minutes".

With ``optim.budget`` (``8m``, ``90s``, ``1h30m``) the engine trains a few steps, measures what
each costs once compilation and warm-up are behind it (a training step, one evaluation, one
checkpoint write), and fixes the total number of steps so that the whole schedule -- warmup,
cosine decay to its end, every evaluation and checkpoint -- ends when the budget does. The
schedule keeps the recipe's shape, compressed: warmup takes the same fraction of the steps as
``optim.warmup_epochs`` of ``optim.epochs``, and ``optim.epochs`` stays an upper bound. The plan
is made once and saved in the checkpoint, so a resumed run keeps it. The budget counts from the
start of the run (data, model, compilation included).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import ConfigError

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | float | int, key: str = "optim.budget") -> float:
    """Seconds in ``90``, ``90s``, ``8m``, ``1.5m``, ``1h30m``; a clear error otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(value)
        except ValueError:
            match = _DURATION.fullmatch(value)
            if not value or match is None or not any(match.groups()):
                raise ConfigError(key, f"expected a duration such as 90s, 8m or 1h30m, got {text!r}") from None
            seconds = sum(float(v) * _UNITS[u] for v, u in zip(match.groups(), "hms") if v)
    if not seconds > 0:
        raise ConfigError(key, f"must be a positive duration, got {text!r}")
    return seconds


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
    checkpoint_s: float  # measured seconds per checkpoint write
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
    total = min(max_steps, steps_done + max(0, int(available / max(step_s, 1e-9))))
    while total > steps_done and cost(total) > available:  # evaluations and checkpoints take their share
        over = cost(total) - available
        total = max(steps_done, total - max(1, int(over / max(step_s, 1e-9))))
    total = max(total, steps_done, 1)
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
