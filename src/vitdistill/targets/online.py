"""An online teacher: a frozen model run on each training view."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment import ViewBatch
from ..config import TeacherConfig
from ..config.schema import IMAGENET_MEAN, IMAGENET_STD
from ..data import ImageSource
from ..errors import UserError
from ..models import ModelSpec, VisionModel, load_model
from ..models.network import check_input_size, create_backbone, load_backbone_weights
from .prediction import TeacherPrediction


class OnlineTeacher:
    """Runs a frozen model (eval mode, no grad) on the student's views.

    The views arrive normalised with the student's mean/std; when the teacher was trained with
    another normalisation they are renormalised first (one affine map per channel), and resized
    when the teacher wants another input size. Not an ``nn.Module`` attribute of the student,
    so its weights never enter the student's checkpoint.
    """

    def __init__(self, model: VisionModel, student_mean, student_std, teacher_mean, teacher_std, input_size: int | None = None):
        self.model = model.eval().requires_grad_(False)
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        # x_t = (x * s_std + s_mean - t_mean) / t_std
        self.scale = (s_std / t_std).view(1, 3, 1, 1)
        self.shift = ((s_mean - t_mean) / t_std).view(1, 3, 1, 1)
        self.identity = torch.allclose(s_mean, t_mean) and torch.allclose(s_std, t_std)
        self.input_size = input_size

    def to(self, device: torch.device) -> "OnlineTeacher":
        self.model.to(device)
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not self.identity:
            images = images * self.scale + self.shift
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False)
        return images

    @torch.no_grad()
    def __call__(self, batch: ViewBatch) -> TeacherPrediction:
        if self.model.training:  # someone called .train() on it: BatchNorm must stay frozen
            self.model.eval()
        out = self.model(self.prepare(batch.images))
        return TeacherPrediction(logits=out.head("mean").float())


def build_online_teacher(cfg: TeacherConfig, data: ImageSource, student_mean, student_std, student_input_size: int | None = None) -> OnlineTeacher:
    """Load the teacher of the recipe and check that it predicts the data's classes."""
    if cfg.checkpoint is not None:
        model = load_model(cfg.checkpoint)
        spec = model.spec
    else:
        assert cfg.name is not None
        spec = ModelSpec(name=cfg.name, num_classes=data.num_classes, kwargs=dict(cfg.kwargs), small_input_stem=cfg.small_input_stem)
        model = VisionModel(create_backbone(spec), spec)
        if cfg.weights is None:
            raise UserError("teacher.weights: a teacher given by name needs its weights (a local .safetensors or .pth file)")
        load_backbone_weights(model.backbone, cfg.weights, "teacher.weights")
        model.eval()
    if spec.num_classes != data.num_classes:
        raise UserError(f"teacher: it predicts {spec.num_classes} classes but the data has {data.num_classes}")
    if spec.classes and list(spec.classes) != list(data.classes):
        raise UserError(f"teacher: its classes {spec.classes[:5]}... differ from the data's {data.classes[:5]}...")
    if student_input_size is not None:
        check_input_size(model.backbone, cfg.input_size or student_input_size, "teacher.input_size", spec.name, "set teacher.input_size to it (views are resized for the teacher)")
    mean = cfg.mean or spec.mean or _timm_default(spec.name, "mean", IMAGENET_MEAN)
    std = cfg.std or spec.std or _timm_default(spec.name, "std", IMAGENET_STD)
    return OnlineTeacher(model, student_mean, student_std, mean, std, cfg.input_size or None)


def _timm_default(name: str, key: str, fallback):
    import timm

    cfg = timm.get_pretrained_cfg(name)
    value = getattr(cfg, key, None) if cfg is not None else None
    return tuple(value) if value else fallback
