"""A finished run read back: its trained model (from the run folder, its ``checkpoint.pt`` or an
export) with the recipe it was trained with, and the data section an evaluation or an analysis
uses. What evaluates or analyses a run imports this, never the runner."""

from __future__ import annotations

from pathlib import Path

from .config import DataConfig
from .config.parsing import apply_override, parse_dataclass
from .engine.checkpoint import load_checkpoint
from .errors import UserError
from .models import ModelSpec, VisionModel, load_model
from .models.network import create_backbone


def load_trained(path: str | Path) -> tuple[VisionModel, dict | None]:
    """A trained model from an export (``.safetensors``), a run folder or a ``checkpoint.pt``,
    and the recipe it was trained with when known."""
    path = Path(path)
    if path.suffix == ".pt" and path.is_file():
        state = load_checkpoint(path)
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


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face dataset on disk: a saved ``DatasetDict`` or a folder of parquet files."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or next(path.rglob("*.parquet"), None) is not None)


def data_config_for(recipe: dict | None, data: str | None, overrides: list[str]) -> DataConfig:
    """The run's data section, replaced by ``--data`` (a source name or a folder/archive)."""
    raw = dict((recipe or {}).get("data") or {})
    if data in ("digits", "cifar10", "cifar100"):
        raw = {"source": data}
    elif data is not None:
        # another folder of the same kind of data: the run's split names (and HF columns) still apply
        kept = {
            k: raw[k]
            for k in ("train_split", "eval_split", "image_column", "label_column", "source_size", "max_aspect", "cache_dir")
            if k in raw
        }
        raw = {**kept, "source": "hf" if is_hf_folder(Path(data)) else "imagefolder", "root": data}
    tree = {"data": raw}
    for item in overrides:
        apply_override(tree, item if item.startswith("data.") else f"data.{item}")
    if not tree["data"]:
        raise UserError("eval: no data: pass --data (digits, cifar10, cifar100, or an ImageFolder folder/archive)")
    return parse_dataclass(DataConfig, tree["data"], "data")
