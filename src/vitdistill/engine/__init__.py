"""The engine: one loop for teachers and students (DDP, bf16, EMA, checkpoints, metrics)."""

from ..device import DistEnv, setup_distributed
from .evaluate import evaluate
from .trainer import Trainer

__all__ = ["DistEnv", "Trainer", "evaluate", "setup_distributed"]
