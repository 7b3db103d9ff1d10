"""Teacher sources: the registry of the ways a run can get its teacher's answers.

A source is one class: it says what it gives (``gives``: the fields of
:class:`~vitdistill.targets.TeacherPrediction` it fills), what it reads (``needs``: parts of
the view batch or of the student), which recipe keys choose it and name files, checks its own
keys, and builds itself from the recipe. ``register_source`` adds it to the registry by kind
name, as ``register_term`` does for objective terms; the runner looks the source up
(:func:`source_class`) and builds it, the engine calls it once per batch (:class:`TeacherFn`).

A recipe chooses the kind in one place, ``teacher``: either by name (``teacher.kind``, with the
kind's own parameters in ``teacher.params``) or, for the built-in kinds, by the key that names
their input (``teacher.store``, ``teacher.label_maps``, ``teacher.checkpoint``/``teacher.name``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..augment import ViewBatch
from ..config import RunConfig, TeacherConfig
from ..config.parsing import parse_dataclass
from ..config.paths import register_path_key
from ..data import ImageSource
from ..errors import ConfigError, UserError
from .prediction import TeacherPrediction

# What a source can give (TeacherPrediction's fields) and read (of the batch, of the student).
GIVES = frozenset({"logits", "probs", "hard_labels", "token_probs", "features"})
NEEDS = frozenset({"images", "view_keys", "boxes", "token_grid"})


class TeacherFn(Protocol):
    """What the engine calls once per training batch: the teacher's answer for its views."""

    def __call__(self, batch: ViewBatch) -> TeacherPrediction: ...


@dataclass(frozen=True)
class Request:
    """What the run asks of its teacher: class predictions over the data's classes (``classes``),
    feature maps (``features``), and the student's patch grid when it has one (``token_grid``)."""

    classes: bool = True
    features: bool = False
    token_grid: tuple[int, int] | None = None


