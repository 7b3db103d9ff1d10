"""An online teacher: a frozen model run on each training view."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..augment import ViewBatch
from ..config import RunConfig, TeacherConfig
from ..config.schema import IMAGENET_MEAN, IMAGENET_STD
from ..data import ImageSource
from ..errors import ConfigError, UserError
from ..models import ModelSpec, VisionModel, load_model
from ..models.network import check_input_size, create_backbone
from ..models.weights import classifier_prefixes, load_backbone_weights, read_state_dict
from .prediction import TeacherPrediction
from .source import Request, TeacherSource, register_source


@register_source
class OnlineTeacher(TeacherSource):
    """Runs a frozen model (eval mode, no grad) on the student's views.

    The views arrive normalised with the student's mean/std; when the teacher was trained with
    another normalisation they are renormalised first (one affine map per channel), and resized
    when the teacher wants another input size. Not an ``nn.Module`` attribute of the student,
    so its weights never enter the student's checkpoint.

    With ``feature_layer`` (an index into timm's ``forward_intermediates``) it also gives that
    stage's or block's feature map, from the same forward pass as the logits (and a ViT's class
    token at that block). ``feature_norm``: a ViT's features after its final norm (None: yes for
    a ViT, the Feature-Distillation reference's default; a CNN's stages have none). ``logits=False``
    (feature-only objectives) leaves the logits out: the teacher's classes may then be any.

    The default source: chosen by ``teacher.checkpoint`` or ``teacher.name`` (+ ``weights``)
    when no other source is; beside a store or label maps those keys name the teacher that
    wrote them.
    """

    kind = "online"
    fields = ("checkpoint", "name")
    default = True
    path_keys = ("checkpoint", "weights")
    title = "an online teacher (teacher.checkpoint or teacher.name)"
    hint = "checkpoint (a vitdistill export), name (+ weights)"
    gives = frozenset({"logits", "hard_labels", "features"})
    needs = frozenset({"images"})

    def __init__(
        self,
        model: VisionModel,
        student_mean,
        student_std,
        teacher_mean,
        teacher_std,
        input_size: int | None = None,
        feature_layer: int | None = None,
        logits: bool = True,
        feature_norm: bool | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.feature_layer = feature_layer
        self.feature_norm = model.is_vit if feature_norm is None else feature_norm
        self.logits = logits
        # what this one gives: class predictions unless feature-only, feature maps with a layer
        self.gives = frozenset(({"logits", "hard_labels"} if logits else set()) | ({"features"} if feature_layer is not None else set()))
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        # x_t = (x * s_std + s_mean - t_mean) / t_std
        self.scale = (s_std / t_std).view(1, 3, 1, 1)
        self.shift = ((s_mean - t_mean) / t_std).view(1, 3, 1, 1)
        self.identity = torch.allclose(s_mean, t_mean) and torch.allclose(s_std, t_std)
        self.input_size = input_size

    @classmethod
    def check(cls, teacher: TeacherConfig, key: str) -> None:
        if teacher.checkpoint is not None and teacher.name is not None:
            raise ConfigError(key, "give checkpoint (a vitdistill export) or name (+ weights), not both")
        if teacher.kind == cls.kind and teacher.checkpoint is None and teacher.name is None:
            raise ConfigError(key, "kind online needs checkpoint (a vitdistill export) or name (+ weights)")

    @classmethod
    def from_recipe(cls, cfg: RunConfig, source: ImageSource, request: Request, device: torch.device) -> OnlineTeacher:
        """The recipe's teacher on ``device``, with feature maps when the run reads them and with
        the data's classes unless it reads only feature maps."""
        assert cfg.teacher is not None
        teacher = build_online_teacher(
            cfg.teacher, source, cfg.data.mean, cfg.data.std, cfg.augment.input_size, classes=request.classes, features=request.features
        )
        return teacher.to(device)

    @classmethod
    def check_classes(cls, cfg: RunConfig, classes: list[str], request: Request) -> None:
        """The teacher loads, predicts the data's classes and takes the views, before any image is decoded."""
        assert cfg.teacher is not None
        build_online_teacher(
            cfg.teacher,
            ClassList(classes),
            cfg.data.mean,
            cfg.data.std,
            cfg.augment.input_size,
            classes=request.classes,
            features=request.features,
        )

    def to(self, device: torch.device) -> OnlineTeacher:
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
        images = self.prepare(batch.images)
        if self.feature_layer is None:
            return TeacherPrediction(logits=self.model(images).inference().float())
        out, features, cls = self.model.forward_with_features(images, self.feature_layer, self.feature_norm)
        logits = out.inference().float() if self.logits else None
        return TeacherPrediction(logits=logits, features=features.float(), feature_cls=None if cls is None else cls.float())

    @property
    def has_class_token(self) -> bool:
        """The teacher's features include a class token (a ViT with one)."""
        return self.model.is_vit and getattr(self.model.backbone, "cls_token", None) is not None

    @torch.no_grad()
    def feature_shape(self, view_size: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the teacher's feature map for a student view of ``view_size`` pixels
        (one forward pass on a blank view, on the teacher's device)."""
        if self.feature_layer is None:
            raise UserError("teacher: built without feature_layer, it gives no feature maps")
        device = self.scale.device
        out, features, _ = self.model.forward_with_features(
            self.prepare(torch.zeros(1, 3, view_size, view_size, device=device)), self.feature_layer, self.feature_norm
        )
        if features.dim() != 4:
            raise UserError(f"teacher.feature_layer: {self.model.spec.name} gives a {features.dim()}-d feature map, not [B, C, H, W]")
        return tuple(features.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class ClassList:
    """The data's classes before its images are read: what :func:`build_online_teacher` asks of a source."""

    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_online_teacher(
    cfg: TeacherConfig,
    data: ImageSource | ClassList,
    student_mean,
    student_std,
    student_input_size: int | None = None,
    *,
    classes: bool = True,
    features: bool = False,
) -> OnlineTeacher:
    """Load the teacher of the recipe. ``classes``: its logits are used, so it must predict the
    data's classes; otherwise (feature-only objectives) its head is never read and a teacher
    given by name is built without one. ``features``: it also gives the feature map of
    ``cfg.feature_layer`` (default: the last stage or block)."""
    if cfg.checkpoint is not None:
        model = load_model(cfg.checkpoint)
        spec = model.spec
    else:
        assert cfg.name is not None
        num_classes = data.num_classes if classes else 0
        spec = ModelSpec(name=cfg.name, num_classes=num_classes, kwargs=dict(cfg.kwargs), small_input_stem=cfg.small_input_stem)
        model = VisionModel(create_backbone(spec), spec)
        if cfg.weights is None:
            raise UserError("teacher.weights: a teacher given by name needs its weights (a local .safetensors or .pth file)")
        if classes:
            load_backbone_weights(model.backbone, cfg.weights, "teacher.weights")
        else:  # no head was built: the weights' classifier is not needed
            own, heads = model.backbone.state_dict(), classifier_prefixes(model.backbone)
            state = read_state_dict(cfg.weights, "teacher.weights")
            load_backbone_weights(
                model.backbone, {k: v for k, v in state.items() if k in own or not k.startswith(heads)}, "teacher.weights"
            )
        model.eval()
    if classes and spec.num_classes != data.num_classes:
        raise UserError(f"teacher: it predicts {spec.num_classes} classes but the data has {data.num_classes}")
    if classes and spec.classes and list(spec.classes) != list(data.classes):
        raise UserError(f"teacher: its classes {spec.classes[:5]}... differ from the data's {data.classes[:5]}...")
    if student_input_size is not None:
        check_input_size(
            model.backbone,
            cfg.input_size or student_input_size,
            "teacher.input_size",
            spec.name,
            "set teacher.input_size to it (views are resized for the teacher)",
        )
    mean = cfg.mean or spec.mean or _timm_default(spec.name, "mean", IMAGENET_MEAN)
    std = cfg.std or spec.std or _timm_default(spec.name, "std", IMAGENET_STD)
    layer = (-1 if cfg.feature_layer is None else cfg.feature_layer) if features else None
    return OnlineTeacher(
        model,
        student_mean,
        student_std,
        mean,
        std,
        cfg.input_size or None,
        feature_layer=layer,
        logits=classes,
        feature_norm=cfg.feature_norm,
    )


def _timm_default(name: str, key: str, fallback):
    import timm

    cfg = timm.get_pretrained_cfg(name)
    value = getattr(cfg, key, None) if cfg is not None else None
    return tuple(value) if value else fallback
