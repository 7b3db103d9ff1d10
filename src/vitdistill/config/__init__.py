"""Recipes: packaged YAML files (or a user's) plus dotted overrides, parsed into RunConfig.

:func:`parse_config` checks what the schema alone can check (types, unknown keys, value
ranges). Loading a recipe for a run also checks it against the registries above this layer
(objective terms, models, optimizers, RandAugment): that is :func:`vitdistill.validate.load_recipe`
(also ``vitdistill.load_recipe``).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import yaml

from ..errors import UserError
from .parsing import apply_override, parse_dataclass, to_dict
from .schema import (
    AugmentConfig,
    DataConfig,
    EngineConfig,
    LabelMapConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    StoreConfig,
    TeacherConfig,
)

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "EngineConfig",
    "LabelMapConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "StoreConfig",
    "TeacherConfig",
    "dump_config",
    "list_recipes",
    "parse_config",
    "read_recipe",
    "to_dict",
]


def list_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    folder = resources.files("vitdistill") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


REPLACE = "_replace"  # `key: {_replace: true, ...}` in a recipe: this mapping replaces the base's instead of merging into it


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``: mappings merge key by key, anything else is replaced; a mapping
    marked ``_replace: true`` replaces the base's whole (e.g. ``model.kwargs`` of another
    architecture than the base's)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and not value.get(REPLACE) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def without_markers(tree):
    """The recipe with its ``_replace`` markers taken out (they only steer :func:`deep_merge`)."""
    if isinstance(tree, dict):
        return {k: without_markers(v) for k, v in tree.items() if k != REPLACE}
    return tree


def read_recipe(recipe: str, _seen: tuple[str, ...] = ()) -> dict:
    """The raw mapping of a packaged recipe name or a path to a YAML file.

    A recipe may start from another with ``base: <name or path>``; its keys override the
    base's (mappings merge, lists are replaced; a mapping with ``_replace: true`` replaces the
    base's mapping whole).
    """
    path = Path(recipe)
    if recipe.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {recipe} does not exist")
        text = path.read_text()
        default_name = path.stem
    else:
        packaged = resources.files("vitdistill") / "recipes" / f"{recipe}.yaml"
        if not packaged.is_file():
            raise UserError(f"unknown recipe {recipe!r}: packaged recipes are {', '.join(list_recipes())}; or give a path to a .yaml file")
        text = packaged.read_text()
        default_name = recipe
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {recipe} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {recipe} must be a mapping at the top level")
    base = raw.pop("base", None)
    if base is not None:
        if base in _seen:
            raise UserError(f"recipe {recipe}: its bases form a cycle ({' -> '.join(_seen + (base,))})")
        parent = read_recipe(str(base), _seen + (recipe,))
        parent.pop("name", None)
        raw = deep_merge(parent, raw)
    raw.setdefault("name", default_name)
    return raw if _seen else without_markers(raw)


def parse_config(raw: dict, overrides: Iterable[str] = ()) -> RunConfig:
    """A raw recipe mapping (after applying ``key=value`` overrides) as a :class:`RunConfig`,
    with the schema's own checks; :func:`vitdistill.validate.config_from_dict` adds the rest."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types
    for item in overrides:
        apply_override(raw, item)
    return parse_dataclass(RunConfig, raw)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
