"""Build a run from its recipe and execute it; evaluate a trained model. The Python API."""

from __future__ import annotations

import errno
import io
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_text_atomic
from .augment import Augmenter
from .config import RunConfig, dump_config, to_dict
from .config.paths import absolute_paths_in, with_absolute_paths
from .data import ImageSource, open_source, open_splits, peek_classes
from .data.decoded import display_name
from .device import DistEnv, setup_distributed
from .engine import Trainer, evaluate
from .engine.checkpoint import load_checkpoint
from .engine.curves import write_run_curves
from .engine.metrics import format_summary
from .errors import ConfigError, UserError
from .formatting import format_duration
from .inference import open_predictor
from .lock import folder_lock
from .models import VisionModel, build_model
from .models.network import check_input_size
from .objective import Objective
from .rng import derive_seed
from .run_folder import data_config_for
from .signals import handle_signals
from .targets import SOURCES, Request, TeacherSource, source_class

# Keys that may change when a run is resumed (everything else must match the checkpoint).
RESUMABLE_CHANGES = ("optim.epochs", "engine.", "output")


@dataclass
class RunResult:
    output: Path
    history: list[dict]
    wall_time_s: float
    parameters: int  # trainable parameters of the model

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_batch_size(batch_size: int, images: int, world: int) -> None:
    """A global batch that no epoch can fill is refused before anything is written."""
    if batch_size % world:
        raise ConfigError("optim.batch_size", f"{batch_size} is not divisible by the {world} processes")
    if images < batch_size:
        raise ConfigError(
            "optim.batch_size", f"{batch_size} is larger than the {images:,} training images (the last partial batch is dropped)"
        )


def check_resume_compatible(saved: dict, current: RunConfig) -> None:
    old, new = _flatten(absolute_paths_in(saved)), _flatten(to_dict(with_absolute_paths(current)))
    defaults = _flatten(to_dict(RunConfig()))
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # a key newer than the checkpoint, at its default: the run it describes is the same
        if old.get(key) != new.get(key):
            raise UserError(
                f"--resume: {key} was {old.get(key)!r} in the checkpoint but is {new.get(key)!r} now; resume with the same recipe"
            )


def check_resume_progress(state: dict, cfg: RunConfig) -> None:
    """What ``--resume`` may change (``optim.epochs``, ``engine.*``) still describes the run that was
    trained: fewer epochs than are complete would leave a checkpoint, weights and history of a
    longer run under a config.yaml that says otherwise; EMA weights cannot start in the middle of
    a run (the average would cover the resumed epochs only)."""
    done = int(state["epoch"])
    if state.get("budget_plan") is None and cfg.optim.epochs < done:
        raise UserError(
            f"--resume: optim.epochs={cfg.optim.epochs} but {done} epochs are already complete; "
            f"resume with optim.epochs >= {done}, or train a new run (output=...)"
        )
    if cfg.engine.ema_decay is not None and state.get("ema") is None:
        raise UserError(
            f"--resume: engine.ema_decay={cfg.engine.ema_decay} is new: the checkpoint has no EMA weights (trained without EMA), "
            "and an average started now would cover the resumed epochs only; train a new run with engine.ema_decay set"
        )


