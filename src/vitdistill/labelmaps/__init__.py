"""LV-ViT token labeling: dense teacher label maps and crop-aligned per-token targets."""

from .maps import LabelMapManifest, write_label_maps
from .targets import LabelMapTargets

__all__ = ["LabelMapManifest", "LabelMapTargets", "write_label_maps"]
