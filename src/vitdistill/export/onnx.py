"""The ONNX export: ``model.onnx``, the student's inference graph.

Input ``input`` ``[batch, 3, H, W]`` float32, normalised with the run's mean/std; output ``logits``
``[batch, classes]``: what vitdistill evaluates (``ModelOutput.inference``): for a distilled DeiT the
mean of the class and distillation heads, else the class head; with ``model.eval_head: lvvit_aux``
plus 0.5 x the per-token head's logits maximised over the patch tokens (LV-ViT's rule). The batch
is dynamic; opset :data:`OPSET`, written by torch's ``torch.export``-based exporter
(``torch.onnx.export(dynamo=True)``, needs ``onnxscript``).
Preprocessing travels in the model's metadata (``metadata_props``): ``mean``, ``std``,
``input_size``, ``crop_pct``, ``interpolation``, ``label_names`` (JSON) and vitdistill's spec.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import UserError
from ..models import VisionModel
from ..models.weights import SPEC_KEY
from .source import ExportSource, inference_backbone

OPSET = 18
SINGLE_FILE_LIMIT = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf's 2 GiB cap)


class InferenceLogits(nn.Module):
    """``VisionModel(x).inference()``: the logits vitdistill evaluates, as one tensor."""

    def __init__(self, model: VisionModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).inference()


def inference_description(model: VisionModel) -> str:
    """What the ``logits`` output is, in words (the model's evaluation rule)."""
    parts = ["mean of the class and distillation heads" if model.has_dist_head else ""]
    if model.spec.eval_head == "lvvit_aux":
        parts.append("+ 0.5 x max over patch tokens of the per-token head (LV-ViT's evaluation rule)")
    text = " ".join(p for p in parts if p)
    return f"logits ({text})" if text else "logits"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"export --format onnx needs {module}: pip install 'vitdistill[export]'") from None


def export_onnx(source: ExportSource, output: str | Path) -> Path:
    onnx = _require("onnx")
    _require("onnxscript")  # torch's ONNX exporter
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = source.model.eval()
    _, spec, _ = inference_backbone(model, format="onnx")
    size = spec.input_size or 224
    example = torch.zeros(2, 3, size, size)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    path = output / "model.onnx"
    with torch.no_grad():
        program = torch.onnx.export(
            InferenceLogits(model).eval(),
            (example,),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=weights_bytes > SINGLE_FILE_LIMIT,
            verbose=False,
        )
    proto = program.model_proto
    metadata = {
        "vitdistill." + SPEC_KEY: spec.to_json(),
        "label_names": json.dumps(list(spec.classes)),
        "input_size": json.dumps([3, size, size]),
        "mean": json.dumps(list(spec.mean) if spec.mean else None),
        "std": json.dumps(list(spec.std) if spec.std else None),
        "crop_pct": json.dumps(source.crop_pct),
        "interpolation": "bilinear",
        "output": inference_description(model),
    }
    onnx.helper.set_model_props(proto, metadata)
    with atomic_path(path, str(os.getpid())) as tmp:
        if weights_bytes > SINGLE_FILE_LIMIT:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save_model(proto, str(tmp))
    return path.parent


def onnx_max_abs_diff(folder: str | Path, model: VisionModel, images: torch.Tensor) -> float:
    """Largest |ONNX Runtime - PyTorch| over the logits of ``images`` (normalised ``[B, 3, H, W]``)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": images.float().numpy()})
    with torch.no_grad():
        reference = model.eval()(images.float()).inference()
    return float((torch.from_numpy(logits) - reference).abs().max())