def check_writable(folder: Path, key: str = "output") -> None:
    """``folder`` (or the nearest folder above it that exists, where it will be made) takes new
    files: a read-only disk or a folder without write permission is found before the data is
    decoded. The probe file is removed; nothing else is created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vitdistill-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reasons = {errno.EROFS: "is on a read-only file system", errno.ENOSPC: "is on a full disk"}
        why = reasons.get(err.errno or 0, "cannot be written")
        raise UserError(f"{key}: {folder} {why} ({err.strerror or err}); choose another output folder") from None


def check_before_data(cfg: RunConfig) -> None:
    """Everything of a run that does not need the images, checked before any is read or decoded
    (decoding ImageNet takes hours): the output folder is writable, the model builds from
    ``model.*`` and takes ``augment.input_size``, the objective builds for it, and the teacher's
    files exist, with its class count and input size checked when the data's classes are known
    from folder names alone (:func:`vitdistill.data.peek_classes`)."""
    check_writable(Path(cfg.output_dir))
    classes = peek_classes(cfg.data)
    count = len(classes) if classes else 2  # unknown yet: any count builds the same architecture
    model = build_model(cfg.model, count, classes=classes, input_size=cfg.augment.input_size, mean=cfg.data.mean, std=cfg.data.std)
    check_input_size(
        model.backbone, cfg.augment.input_size, "augment.input_size", cfg.model.name, f"set model.img_size={cfg.augment.input_size}"
    )
    objective = Objective(cfg.objective, count, model.has_dist_head)
    if objective.needs_token_logits and not model.has_token_logits:
        raise ConfigError(
            "model.token_head",
            f"the objective classifies every patch token: set model.token_head: true ({cfg.model.name} has no per-token head)",
        )
    if not objective.needs_teacher or cfg.teacher is None:
        return
    for key in sorted({key for kind in SOURCES.values() for key in kind.path_keys}):
        value = getattr(cfg.teacher, key, None)
        if value is not None and not Path(value).expanduser().exists():
            raise UserError(f"teacher.{key}: {value} does not exist")
    if classes is not None:
        request = Request(classes=objective.needs_teacher_classes, features=objective.needs_teacher_features)
        source_class(cfg.teacher).check_classes(cfg, classes, request)


def build_trainer(cfg: RunConfig, env: DistEnv, output: Path, clock_start: float | None = None) -> Trainer:
    """Everything a run needs, from its recipe: data, views, model, teacher, objective."""
    train_src, eval_src = open_splits(cfg.data)
    check_batch_size(cfg.optim.batch_size, len(train_src), env.world)
    mean, std = cfg.data.mean, cfg.data.std
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # same seed, same initial weights
    model = build_model(cfg.model, train_src.num_classes, classes=train_src.classes, input_size=cfg.augment.input_size, mean=mean, std=std)
    check_input_size(
        model.backbone, cfg.augment.input_size, "augment.input_size", cfg.model.name, f"set model.img_size={cfg.augment.input_size}"
    )
    objective = Objective(cfg.objective, train_src.num_classes, model.has_dist_head)
    model.capture(objective.needed_blocks)
    if objective.needs_token_logits and not model.has_token_logits:
        raise ConfigError(
            "model.token_head",
            f"the objective classifies every patch token: set model.token_head: true ({cfg.model.name} has no per-token head)",
        )
    teacher = build_targets(cfg, model, train_src, env, objective) if objective.needs_teacher else None
    objective.setup(model, cfg.seed, teacher)  # terms size their own parameters (a projector) from the teacher
    augment_device = torch.device("cpu") if cfg.data.augment_device == "cpu" else None
    train_views, eval_views = (
        Augmenter(
            src,
            cfg.augment,
            cfg.seed,
            mean,
            std,
            env.device,
            placement=cfg.data.placement,
            workers=cfg.data.workers,
            augment_device=augment_device,
        )
        for src in (train_src, eval_src)
    )
    return Trainer(cfg, model, objective, train_views, eval_views, teacher, env, output, clock_start)


def build_targets(
    cfg: RunConfig, model: VisionModel, source: ImageSource, env: DistEnv, objective: Objective | None = None
) -> TeacherSource:
    """The teacher source the recipe names (online, a store, label maps, or any registered kind),
    asked for feature maps when the ``objective`` reads them and for the data's classes unless
    it reads only those."""
    assert cfg.teacher is not None  # the schema guarantees it
    features = objective is not None and objective.needs_teacher_features
    classes = objective is None or objective.needs_teacher_classes
    request = Request(classes=classes, features=features, token_grid=model.token_grid)
    return source_class(cfg.teacher).build(cfg, source, request, env.device)


def train(cfg: RunConfig, resume: bool | str = False) -> RunResult:
    """Train the recipe's model; with ``resume`` continue from ``<output>/checkpoint.pt`` (which
    must exist); with ``resume="auto"`` continue when it exists and start otherwise (one command
    for a job's first start and every requeue).

    One run per output folder (a lock, see :mod:`vitdistill.lock`). SIGTERM, SIGUSR1 and SIGINT
    end the run at a step boundary with a checkpoint (:class:`vitdistill.signals.Preempted`)."""
    if resume not in (True, False, "auto"):
        raise UserError(f"--resume: expected nothing or 'auto', got {resume!r}")
    with handle_signals():
        env = setup_distributed(cfg.engine.device)
        output = Path(cfg.output_dir)
        with folder_lock(output, "run") if env.is_main else nullcontext():
            return _train(cfg, resume, env, output)


def _train(cfg: RunConfig, resume: bool | str, env: DistEnv, output: Path) -> RunResult:
    checkpoint = output / "checkpoint.pt"
    if resume == "auto":
        resume = checkpoint.is_file()
    if resume and not checkpoint.is_file():
        raise UserError(f"--resume: {checkpoint} does not exist")
    if not resume and checkpoint.is_file():
        raise UserError(f"{output} already holds a run; pass --resume to continue it, or set output=... for a new one")
    cfg = with_absolute_paths(cfg)
    state = None
    if resume:  # refuse a changed recipe before spending time on the data
        state = load_checkpoint(checkpoint)
        check_resume_compatible(state["config"], cfg)
        check_resume_progress(state, cfg)
    check_before_data(cfg)  # seconds at most: before the budget's clock, which plans from the data's decoding on
    start = time.perf_counter()  # a time budget counts from here: data, model, compilation included
    trainer = build_trainer(cfg, env, output, start)
    if state is not None:
        trainer.load_state_dict(state)
    source = trainer.train_views.source
    if env.is_main:
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "config.yaml", dump_config(cfg))
    with logged_stdout(output / "run.log" if env.is_main else None):
        if env.is_main:
            print(f"vitdistill: {cfg.name}: {describe_source(source)} -> {output}")
            if state is not None:
                at = (
                    f"in epoch {state['epoch'] + 1} at step {state['step']}/{trainer.steps}"
                    if state.get("step")
                    else f"after epoch {state['epoch']}"
                )
                print(f"vitdistill: resuming from {checkpoint} {at}")
            for line in describe_skipped(source, trainer.eval_views.source):
                print(f"vitdistill: {line}")
        history = trainer.fit()
        wall = time.perf_counter() - start
        if env.is_main:
            write_summary(cfg, output, history, wall, skipped_files(source, trainer.eval_views.source), budget_report(trainer, wall))
            write_run_curves(output, history, cfg.name)  # curves.png
    parameters = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return RunResult(output=output, history=history, wall_time_s=wall, parameters=parameters)


class _Tee(io.TextIOBase):
    """Writes to the terminal's stream and to a log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()  # a run killed later keeps what it printed
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


@contextmanager
def logged_stdout(path: Path | None):
    """What the run prints on standard output also goes to ``path`` (``run.log`` in the run
    folder, appended to by a resumed run); nothing when None (ranks other than 0)."""
    if path is None:
        yield
        return
    with open(path, "a") as log:
        original = sys.stdout
        sys.stdout = _Tee(original, log)
        try:
            yield
        finally:
            sys.stdout = original


def budget_report(trainer: Trainer, wall: float) -> dict | None:
    """A budgeted run's plan next to what happened (wall time of this process's part)."""
    clock = trainer.budget
    if clock is None or clock.plan is None:
        return None
    return {**clock.plan.to_dict(), "actual_s": wall, "cut_short": clock.cut_short, "steps_done": trainer.total_steps}


def write_summary(
    cfg: RunConfig, output: Path, history: list[dict], wall: float, skipped: dict | None = None, budget: dict | None = None
) -> None:
    final = history[-1] if history else {}
    rates = [row["train_img_per_s"] for row in history if "train_img_per_s" in row]
    summary = {
        "name": cfg.name,
        "epochs": len(history),
        "wall_time_s": wall,
        "train_img_per_s": sum(rates) / len(rates) if rates else None,
        "final": final,
        "model": str(output / "model.safetensors"),
        "skipped_files": skipped or {},
    }
    if budget is not None:
        summary["budget"] = budget
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nvitdistill: {cfg.name} finished in {format_duration(wall)}; weights in {output / 'model.safetensors'}")
    if budget is not None:
        missing = budget["total_steps"] - budget["steps_done"]
        note = (
            f", cut short by {missing:,} of {budget['total_steps']:,} steps: the measured rate did not hold" if budget["cut_short"] else ""
        )
        print(
            f"vitdistill: budget {format_duration(budget['budget_s'])}: planned end {format_duration(budget['planned_end_s'])}, "
            f"actual {format_duration(wall)}{note}"
        )
    print(format_summary(history))


# ---------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    split: str | None = None,
    overrides: list[str] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    ignore_class_names: bool = False,
) -> dict:
    """Top-1/top-5 of a trained model (a run, a timm export or an ONNX export) on a split (default:
    the run's evaluation split). The data's class names must be the model's (``ignore_class_names``:
    compare by position only)."""
    env = setup_distributed(device)
    predictor = open_predictor(path, env.device)
    data_cfg = data_config_for(predictor.recipe, data, list(overrides or []))
    source = open_source(data_cfg, split or data_cfg.eval_split, data_cfg.eval_limit)
    if predictor.has_class_names and not ignore_class_names:
        check_class_names(predictor.classes, source.classes, source.name)
    if predictor.num_classes != source.num_classes:
        raise UserError(f"eval: the model predicts {predictor.num_classes} classes but {source.name} has {source.num_classes}")
    views = Augmenter(source, predictor.augment_config(), 0, predictor.mean, predictor.std, env.device)
    metrics = evaluate(predictor.module, views, batch_size, env, show_progress=True)
    name = predictor.module.spec.name if isinstance(predictor.module, VisionModel) else predictor.kind
    return {"checkpoint": str(path), "model": name, "data": source.name, "images": len(source), **metrics}


