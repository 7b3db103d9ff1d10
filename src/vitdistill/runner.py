"""Build a run from its recipe and execute it; evaluate a trained model. The Python API."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .augment import Augmenter
from .config import AugmentConfig, DataConfig, RunConfig, dump_config, to_dict
from .config.parsing import apply_override, parse_dataclass
from .data import ImageSource, open_source, open_splits
from .engine import Trainer, evaluate, setup_distributed
from .engine.checkpoint import load_checkpoint
from .engine.distributed import DistEnv
from .engine.metrics import format_duration, format_summary
from .errors import ConfigError, UserError
from .models import ModelSpec, VisionModel, build_model, load_model
from .models.network import create_backbone
from .objective import Objective
from .rng import derive_seed
from .labelmaps import LabelMapTargets
from .store import StoreTargets
from .targets import build_online_teacher

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


def check_resume_compatible(saved: dict, current: RunConfig) -> None:
    old, new = _flatten(saved), _flatten(to_dict(current))
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if old.get(key) != new.get(key):
            raise UserError(f"--resume: {key} was {old.get(key)!r} in the checkpoint but is {new.get(key)!r} now; resume with the same recipe")


def build_trainer(cfg: RunConfig, env: DistEnv, output: Path) -> Trainer:
    """Everything a run needs, from its recipe: data, views, model, teacher, objective."""
    train_src, eval_src = open_splits(cfg.data)
    mean, std = cfg.data.mean, cfg.data.std
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # same seed, same initial weights
    model = build_model(cfg.model, train_src.num_classes, classes=train_src.classes, input_size=cfg.augment.input_size, mean=mean, std=std)
    objective = Objective(cfg.objective, train_src.num_classes, model.has_dist_head)
    model.capture(objective.needed_blocks)
    if objective.needs_token_logits and not model.has_token_logits:
        raise ConfigError("model.token_head", f"the objective classifies every patch token: set model.token_head: true ({cfg.model.name} has no per-token head)")
    teacher = build_targets(cfg, model, train_src, env, objective) if objective.needs_teacher else None
    objective.setup(model, cfg.seed, teacher)  # terms size their own parameters (a projector) from the teacher
    augment_device = torch.device("cpu") if cfg.data.augment_device == "cpu" else None
    placement = dict(placement=cfg.data.placement, workers=cfg.data.workers, augment_device=augment_device)
    train_views = Augmenter(train_src, cfg.augment, cfg.seed, mean, std, env.device, **placement)
    eval_views = Augmenter(eval_src, cfg.augment, cfg.seed, mean, std, env.device, **placement)
    return Trainer(cfg, model, objective, train_views, eval_views, teacher, env, output)


def build_targets(cfg: RunConfig, model: VisionModel, source: ImageSource, env: DistEnv, objective: Objective | None = None):
    """The teacher's answers, in the form the recipe names: label maps, a store, or online (with
    feature maps when the ``objective`` reads them; with classes unless it reads only those)."""
    assert cfg.teacher is not None  # the schema guarantees it
    features = objective is not None and objective.needs_teacher_features
    if features and (cfg.teacher.label_maps is not None or cfg.teacher.store is not None):
        which = "teacher.label_maps" if cfg.teacher.label_maps is not None else "teacher.store"
        raise UserError(f"{which}: the objective distils feature maps, which only an online teacher gives (teacher.checkpoint or teacher.name)")
    if cfg.teacher.label_maps is not None:
        if model.token_grid is None:
            raise UserError(f"teacher.label_maps: token targets need a vision transformer; {cfg.model.name} has no patch grid")
        return LabelMapTargets(cfg.teacher.label_maps, cfg, source, model.token_grid, env.device)
    if cfg.teacher.store is not None:
        return StoreTargets(cfg.teacher.store, cfg, source, env.device)
    classes = objective is None or objective.needs_teacher_classes
    return build_online_teacher(cfg.teacher, source, cfg.data.mean, cfg.data.std, classes=classes, features=features).to(env.device)


def train(cfg: RunConfig, resume: bool = False) -> RunResult:
    """Train the recipe's model; with ``resume`` continue from ``<output>/checkpoint.pt``."""
    env = setup_distributed(cfg.engine.device)
    output = Path(cfg.output_dir)
    checkpoint = output / "checkpoint.pt"
    if resume and not checkpoint.is_file():
        raise UserError(f"--resume: {checkpoint} does not exist")
    if not resume and checkpoint.is_file():
        raise UserError(f"{output} already holds a run; pass --resume to continue it, or set output=... for a new one")
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    trainer = build_trainer(cfg, env, output)
    if resume:
        state = load_checkpoint(checkpoint)
        check_resume_compatible(state["config"], cfg)
        trainer.load_state_dict(state)
    if env.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(dump_config(cfg))
        print(f"vitdistill: {cfg.name}: {describe_source(trainer.train_views.source)} -> {output}")
    history = trainer.fit()
    wall = time.perf_counter() - start
    if env.is_main:
        write_summary(cfg, output, history, wall)
    parameters = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return RunResult(output=output, history=history, wall_time_s=wall, parameters=parameters)


