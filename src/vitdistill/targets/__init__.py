"""Targets for a batch: what the teacher says about each view.

Each way of getting it is a teacher source, one class registered by kind name
(:func:`register_source`): the online teacher (:mod:`.online`), a teacher store (:mod:`.store`)
and label maps (:mod:`.labelmaps`). The runner looks the recipe's kind up (:func:`source_class`)
and builds it; the engine calls it once per batch (:class:`TeacherFn`) and hands the
:class:`TeacherPrediction` to the objective. The offline sources' file formats are here too
(:mod:`.store_format`, :mod:`.labelmap_format`): the contract between a reader here and its writer
above (:mod:`vitdistill.store`, :mod:`vitdistill.labelmaps`, which run the online teacher).
"""

from .prediction import TeacherPrediction
from .source import GIVES, NEEDS, SOURCES, Request, TeacherFn, TeacherSource, register_source, source_class

# The built-in sources, in the order messages list them (registration order): online, store, label maps.
# isort: off
from .online import OnlineTeacher, build_online_teacher
from .store import StoreTargets
from .labelmaps import LabelMapTargets
# isort: on

__all__ = [
    "GIVES",
    "NEEDS",
    "SOURCES",
    "LabelMapTargets",
    "OnlineTeacher",
    "Request",
    "StoreTargets",
    "TeacherFn",
    "TeacherPrediction",
    "TeacherSource",
    "build_online_teacher",
    "register_source",
    "source_class",
]
