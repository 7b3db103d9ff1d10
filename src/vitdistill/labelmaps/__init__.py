"""LV-ViT token labeling: dense teacher label maps, their format and their writer (``vitdistill
labelmaps``). Their reader, the crop-aligned per-token targets, is a teacher source:
:class:`vitdistill.targets.labelmaps.LabelMapTargets`."""

from ..targets.labelmap_format import LabelMapManifest
from .maps import write_label_maps

__all__ = ["LabelMapManifest", "write_label_maps"]
