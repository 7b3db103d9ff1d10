"""A recipe validated completely: the schema's own checks (:func:`vitdistill.config.parse_config`)
and those that need a registry above the config layer, each imported here from the package that
owns the registry. A recipe is therefore exactly as strict whatever was imported before it.

The checks raise :class:`vitdistill.errors.ConfigError` naming the key (one line on the command
line); ``check_objective`` also fills in every term's default parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

from .augment.randaugment import check_rand_augment
from .config import RunConfig, parse_config, read_recipe
from .engine.optim import check_optimizer
from .models.network import check_eval_head, check_model_names, check_patch_grid
from .objective.base import check_objective
from .targets.source import check_teacher

# In this order: a recipe with several mistakes reports the first one found.
RECIPE_CHECKS = (
    check_rand_augment,  # augment.rand_augment is a policy the views can run
    check_model_names,  # model.name, teacher.name: timm models (ours registered)
    check_eval_head,  # model.eval_head: lvvit_aux has a per-token head to read
    check_patch_grid,  # augment.input_size, model.img_size: whole patches (no pixel dropped)
    check_teacher,  # teacher: exactly one registered source chosen, its own keys and params valid
    check_objective,  # objective: known terms, valid parameters, a teacher when needed
    check_optimizer,  # optim.opt: an optimizer timm can build
)


def check_recipe(cfg: RunConfig) -> RunConfig:
    """Run every registry check on a parsed recipe; returns it (term defaults filled in)."""
    for check in RECIPE_CHECKS:
        check(cfg)
    return cfg


def config_from_dict(raw: dict, overrides: Iterable[str] = ()) -> RunConfig:
    """Validate a raw recipe mapping (after applying ``key=value`` overrides)."""
    return check_recipe(parse_config(raw, overrides))


def load_recipe(recipe: str, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a packaged recipe by name (``deit_tiny_cifar10``) or a YAML path, with overrides."""
    return config_from_dict(read_recipe(recipe), overrides)
