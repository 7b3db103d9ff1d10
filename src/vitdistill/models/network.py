"""Build timm models by name, wrap them with a uniform typed forward, save and load them.

An exported model is a ``.safetensors`` file holding the timm model's own state dict (so timm
users can load it directly) and, in its metadata, a :class:`ModelSpec`: everything needed to
rebuild it (architecture, class names, input size, normalisation).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from . import convnet  # noqa: F401  (registers our small CNNs in timm)
from .output import ModelOutput
from .stems import use_small_input_stem

SPEC_KEY = "vitdistill"


@dataclass
class ModelSpec:
    """What rebuilds a trained model: timm name and arguments plus its data conventions."""

    name: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    small_input_stem: bool = False
    classes: list[str] = field(default_factory=list)
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_classes: int, **conventions) -> "ModelSpec":
        kwargs = dict(cfg.kwargs)
        if cfg.img_size is not None:
            kwargs["img_size"] = cfg.img_size
        if cfg.patch_size is not None:
            kwargs["patch_size"] = cfg.patch_size
        return cls(name=cfg.name, num_classes=num_classes, kwargs=kwargs, small_input_stem=cfg.small_input_stem, **conventions)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        data = json.loads(text)
        for key in ("mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


class VisionModel(nn.Module):
    """A timm model with a uniform forward: :class:`ModelOutput` for any architecture.

    DeiT-style distilled ViTs (a ``head_dist``) give both heads' logits in training and in
    evaluation (timm's own forward averages them in eval mode, hiding each head's accuracy).
    """

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.has_dist_head = hasattr(backbone, "head_dist")

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if not self.has_dist_head:
            return ModelOutput(logits=self.backbone(x))
        net = self.backbone
        tokens = net.forward_features(x)
        cls_logits = net.head(net.head_drop(tokens[:, 0]))
        dist_logits = net.head_dist(net.head_drop(tokens[:, 1]))
        return ModelOutput(logits=cls_logits, dist_logits=dist_logits, tokens=tokens)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in inner()} if inner else set()


def create_backbone(spec: ModelSpec, drop_path: float = 0.0) -> nn.Module:
    kwargs = dict(spec.kwargs)
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    if not timm.is_model(spec.name):
        raise UserError(f"model: unknown timm model {spec.name!r} (see timm.list_models())")
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes, **kwargs)
    except TypeError as err:
        raise UserError(f"model: {spec.name} rejected its arguments {sorted(kwargs)}: {err}") from None
    if spec.small_input_stem:
        use_small_input_stem(model, spec.name)
    return model


def build_model(cfg: ModelConfig, num_classes: int, **conventions) -> VisionModel:
    """A fresh model from the recipe (``pretrained=False``; ``init`` loads local weights)."""
    spec = ModelSpec.from_config(cfg, num_classes, **conventions)
    model = VisionModel(create_backbone(spec, cfg.drop_path), spec)
    if cfg.init:
        load_backbone_weights(model.backbone, cfg.init, "model.init")
    return model


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``state_dict``/``model`` entries and
    ``module.`` prefixes are unwrapped). ``key`` names the recipe key in errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{key}: {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for entry in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(entry), dict):
                state = state[entry]
    if not isinstance(state, dict):
        raise UserError(f"{key}: {path} does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_backbone_weights(backbone: nn.Module, path: str | Path, key: str) -> None:
    state = read_state_dict(path, key)
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches, e.g. another class count
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise UserError(f"{key}: {path} does not fit the model ({detail})") from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys[:3], result.unexpected_keys[:3]
        raise UserError(f"{key}: {path} does not fit the model (missing {missing}, unexpected {unexpected})")


def export_model(model: VisionModel, path: str | Path) -> None:
    """Write the backbone's weights and the spec to ``path`` (atomic: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(tmp), metadata={SPEC_KEY: model.spec.to_json()})
    tmp.replace(path)


def read_spec(path: str | Path) -> ModelSpec:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if SPEC_KEY not in meta:
        raise UserError(f"{path} is not a vitdistill export (no model spec in its metadata); use teacher.name + teacher.weights")
    return ModelSpec.from_json(meta[SPEC_KEY])


def resolve_export(path: str | Path) -> Path:
    """A run folder or an export file -> the export file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist (expected a model.safetensors written by vitdistill, or its run folder)")
    return path


def load_model(path: str | Path) -> VisionModel:
    """Rebuild an exported model (in eval mode) from its ``.safetensors`` file or run folder."""
    path = resolve_export(path)
    spec = read_spec(path)
    model = VisionModel(create_backbone(spec), spec)
    load_backbone_weights(model.backbone, path, str(path))
    return model.eval()
