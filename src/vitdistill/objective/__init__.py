"""Objective terms, each one equation; a recipe's objective is a weighted list of them."""

from . import classification, distillation, diversity, feature, token_label  # noqa: F401  (register the terms)
from .base import TERMS, Objective, Term, needs_teacher, register_term, validate_terms

__all__ = ["TERMS", "Objective", "Term", "needs_teacher", "register_term", "validate_terms"]
