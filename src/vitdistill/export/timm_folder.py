"""The timm export: a folder in the Hugging Face hub layout (``config.json`` + ``model.safetensors``).

``config.json`` is written by timm's own ``save_config_for_hf`` (architecture, ``num_classes``,
``label_names``, ``model_args`` to rebuild the architecture, ``pretrained_cfg`` with the run's
input size, mean/std, crop and interpolation), so timm reads it back with
``timm.create_model("local-dir:<folder>", pretrained=True)``. ``model.safetensors`` is the timm
model's state dict (loads strictly); its metadata also carries vitdistill's model spec, so
``vitdistill.models.load_model(<folder>)`` works too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_path, follow_umask
from ..models.weights import SPEC_KEY
from .source import ExportSource, inference_backbone

# pretrained_cfg entries that describe the published weights timm's registry knows for this
# architecture, not the run's: left out of our config.json.
SOURCE_WEIGHT_KEYS = ("tag", "license", "origin_url", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "notes", "description")


def export_timm(source: ExportSource, output: str | Path) -> Path:
    from timm.models._hub import save_config_for_hf  # timm's own writer of hub configs

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    backbone, spec, model_args = inference_backbone(source.model)
    size = spec.input_size or source.model.spec.input_size
    data_config = {"crop_pct": source.crop_pct, "interpolation": "bilinear"}  # roi_align-based views: bilinear
    if size:
        data_config["input_size"] = (3, size, size)
    if spec.mean is not None:
        data_config.update(mean=tuple(spec.mean), std=tuple(spec.std))
    classifiers = backbone.pretrained_cfg.get("classifier")
    if isinstance(classifiers, (list, tuple)):  # only heads the exported model has
        classifiers = [c for c in classifiers if getattr(backbone, c, None) is not None]
    model_config = {"pretrained_cfg": {"classifier": classifiers}}
    if spec.classes:
        model_config["label_names"] = list(spec.classes)
    tag = str(os.getpid())  # two exports of one run at once write their own temporary files
    with atomic_path(output / "config.json", tag) as tmp_config:  # renamed after the weights
        save_config_for_hf(backbone, str(tmp_config), model_config=model_config, model_args=model_args, data_config=data_config)
        config = json.loads(tmp_config.read_text())
        for key in SOURCE_WEIGHT_KEYS:
            config["pretrained_cfg"].pop(key, None)
        tmp_config.write_text(json.dumps(config, indent=2))
        with atomic_path(output / "model.safetensors", tag) as tmp_weights:
            state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
            save_file(state, str(tmp_weights), metadata={SPEC_KEY: spec.to_json(), "format": "pt"})
            follow_umask(tmp_weights)  # safetensors writes 0600; other run files follow the umask
    return output