class TeacherSource:
    """One way of getting a teacher's answers. Subclasses set the class attributes below,
    implement ``from_recipe`` and ``__call__``, and are added with :func:`register_source`.

    - ``kind``: the registry name (``teacher.kind``);
    - ``fields``: ``TeacherConfig`` fields whose value chooses this kind (none: only by kind);
    - ``default``: the kind used when no other is chosen; its fields may then also name the
      teacher another source was written by (the online teacher);
    - ``path_keys``: ``TeacherConfig`` fields that name files (made absolute in a run's recipe);
    - ``title``: what it is, for messages; ``hint``: how a recipe chooses it (None: not listed);
    - ``gives`` and ``needs``: subsets of :data:`GIVES` and :data:`NEEDS`; an instance may narrow
      ``gives`` (an online teacher built without ``feature_layer`` gives no feature maps);
    - ``Params``: the kind's own parameters (``teacher.params``), validated like a term's.
    """

    kind: ClassVar[str]
    fields: ClassVar[tuple[str, ...]] = ()
    default: ClassVar[bool] = False
    path_keys: ClassVar[tuple[str, ...]] = ()
    title: ClassVar[str] = "a teacher source"
    hint: ClassVar[str | None] = None
    gives: frozenset[str] = frozenset()
    needs: ClassVar[frozenset[str]] = frozenset()

    @dataclasses.dataclass
    class Params:
        pass

    @classmethod
    def chosen_by(cls, teacher: TeacherConfig) -> bool:
        """Whether a recipe names this kind, by ``teacher.kind`` or by one of its fields."""
        return teacher.kind == cls.kind or any(getattr(teacher, name) is not None for name in cls.fields)

    @classmethod
    def check(cls, teacher: TeacherConfig, key: str) -> None:
        """The kind's own rules on its keys (run when a recipe names it); raise ConfigError."""

    @classmethod
    def parse_params(cls, teacher: TeacherConfig) -> Any:
        return parse_dataclass(cls.Params, teacher.params, "teacher.params")

    @classmethod
    def build(cls, cfg: RunConfig, source: ImageSource, request: Request, device: torch.device) -> TeacherSource:
        """The source for a run on the training split ``source``, on ``device``; a request for
        something the kind does not give is refused before anything is read."""
        if request.features and "features" not in cls.gives:
            which = f"teacher.{cls.fields[0]}" if cls.fields else f"teacher.kind={cls.kind}"
            givers = " or ".join(c.title for c in SOURCES.values() if "features" in c.gives)
            raise UserError(f"{which}: the objective distils feature maps, which only {givers} gives")
        return cls.from_recipe(cfg, source, request, device)

    @classmethod
    def from_recipe(cls, cfg: RunConfig, source: ImageSource, request: Request, device: torch.device) -> TeacherSource:
        raise NotImplementedError

    @classmethod
    def check_classes(cls, cfg: RunConfig, classes: list[str], request: Request) -> None:
        """Checks against the data's class names, run before any image is read or decoded (when
        the names are known from folder names alone); raise UserError. Default: none."""

    def __call__(self, batch: ViewBatch) -> TeacherPrediction:
        raise NotImplementedError

    def feature_shape(self, view_size: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the feature maps given for views of ``view_size`` pixels."""
        raise UserError(f"teacher: a {self.kind} source gives no feature maps")

    @property
    def has_class_token(self) -> bool:
        """Whether the feature maps come with the teacher's class token (``TeacherPrediction.feature_cls``)."""
        return False


SOURCES: dict[str, type[TeacherSource]] = {}


def register_source(cls: type[TeacherSource]) -> type[TeacherSource]:
    """Add a teacher source to the registry under ``cls.kind``; its path keys become recipe path keys."""
    if cls.kind in SOURCES and SOURCES[cls.kind] is not cls:
        raise ValueError(f"teacher source {cls.kind!r} is registered twice ({SOURCES[cls.kind].__qualname__}, {cls.__qualname__})")
    unknown = (set(cls.gives) - GIVES) | (set(cls.needs) - NEEDS)
    if unknown:
        raise ValueError(f"teacher source {cls.kind!r}: unknown gives/needs {sorted(unknown)} (known: {sorted(GIVES | NEEDS)})")
    SOURCES[cls.kind] = cls
    for key in cls.path_keys:
        register_path_key("teacher", key)
    return cls


def source_class(teacher: TeacherConfig) -> type[TeacherSource]:
    """The kind a recipe's ``teacher`` section chooses (the section is valid: see :func:`check_teacher`)."""
    if teacher.kind is not None:
        return SOURCES[teacher.kind]
    chosen = [cls for cls in SOURCES.values() if cls.chosen_by(teacher) and not cls.default]
    if chosen:
        return chosen[0]
    return next(cls for cls in SOURCES.values() if cls.default)


def check_teacher(cfg: RunConfig) -> None:
    """A ``teacher`` section chooses exactly one kind, whose own rules and parameters hold."""
    teacher = cfg.teacher
    if teacher is None:
        return
    if teacher.kind is not None and teacher.kind not in SOURCES:
        raise ConfigError("teacher.kind", f"unknown teacher source {teacher.kind!r} (known: {', '.join(sorted(SOURCES))})")
    named = [cls for cls in SOURCES.values() if cls.chosen_by(teacher)]
    for cls in named:
        cls.check(teacher, "teacher")
    if not named:
        hints = [cls.hint for cls in SOURCES.values() if cls.hint]
        raise ConfigError("teacher", f"needs {', '.join(hints[:-1])} or {hints[-1]}")
    exclusive = [cls for cls in named if not cls.default or teacher.kind == cls.kind]  # the default's keys may name the teacher
    if len(exclusive) > 1:
        keys = [f"kind {cls.kind}" if teacher.kind == cls.kind else cls.fields[0] for cls in exclusive]
        raise ConfigError("teacher", f"give {' or '.join(keys)}, not both")
    source_class(teacher).parse_params(teacher)