def write_summary(cfg: RunConfig, output: Path, history: list[dict], wall: float) -> None:
    final = history[-1] if history else {}
    rates = [row["train_img_per_s"] for row in history if "train_img_per_s" in row]
    summary = {
        "name": cfg.name,
        "epochs": len(history),
        "wall_time_s": wall,
        "train_img_per_s": sum(rates) / len(rates) if rates else None,
        "final": final,
        "model": str(output / "model.safetensors"),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nvitdistill: {cfg.name} finished in {format_duration(wall)}; weights in {output / 'model.safetensors'}")
    print(format_summary(history))


# ---------------------------------------------------------------------------- evaluation
def load_trained(path: str | Path) -> tuple[VisionModel, dict | None]:
    """A trained model from an export (``.safetensors``), a run folder or a ``checkpoint.pt``,
    and the recipe it was trained with when known."""
    path = Path(path)
    if path.suffix == ".pt" and path.is_file():
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            raise UserError(str(err)) from None
        spec = ModelSpec.from_json(state["spec"])
        model = VisionModel(create_backbone(spec), spec)
        model.load_state_dict(state["model"])
        return model.eval(), state["config"]
    model = load_model(path)
    folder = path if path.is_dir() else path.parent
    recipe = folder / "config.yaml"
    if recipe.is_file():
        import yaml

        return model, yaml.safe_load(recipe.read_text())
    return model, None


def data_config_for(recipe: dict | None, data: str | None, overrides: list[str]) -> DataConfig:
    """The run's data section, replaced by ``--data`` (a source name or a folder/archive)."""
    raw = dict((recipe or {}).get("data") or {})
    if data in ("digits", "cifar10", "cifar100"):
        raw = {"source": data}
    elif data is not None:
        raw = {"source": "imagefolder", "root": data}
    tree = {"data": raw}
    for item in overrides:
        apply_override(tree, item if item.startswith("data.") else f"data.{item}")
    if not tree["data"]:
        raise UserError("eval: no data: pass --data (digits, cifar10, cifar100, or an ImageFolder folder/archive)")
    return parse_dataclass(DataConfig, tree["data"], "data")


def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    split: str | None = None,
    overrides: list[str] | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> dict:
    """Top-1/top-5 of a trained model on a split (default: the run's evaluation split)."""
    model, recipe = load_trained(path)
    data_cfg = data_config_for(recipe, data, list(overrides or []))
    source = open_source(data_cfg, split or data_cfg.eval_split, data_cfg.eval_limit)
    spec = model.spec
    if spec.num_classes != source.num_classes:
        raise UserError(f"eval: the model predicts {spec.num_classes} classes but {source.name} has {source.num_classes}")
    env = setup_distributed(device)
    aug = parse_dataclass(AugmentConfig, (recipe or {}).get("augment") or {}, "augment")
    aug.input_size = spec.input_size or aug.input_size
    views = Augmenter(source, aug, 0, spec.mean or data_cfg.mean, spec.std or data_cfg.std, env.device)
    metrics = evaluate(model.to(env.device), views, batch_size, env, show_progress=True)
    return {"checkpoint": str(path), "model": spec.name, "data": source.name, "images": len(source), **metrics}


def describe_source(source: ImageSource) -> str:
    h, w = source.image_size
    return f"{source.name}: {len(source):,} images {w}x{h}, {source.num_classes} classes"
