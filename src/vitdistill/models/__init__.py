"""Students and teachers: timm models (and ours registered in timm) behind one typed forward."""

from .network import VisionModel, build_model, load_model
from .output import ModelOutput
from .spec import ModelSpec
from .weights import export_model, read_spec, read_state_dict

__all__ = ["ModelOutput", "ModelSpec", "VisionModel", "build_model", "export_model", "load_model", "read_spec", "read_state_dict"]
