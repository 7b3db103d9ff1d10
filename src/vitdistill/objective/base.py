"""Objective = a weighted sum of terms; each term is a small module holding one equation.

A recipe lists terms as flat mappings::

    objective:
      - {term: ce, weight: 0.5, head: cls, smoothing: 0.1}
      - {term: kd_hard, weight: 0.5, head: dist}

``term`` picks the class from the registry, ``weight`` scales it, ``head`` routes it to the
class head, the distillation head or their mean (``auto``: the term's default), and the other
keys are the term's parameters, validated by its ``Params`` dataclass. Adding a method means
adding a term here, never a branch in the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..augment import ViewBatch
from ..config.parsing import parse_dataclass, parse_value, to_dict
from ..errors import ConfigError
from ..models import ModelOutput
from ..models.output import HEADS
from ..targets import TeacherPrediction, TeacherSource

TERMS: dict[str, type[Term]] = {}
ROUTES = ("auto", *HEADS)  # a term's `head`: one of the model's heads, or the term's default


def register_term(cls: type[Term]) -> type[Term]:
    TERMS[cls.name] = cls
    return cls


class Term(nn.Module):
    """One loss term. Subclasses set ``name`` and ``Params``, and implement ``forward(out, batch,
    teacher) -> scalar``, with the term's equation in their docstring."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    needs_teacher_features: ClassVar[bool] = False  # reads the teacher's feature maps only, never its classes
    needs_blocks: ClassVar[tuple[int, ...]] = ()  # blocks whose patch tokens the term reads (ModelOutput.block_tokens)
    needs_token_logits: ClassVar[bool] = False  # reads ModelOutput.token_logits (the model's per-token head)
    uses_head: ClassVar[bool] = True  # reads a class head (routed by `head`); False: tokens only

    @dataclasses.dataclass
    class Params:
        pass

    def __init__(self, params: Any, head: str, num_classes: int):
        super().__init__()
        self.params = params
        self.head = head
        self.num_classes = num_classes

    @classmethod
    def default_head(cls, has_dist_head: bool) -> str:
        return "cls"

    def setup(self, model, seed: int, teacher: TeacherSource | None = None) -> None:
        """Called once with the model (a ``VisionModel``), the run seed and the source of teacher
        predictions (None without a teacher), before the optimizer is built: a term creates its
        own parameters (e.g. a projector) here, from what the source declares it gives."""

    def model_inputs(self, batch: ViewBatch) -> dict:
        """Extra keyword arguments for the model's forward on this batch (e.g. MixToken)."""
        return {}

    def forward(self, out: ModelOutput, batch: ViewBatch, teacher: TeacherPrediction | None) -> torch.Tensor:
        raise NotImplementedError


def validate_terms(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check every term mapping of a recipe; return them with all defaults filled in."""
    checked = []
    for i, item in enumerate(items):
        key = f"objective.{i}"
        if not isinstance(item, dict) or "term" not in item:
            raise ConfigError(key, "each term is a mapping with a 'term' key, e.g. {term: ce, weight: 1.0}")
        rest = dict(item)
        name = rest.pop("term")
        if name not in TERMS:
            raise ConfigError(f"{key}.term", f"unknown term {name!r} (known: {', '.join(sorted(TERMS))})")
        weight = parse_value(float, rest.pop("weight", 1.0), f"{key}.weight")
        head = rest.pop("head", "auto")
        if head not in ROUTES:
            raise ConfigError(f"{key}.head", f"expected one of {', '.join(ROUTES)}, got {head!r}")
        params = parse_dataclass(TERMS[name].Params, rest, key)
        checked.append({"term": name, "weight": weight, "head": head, **to_dict(params)})
    return checked


def needs_teacher(items: list[dict[str, Any]]) -> bool:
    return any(TERMS[item["term"]].needs_teacher for item in items)


def check_objective(cfg) -> None:
    """Every term of a recipe is known and valid (defaults filled in); a teacher is set if needed."""
    cfg.objective = validate_terms(cfg.objective)
    if needs_teacher(cfg.objective) and cfg.teacher is None:
        raise ConfigError("teacher", "the objective needs a teacher; none is set")


class Objective(nn.Module):
    """``L = sum_k w_k * L_k``; returns the total and each term's unweighted value."""

    def __init__(self, items: list[dict[str, Any]], num_classes: int, has_dist_head: bool):
        super().__init__()
        self.weights: list[float] = []
        self.labels: list[str] = []
        terms = []
        for i, item in enumerate(validate_terms(items)):
            rest = dict(item)
            cls = TERMS[rest.pop("term")]
            weight, head = rest.pop("weight"), rest.pop("head")
            head = cls.default_head(has_dist_head) if head == "auto" else head
            if head == "dist" and not has_dist_head:
                raise ConfigError(f"objective.{i}.head", "routes to the distillation head, but the model has none")
            terms.append(cls(parse_dataclass(cls.Params, rest), head, num_classes))
            self.weights.append(weight)
            self.labels.append(f"{cls.name}@{head}" if has_dist_head and cls.uses_head else cls.name)
        self.terms = nn.ModuleList(terms)
        self.needs_teacher = any(t.needs_teacher for t in terms)
        self.needs_teacher_features = any(t.needs_teacher_features for t in terms)
        # some term reads the teacher's class predictions (so they must be the data's classes)
        self.needs_teacher_classes = any(t.needs_teacher and not t.needs_teacher_features for t in terms)
        self.needed_blocks = {b for t in terms for b in t.needs_blocks}
        self.needs_token_logits = any(t.needs_token_logits for t in terms)

    def each_term(self) -> list[Term]:
        return list(self.terms)  # type: ignore[arg-type]  # a ModuleList of Terms (nn.Module types its items as Module)

    def setup(self, model, seed: int, teacher: TeacherSource | None = None) -> None:
        for term in self.each_term():
            term.setup(model, seed, teacher)

    def model_inputs(self, batch: ViewBatch) -> dict:
        inputs: dict = {}
        for term in self.each_term():
            inputs.update(term.model_inputs(batch))
        return inputs

    def forward(
        self, out: ModelOutput, batch: ViewBatch, teacher: TeacherPrediction | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total: torch.Tensor | float = 0.0
        parts: dict[str, torch.Tensor] = {}
        for label, weight, term in zip(self.labels, self.weights, self.terms):
            value: torch.Tensor = term(out, batch, teacher)
            parts[_unique(parts, label)] = value.detach()
            total = total + weight * value
        assert isinstance(total, torch.Tensor), "an objective has at least one term"
        return total, parts


def _unique(existing: dict, label: str) -> str:
    if label not in existing:
        return label
    n = 2
    while f"{label}#{n}" in existing:
        n += 1
    return f"{label}#{n}"
