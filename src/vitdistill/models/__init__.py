"""Students and teachers: timm models (and ours registered in timm) behind one typed forward."""

from .network import ModelSpec, VisionModel, build_model, export_model, load_model, read_spec, read_state_dict
from .output import ModelOutput

__all__ = ["ModelOutput", "ModelSpec", "VisionModel", "build_model", "export_model", "load_model", "read_spec", "read_state_dict"]
