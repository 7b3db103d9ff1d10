"""What an export reads: the trained model of a run (or its EMA) and how its inputs were made."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ..errors import UserError
from ..models import ModelSpec, VisionModel, load_model
from ..models.lvvit import LVViT
from ..models.output import LVVIT_AUX_WEIGHT


@dataclass
class ExportSource:
    model: VisionModel  # in eval mode
    weights: Path  # the .safetensors it came from
    crop_pct: float  # evaluation centre crop of the run (augment.eval_crop_pct)
    ema: bool

    def default_output(self, format: str) -> Path:
        """``<run>/export/<format>`` (``<format>-ema`` for the EMA weights)."""
        return self.weights.parent / "export" / (f"{format}-ema" if self.ema else format)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec


def open_export_source(run: str | Path, ema: bool = False) -> ExportSource:
    """A run folder (its ``model.safetensors``, or ``model_ema.safetensors`` with ``ema``) or an
    export file."""
    run = Path(run)
    if run.is_dir():
        weights = run / ("model_ema.safetensors" if ema else "model.safetensors")
        if not weights.is_file():
            hint = " (the run has no EMA weights: train with engine.ema_decay set)" if ema else " (has the run finished?)"
            raise UserError(f"export: {weights} does not exist{hint}")
    elif run.suffix == ".safetensors" and run.is_file():
        if ema:
            raise UserError("export: --ema needs a run folder (it picks model_ema.safetensors there)")
        weights = run
    else:
        raise UserError(f"export: {run} is neither a run folder nor a .safetensors export")
    model = load_model(weights)
    crop_pct = 1.0
    recipe = weights.parent / "config.yaml"
    if recipe.is_file():
        import yaml

        crop_pct = float(((yaml.safe_load(recipe.read_text()) or {}).get("augment") or {}).get("eval_crop_pct", 1.0))
    return ExportSource(model=model, weights=weights, crop_pct=crop_pct, ema=ema)


def inference_backbone(model: VisionModel, format: str = "timm") -> tuple[nn.Module, ModelSpec, dict]:
    """The timm model an export holds, the spec that rebuilds it, and timm arguments that differ
    from the training model's: per-token heads used only for training are left out (ours lives
    outside the backbone; LV-ViT's ``aux_head`` is dropped with ``aux_head=False``).

    With ``model.eval_head: lvvit_aux`` the per-token head is part of inference, so it stays: an
    LV-ViT keeps ``aux_head`` and is rebuilt with ``eval_aux_weight=0.5`` (timm's ``forward`` in
    eval mode then gives LV-ViT's rule). Our token head on another timm model lives outside the
    timm model, so its timm folder cannot hold it: that export is refused (ONNX exports the whole
    inference graph, ``format="onnx"``)."""
    backbone, spec, args = model.backbone, model.spec, {}
    if spec.eval_head == "lvvit_aux":
        if isinstance(backbone, LVViT):
            backbone = copy.deepcopy(backbone)
            backbone.eval_aux_weight = LVVIT_AUX_WEIGHT
            args = {"eval_aux_weight": LVVIT_AUX_WEIGHT}
            return backbone, replace(spec, token_head=False, kwargs={**spec.kwargs, **args}), args
        if format == "timm":
            raise UserError(
                f"export: this run evaluates with model.eval_head=lvvit_aux, which reads vitdistill's token head on {spec.name}; "
                "a timm folder holds the timm model only, so its logits would differ: export --format onnx instead"
            )
        return backbone, spec, args
    if isinstance(backbone, LVViT) and backbone.aux_head is not None:
        backbone = copy.deepcopy(backbone)
        backbone.aux_head = None
        args = {"aux_head": False}
    spec = replace(spec, token_head=False, kwargs={**spec.kwargs, **args})
    return backbone, spec, args