def check_class_names(model_classes: list[str], data_classes: list[str], data_name: str) -> None:
    """The data's classes are the model's, in the same order; else one line naming the difference."""
    if model_classes == data_classes:
        return
    missing = [c for c in model_classes if c not in data_classes]
    extra = [c for c in data_classes if c not in model_classes]
    show = lambda names: ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")  # noqa: E731
    parts = ([f"the model's {show(missing)} not in the data"] if missing else []) + (
        [f"the data's {show(extra)} unknown to the model"] if extra else []
    )
    if not parts:
        moved = [c for i, c in enumerate(data_classes) if model_classes[i] != c]
        parts = [f"same names in another order ({show(moved)} moved)"]
    raise UserError(
        f"eval: the classes of {data_name} are not the model's: {'; '.join(parts)} "
        "(pass --ignore-class-names to compare class by position anyway)"
    )


def skipped_files(*sources: ImageSource) -> dict:
    """Files left out of each split (not images, or undecodable with ``data.on_corrupt=skip``)."""
    return {src.name: src.skipped for src in sources if src.skipped}


SKIP_REASONS = {
    "not_image": "files that are not images",
    "corrupt": "images that cannot be decoded (data.on_corrupt=skip)",
    "broken_link": "symbolic links that lead nowhere (dangling or a loop)",
}


def describe_skipped(*sources: ImageSource) -> list[str]:
    """One line per split and reason: how many files were left out, with an example."""
    return [
        f"{src.name}: left out {len(files):,} {SKIP_REASONS.get(reason, reason)}, e.g. {display_name(files[0])}"
        for src in sources
        for reason, files in src.skipped.items()
        if files
    ]


def describe_source(source: ImageSource) -> str:
    h, w = source.image_size
    return f"{source.name}: {len(source):,} images {w}x{h}, {source.num_classes} classes"
