"""Exports of a trained run: the student alone, in the layout its consumer reads.

``export_run(run, format="timm" | "onnx", ema=False, output=None)`` writes

- ``timm``: a folder in the Hugging Face hub layout (``config.json`` + ``model.safetensors``) that
  ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads (see :mod:`.timm_folder`);
- ``onnx``: ``model.onnx``, the inference graph with a dynamic batch (see :mod:`.onnx`).

Both hold the inference model only: per-token heads used for training (ours,
``_vitdistill.token_head.*``, and LV-ViT's ``aux_head``) and objective weights stay behind; a DeiT
distillation head is part of timm's model and of inference (the mean of the two heads), so it stays.
"""

from .onnx import OPSET, export_onnx, onnx_max_abs_diff
from .source import ExportSource, inference_backbone, open_export_source
from .timm_folder import export_timm

FORMATS = ("timm", "onnx")

__all__ = [
    "FORMATS",
    "OPSET",
    "ExportSource",
    "export_onnx",
    "export_run",
    "export_timm",
    "inference_backbone",
    "onnx_max_abs_diff",
    "open_export_source",
]


def export_run(run, format: str = "timm", ema: bool = False, output=None):
    """Export a run folder (or a ``model.safetensors`` written by vitdistill); returns the folder."""
    from ..errors import UserError

    if format not in FORMATS:
        raise UserError(f"export: unknown format {format!r} (expected one of {', '.join(FORMATS)})")
    source = open_export_source(run, ema)
    out = source.default_output(format) if output is None else output
    return export_timm(source, out) if format == "timm" else export_onnx(source, out)
