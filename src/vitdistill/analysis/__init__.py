"""Analysis of trained ViTs: token similarity, attention statistics and loss landscapes.

``analyze(checkpoint, output, ...)`` writes ``analysis.json``, PNG figures and ``report.md``;
the building blocks (``capture``, ``metrics``, ``landscape``, ``plots``) work on any model and
tensors. matplotlib is needed for the figures only (imported lazily).
"""

from .capture import Capture, ViTLayout, capture, vit_layout
from .landscape import filter_normalized_direction, loss_landscape_1d, loss_landscape_2d
from .pipeline import analyze

__all__ = [
    "Capture",
    "ViTLayout",
    "analyze",
    "capture",
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "vit_layout",
]
