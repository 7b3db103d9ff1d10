"""Teacher stores (TinyViT's fast pretraining distillation): the teacher runs once per epoch on
the exact augmented views; any number of students replay them from top-k records.

Here: the format and its writer and verifier. The reader, a teacher source, is
:class:`vitdistill.targets.store.StoreTargets`."""

from ..targets.store_format import Manifest
from .verify import verify_store
from .writer import describe_store, write_store

__all__ = ["Manifest", "describe_store", "verify_store", "write_store"]
