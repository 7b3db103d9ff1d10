"""Teacher stores (TinyViT's fast pretraining distillation): the teacher runs once per epoch on
the exact augmented views; any number of students replay them from top-k records."""

from .format import Manifest
from .reader import StoreTargets
from .verify import verify_store
from .writer import describe_store, write_store

__all__ = ["Manifest", "StoreTargets", "describe_store", "verify_store", "write_store"]
