"""AdamW (or any timm optimizer) with weight-decay groups, layer-wise lr decay and warmup+cosine."""

from __future__ import annotations

import logging

from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..config import OptimConfig
from ..errors import ConfigError, UserError


def check_optimizer(cfg) -> None:
    """``optim.opt`` is an optimizer timm can build (``lookahead_`` prefixes allowed)."""
    try:
        from timm.optim import list_optimizers
    except ImportError:  # pragma: no cover - timm < 1.0.12 has no registry to ask
        return
    name = cfg.optim.opt.lower()
    if name.removeprefix("lookahead_") not in list_optimizers():
        raise ConfigError(
            "optim.opt", f"unknown optimizer {cfg.optim.opt!r} (e.g. adamw, sgd, lamb, lion; all: timm.optim.list_optimizers())"
        )


def scaled_lr(cfg: OptimConfig) -> float:
    """``lr x batch_size / lr_base_batch`` (the linear scaling rule), or ``lr`` as given."""
    return cfg.lr * cfg.batch_size / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


REL_POS_TABLE = "relative_position_bias_table"


def param_groups(backbone: nn.Module, extra: list[nn.Parameter], cfg: OptimConfig) -> list[dict]:
    """timm's groups for the backbone (no decay on norms/biases/tokens, and on relative position
    bias tables unless ``decay_rel_pos_bias``; ``lr_scale`` per block with layer decay, or each
    block's lr itself when ``layer_decay_scales_floor`` is false), plus groups for the objective's
    own parameters (e.g. a projector)."""
    no_decay = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    if cfg.decay_rel_pos_bias:
        no_decay = {n for n in no_decay if REL_POS_TABLE not in n}
    if cfg.layer_decay is not None:
        if not hasattr(backbone, "group_matcher"):
            raise UserError(f"optim.layer_decay: {type(backbone).__name__} does not define its layers (no group_matcher)")
        groups = param_groups_layer_decay(
            backbone, weight_decay=cfg.weight_decay, no_weight_decay_list=no_decay, layer_decay=cfg.layer_decay
        )
        if not cfg.layer_decay_scales_floor:
            # the group's own peak lr and no lr_scale: timm's scheduler then warms up from warmup_lr and
            # decays to min_lr, the same for every block (timm 0.4.12, the references' version)
            for group in groups:
                group["lr"] = scaled_lr(cfg) * group.pop("lr_scale")
    else:
        groups = param_groups_weight_decay(backbone, weight_decay=cfg.weight_decay, no_weight_decay_list=no_decay)
    # the objective's own parameters follow the backbone's rule: no decay on biases and other 1-d
    # parameters (a projector's bias), decay on matrices
    trainable = [p for p in extra if p.requires_grad]
    decay, flat = [p for p in trainable if p.ndim > 1], [p for p in trainable if p.ndim <= 1]
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0})
    if flat:
        groups.append({"params": flat, "weight_decay": 0.0, "lr_scale": 1.0})
    return groups


def build_optimizer(backbone: nn.Module, extra: list[nn.Parameter], cfg: OptimConfig):
    groups = param_groups(backbone, extra, cfg)
    # foreach (one fused update over all tensors) is torch's default on CUDA only; on the CPU the
    # per-parameter Python loop costs about 7% of a small model's step.
    return create_optimizer_v2(groups, opt=cfg.opt, lr=scaled_lr(cfg), weight_decay=cfg.weight_decay, foreach=True)


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int | None = None) -> CosineLRScheduler:
    """Linear warmup for ``warmup_epochs``, then cosine to ``min_lr``; stepped every update.

    ``total_steps`` (a time-budgeted schedule) compresses the same shape into that many steps:
    warmup keeps its fraction ``warmup_epochs / epochs`` of the schedule.
    """
    full = cfg.epochs * steps_per_epoch
    total = full if total_steps is None else max(1, total_steps)
    if total == full:
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    else:
        warmup = min(int(cfg.warmup_epochs / cfg.epochs * total), total - 1)
    warmup = max(warmup, 0)
    # timm warns that a cosine of one step "will have no effect": true and expected for a
    # one-step schedule (a 1-epoch run of one batch), so its logger is quiet while it is built
    timm_logger = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_logger.level
    timm_logger.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, total - warmup),
            lr_min=cfg.min_lr,
            warmup_t=warmup,
            warmup_lr_init=cfg.warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
    finally:
        timm_logger.setLevel(level)
