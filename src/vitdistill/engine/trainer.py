"""The training loop, the same for teachers and students.

The loop knows a model, an objective, views and (optionally) a source of teacher predictions;
it does not know which method the objective implements.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import signals
from ..augment import Augmenter, ViewBatch
from ..config import RunConfig, to_dict
from ..config.parsing import parse_duration
from ..data import steps_per_epoch, train_batches
from ..device import DistEnv, all_reduce_sum, autocast, barrier
from ..formatting import format_duration
from ..models import VisionModel, export_model
from ..objective import Objective
from ..progress import progress_bar
from ..rng import derive_seed
from ..signals import Preempted
from ..targets import TeacherFn, TeacherPrediction
from .budget import Budget, BudgetPlan
from .checkpoint import CHECKPOINT_FORMAT, save_atomic
from .evaluate import evaluate
from .guard import FiniteGuard, check_finite_state
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep(nn.Module):
    """The trainable module: the model plus the objective's own parameters (DDP wraps this;
    the teacher stays outside, so its weights are neither trained, synchronised nor saved)."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: ViewBatch, teacher: TeacherPrediction | None):
        out = self.model(batch.images, **self.objective.model_inputs(batch))
        return self.objective(out, batch, teacher)


class Trainer:
    """Runs ``cfg.optim.epochs`` epochs: train, evaluate, checkpoint (atomically), log.

    A checkpoint records a position, (epoch, step in the epoch): at each epoch's end, every
    ``engine.checkpoint_every`` (steps or a time) inside epochs, and at the step boundary where a
    preemption signal stopped the run (:mod:`vitdistill.signals`). The permutation and every view
    are functions of (seed, epoch, index), so resuming inside an epoch continues exactly: what the
    checkpoint adds is each process's dropout generator and the epoch's partial metrics.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: VisionModel,
        objective: Objective,
        train_views: Augmenter,
        eval_views: Augmenter,
        teacher: TeacherFn | None,
        env: DistEnv,
        output: Path,
        clock_start: float | None = None,
    ):
        self.cfg, self.env, self.output = cfg, env, output
        self.model = model.to(env.device)
        self.objective = objective.to(env.device)
        self.train_views, self.eval_views, self.teacher = train_views, eval_views, teacher
        self.net = torch.compile(self.model) if cfg.engine.compile else self.model
        self.step_module = TrainStep(self.net, self.objective)
        # static_graph: the same parameters are used every step, so heads a recipe leaves
        # unused (e.g. a distillation head without a term) need no per-step graph search.
        self.ddp = DistributedDataParallel(self.step_module, static_graph=True) if env.world > 1 else self.step_module
        self.steps = steps_per_epoch(len(train_views.source), cfg.optim.batch_size)
        # Parameters outside the timm model (a token head; an objective's projector) get their own group.
        extra = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")] + list(self.objective.parameters())
        self.optimizer = build_optimizer(self.model.backbone, extra, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps)
        self.ema = None
        if cfg.engine.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.engine.ema_decay)
        self.guard = FiniteGuard(cfg.engine.nan_policy, cfg.engine.max_skipped_steps, env)
        # The schedule's length in steps: optim.epochs, or what fits in optim.budget (planned
        # after measuring the first steps; see engine.budget).
        self.total_steps = cfg.optim.epochs * self.steps
        self.budget = None
        if cfg.optim.budget is not None:
            start = clock_start if clock_start is not None else time.perf_counter()
            self.budget = Budget(
                cfg.optim.budget,
                start,
                env,
                lambda: sync_device(env.device),
                self.steps,
                cfg.engine.eval_every,
                self.total_steps,
                self.probe_costs,
            )
        self.num_updates = 0
        self.start_epoch = 0
        self.start_step = 0  # a checkpoint written inside an epoch: the steps of start_epoch already done
        self.resume_partial: list[dict] | None = None  # ...and each process's state at that step
        self.history: list[dict] = []
        self.checkpoint_path = output / "checkpoint.pt"
        self.every_steps, self.every_s = checkpoint_interval(cfg.engine.checkpoint_every)
        self.last_save = (0, time.perf_counter())  # (global step, time) of the last checkpoint

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self, epochs_done: int, step: int = 0, partial: list[dict] | None = None) -> dict:
        """The run at position (``epochs_done``, ``step``): ``step`` steps of the next epoch are done,
        and ``partial`` holds each process's state inside it (see :meth:`partial_state`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epochs_done,
            "step": step,
            "partial": partial,
            "num_updates": self.num_updates,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "config": to_dict(self.cfg),
            "spec": self.model.spec.to_json(),
            "history": self.history,
            "budget_plan": self.budget.state_dict() if self.budget is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        check_finite_state(state["epoch"], self.model)  # a checkpoint written before the guard existed
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.num_updates = state["num_updates"]
        self.start_epoch = state["epoch"]
        self.start_step = state.get("step", 0)
        self.resume_partial = state.get("partial")
        self.history = list(state["history"])
        if self.budget is not None and state.get("budget_plan") is not None:  # a budgeted run keeps its plan
            self.apply_plan(self.budget.load_state_dict(state["budget_plan"]))
        self.scheduler.step_update(self.num_updates)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        cfg, env = self.cfg, self.env
        log = MetricsLog(self.output, cfg.engine.tensorboard, self.start_epoch) if env.is_main else None
        bar = progress_bar(self.total_steps, self.start_epoch * self.steps + self.start_step, cfg.name, cfg.engine.progress and env.is_main)
        epoch = self.start_epoch
        signals.clear()
        self.last_save = (self.start_epoch * self.steps + self.start_step, time.perf_counter())
        try:
            with signals.deferred():  # a signal ends the run at a step boundary, with a checkpoint
                self.fit_epochs(epoch, bar, log)
        finally:
            bar.close()
            if log is not None:
                log.close()
        if env.is_main:
            export_model(self.model, self.output / "model.safetensors")
            if self.ema is not None:
                export_model(self.ema.module, self.output / "model_ema.safetensors")
        return self.history

    def fit_epochs(self, epoch: int, bar, log: MetricsLog | None) -> None:
        cfg, env = self.cfg, self.env
        while epoch * self.steps < self.total_steps:  # a budgeted schedule may end inside an epoch
            epoch_began = time.perf_counter()
            bar.set_description_str(f"{cfg.name} {epoch + 1}/{self.epochs}")
            row = {"epoch": epoch + 1, **self.train_epoch(epoch, bar)}
            # Nothing non-finite is ever saved: the previous checkpoint stays the last good one.
            check_finite_state(epoch, self.model, self.objective, self.ema)
            last = (epoch + 1) * self.steps >= self.total_steps
            eval_s = None
            if (epoch + 1) % cfg.engine.eval_every == 0 or last:
                began = time.perf_counter()
                row.update(self.evaluate_all())
                eval_s = time.perf_counter() - began
            self.history.append(row)
            if env.is_main:
                save_atomic(self.state_dict(epoch + 1), self.checkpoint_path)
                log.write(self.history)
                bar.write(epoch_line(row, self.epochs))
            barrier(env)
            self.last_save = ((epoch + 1) * self.steps, time.perf_counter())
            if self.budget is not None and not last:
                epoch_s = time.perf_counter() - epoch_began
                plan = self.budget.end_epoch((epoch + 1) * self.steps, row["train_steps"], row["train_time_s"], eval_s, epoch_s)
                if plan is not None:
                    self.apply_plan(plan, bar)
                    if env.is_main:  # the plan is saved with the epoch: a resumed run keeps it
                        save_atomic(self.state_dict(epoch + 1), self.checkpoint_path)
                    barrier(env)
            if not last and (signum := self.poll(due=False)[0]):
                raise Preempted(signum, self.checkpoint_path, f"after epoch {epoch + 1}")
            epoch += 1

    @property
    def epochs(self) -> int:
        """Epochs of the schedule (with a budget: as planned; the last may be partial)."""
        return -(-self.total_steps // self.steps)

    # ---------------------------------------------------------------- time budget (engine.budget plans)
    def probe_costs(self, epoch: int) -> tuple[float, float]:
        """Seconds of one evaluation and one checkpoint write, measured twice each (the first
        includes one-time costs: compiling the evaluation graph, cuDNN autotuning)."""
        evals, checkpoints = [], [0.0]
        for _ in range(2):
            began = time.perf_counter()
            self.evaluate_all()
            evals.append(time.perf_counter() - began)
            if self.env.is_main:
                probe = self.output / "checkpoint.probe"
                began = time.perf_counter()
                save_atomic(self.state_dict(epoch), probe)
                checkpoints.append(time.perf_counter() - began)
                probe.unlink(missing_ok=True)
        self.step_module.train()
        return evals[-1], checkpoints[-1]

    def apply_plan(self, plan: BudgetPlan, bar=None) -> None:
        """Train for the plan's number of steps: the schedule's length, its cosine, the progress bar."""
        self.total_steps = plan.total_steps
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.steps, total_steps=plan.total_steps)
        self.scheduler.step_update(self.num_updates)
        if bar is not None:
            bar.total = plan.total_steps
            bar.refresh()

    def train_epoch(self, epoch: int, bar) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        self.step_module.train()
        # Dropout / drop-path draw from torch's global generator: seed it per epoch so a
        # resumed run continues exactly like an uninterrupted one.
        torch.manual_seed(derive_seed(cfg.seed, epoch, env.rank, "torch"))
        batches = train_batches(
            len(self.train_views.source), cfg.optim.batch_size, self.train_views.rng, epoch, env.rank, env.world, cfg.augment.repeats
        )
        sums: dict[str, torch.Tensor] = {}
        images, updates = 0, 0
        guard = self.guard
        guard.start_epoch()
        start = time.perf_counter()
        first = epoch * self.steps
        step_count = 0
        begin = 0
        if self.resume_partial is not None and epoch == self.start_epoch and self.start_step > 0:
            # Inside the epoch: the same batches from the saved step on, this process's generator
            # and partial sums as they were (see partial_state).
            begin = self.start_step
            mine = self.resume_partial[env.rank] if len(self.resume_partial) == env.world else None
            if mine is None:  # another number of processes: their generators cannot be matched
                torch.manual_seed(derive_seed(cfg.seed, epoch, begin, env.rank, "torch"))
            else:
                torch.set_rng_state(mine["rng"])
                if mine.get("cuda_rng") is not None and env.device.type == "cuda":
                    torch.cuda.set_rng_state(mine["cuda_rng"], env.device)
                sums = {k: v.to(env.device) for k, v in mine["sums"].items()}
                images, updates, step_count, guard.skipped = mine["images"], mine["updates"], mine["step_count"], mine["skipped"]
                start -= mine["elapsed"]
            self.resume_partial = None
        for step, batch in enumerate(self.train_views.train_batches(batches[begin:], epoch), start=begin):
            if first + step >= self.total_steps:
                break
            step_count += 1
            result = self.train_step(batch, epoch, step)
            images += len(batch)
            bar.update(1)
            if result is not None:  # None: a skipped update (engine.nan_policy=skip_step)
                loss, parts = result
                guard.record(loss, step)
                for key, value in {"loss": loss, **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value.float()
                updates += 1
            if self.budget is not None and (plan := self.budget.after_step(first + step + 1)) is not None:
                self.apply_plan(plan, bar)
            last_step = step == len(batches) - 1 or first + step + 1 >= self.total_steps
            if step % 25 == 0 or last_step:
                guard.check(epoch)  # reads the device-side flag where the loop synchronises anyway
                if self.budget is not None and self.budget.out_of_time():
                    self.total_steps = first + step + 1  # the rate did not hold: end the schedule here
                rate = images * env.world / max(time.perf_counter() - start, 1e-9)
                mean = float(sums["loss"]) / max(updates, 1) if sums else float("nan")
                bar.set_postfix_str(f"loss {mean:.4f}  lr {self.lr:.2e}  {rate:,.0f} img/s")
            if not last_step and first + step + 1 < self.total_steps:
                signum, due = self.poll(due=self.checkpoint_due(first + step + 1))
                if signum or due:
                    partial = {
                        "sums": sums,
                        "images": images,
                        "updates": updates,
                        "step_count": step_count,
                        "skipped": guard.skipped,
                        "elapsed": time.perf_counter() - start,
                    }
                    self.save_inside(epoch, step + 1, partial)
                if signum:
                    raise Preempted(signum, self.checkpoint_path, f"epoch {epoch + 1}, step {step + 1}/{self.steps}")
        sync_device(env.device)
        elapsed = time.perf_counter() - start
        names = list(sums)
        means = all_reduce_sum(torch.stack([sums[k] for k in names]), env) / (max(updates, 1) * env.world) if names else torch.zeros(0)
        stats = {f"train_{k}": v for k, v in zip(names, means.tolist())}
        stats.update(lr=self.lr, train_time_s=elapsed, train_img_per_s=images * env.world / elapsed, train_steps=step_count)
        if cfg.engine.nan_policy == "skip_step":
            stats["train_skipped_steps"] = guard.skipped
        return stats

    # ---------------------------------------------------------------- checkpoints inside epochs, signals
    def checkpoint_due(self, global_step: int) -> bool:
        """``engine.checkpoint_every`` has passed since the last checkpoint (in steps or seconds)."""
        steps, seconds = self.every_steps, self.every_s
        if steps is not None and global_step - self.last_save[0] >= steps:
            return True
        return seconds is not None and time.perf_counter() - self.last_save[1] >= seconds

    def poll(self, due: bool) -> tuple[int, bool]:
        """(the pending signal or 0, whether a checkpoint is due), agreed by all processes: a
        signal or a clock seen by one process stops or saves them all at the same step. With
        several processes this is one small all-reduce per step."""
        signum = signals.pending() or 0
        if self.env.world == 1:
            return signum, due
        flags = torch.tensor([signum, int(due)], dtype=torch.int64, device=self.env.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, due = (int(v) for v in flags.tolist())
        return signum, bool(due)

    def save_inside(self, epoch: int, step: int, partial: dict) -> None:
        """A checkpoint at ``step`` steps into ``epoch``: the run's state plus each process's
        generator and partial sums (gathered to the main process). Nothing non-finite is saved."""
        self.guard.check(epoch)
        check_finite_state(epoch, self.model, self.objective, self.ema)
        mine = {
            **partial,
            "sums": {k: v.detach().cpu() for k, v in partial["sums"].items()},
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.env.device) if self.env.device.type == "cuda" else None,
        }
        every: list = [mine]
        if self.env.world > 1:
            every = [None] * self.env.world
            dist.all_gather_object(every, mine)
        if self.env.is_main:
            save_atomic(self.state_dict(epoch, step, every), self.checkpoint_path)
        barrier(self.env)
        self.last_save = (epoch * self.steps + step, time.perf_counter())

    def train_step(self, batch: ViewBatch, epoch: int = 0, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """One update on one batch of views: teacher, forward, objective, backward, step, EMA.
        Returns the (detached) total loss and each term's value, or None when the update was
        skipped for a non-finite loss or gradient (``engine.nan_policy: skip_step``)."""
        cfg = self.cfg
        with autocast(self.env.device, cfg.engine.precision):
            prediction = self.teacher(batch) if self.teacher is not None else None
            loss, parts = self.ddp(batch, prediction)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.engine.nan_policy == "skip_step":
            max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad is not None else math.inf
            norm = nn.utils.clip_grad_norm_(self.step_module.parameters(), max_norm)
            if self.guard.skip_update(loss, norm, epoch, step):
                self.optimizer.zero_grad(set_to_none=True)
                return None
        elif cfg.optim.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.step_module.parameters(), cfg.optim.clip_grad)
        self.optimizer.step()
        self.num_updates += 1
        self.scheduler.step_update(self.num_updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)
        return loss.detach(), parts

    @property
    def lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def evaluate_all(self) -> dict[str, float]:
        engine = self.cfg.engine
        batch_size = engine.eval_batch_size or self.cfg.optim.batch_size // self.env.world
        row = {f"eval_{k}": v for k, v in evaluate(self.net, self.eval_views, batch_size, self.env, engine.precision).items()}
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.eval_views, batch_size, self.env, engine.precision)
            row.update({f"ema_{k}": v for k, v in ema.items()})
        return row


def checkpoint_interval(every: str | int | None) -> tuple[int | None, float | None]:
    """``engine.checkpoint_every`` as (steps, seconds): an integer is steps, a time (``20m``) seconds."""
    if every is None:
        return None, None
    if isinstance(every, int) or (isinstance(every, str) and every.strip().isdigit()):
        return int(every), None
    return None, parse_duration(every, "engine.checkpoint_every")


def epoch_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if "eval_top1" in row:
        heads = [f"{h} {row[f'eval_top1_{h}']:.2f}" for h in ("cls", "dist") if f"eval_top1_{h}" in row]
        parts.append(f"eval top1 {row['eval_top1']:.2f}" + (f" ({', '.join(heads)})" if heads else ""))  # of the evaluation split
    if "ema_top1" in row:
        parts.append(f"ema eval top1 {row['ema_top1']:.2f}")
    parts.append(f"{row['train_img_per_s']:,.0f} img/s")
    parts.append(format_duration(row["train_time_s"]))
    return "  ".join(parts)
