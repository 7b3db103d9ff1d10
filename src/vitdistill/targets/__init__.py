"""Targets for a batch: what the teacher says about each view (online, stored, or label maps)."""

from .online import OnlineTeacher, build_online_teacher
from .prediction import TeacherPrediction

__all__ = ["OnlineTeacher", "TeacherPrediction", "build_online_teacher"]
