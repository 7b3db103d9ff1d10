"""Per-layer statistics of one model over evaluation batches (weighted by batch size, so every
value is the mean over all analysed images)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.output import ModelOutput
from . import metrics
from .capture import capture, vit_layout
from .landscape import Batches


class _Means:
    """Running means of named tensors, each batch weighted by its number of images."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, n: int, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().double() * n
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def mean(self, key: str) -> torch.Tensor:
        return (self.sums[key] / max(self.count, 1)).cpu()


def _number(x: torch.Tensor | float) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


@torch.no_grad()
def model_statistics(model: nn.Module, batches: Batches) -> tuple[dict, torch.Tensor | None]:
    """Accuracy on ``batches`` and, for a ViT, the per-layer token and attention statistics.

    Returns a JSON-able dict and the mean attention maps ``[depth, T, T]`` (None for a model
    without attention). Per-layer lists have one entry per block (the block's output tokens or
    its attention); ``embedding_patch_cosine`` is the patch similarity of block 0's input.
    """
    layout = vit_layout(model)
    means = _Means()
    for images, labels in batches:
        n = int(labels.numel())
        if layout is None:
            model.eval()
            out = model(images)
            out = out if isinstance(out, ModelOutput) else ModelOutput(logits=out)
            layers: dict[str, torch.Tensor] = {}
        else:
            cap = capture(model, images)
            out = cap.output
            p = layout.num_prefix
            layers = {
                "embedding_patch_cosine": metrics.patch_cosine_similarity(cap.embeddings, p),
                "patch_cosine": torch.stack([metrics.patch_cosine_similarity(t, p) for t in cap.tokens]),
                "attention_std": torch.stack([metrics.attention_std(a) for a in cap.attention]),
                "attention_distance": torch.stack(
                    [metrics.attention_distance(a, layout.grid, layout.patch_size, p) for a in cap.attention]
                ),
                "head_similarity": torch.stack([metrics.head_similarity(a) for a in cap.attention]),
                "attention_maps": torch.stack([metrics.mean_attention_map(a) for a in cap.attention]),
            }
            if layout.has_dist_token:
                layers["cls_dist_cosine"] = torch.stack([metrics.token_cosine(t, 0, 1) for t in cap.tokens])
        logits = out.inference().float()
        extra = {}
        if out.dist_logits is not None:
            extra["head_logit_cosine"] = metrics.logit_cosine(out.logits, out.dist_logits)
        means.add(
            n,
            loss=F.cross_entropy(logits, labels, reduction="mean"),
            top1=100.0 * (logits.argmax(-1) == labels).float().mean(),
            **extra,
            **layers,
        )
        means.count += n
    result: dict = {"images": means.count, "top1": _number(means.mean("top1")), "loss": _number(means.mean("loss"))}
    net = getattr(model, "backbone", model)
    if hasattr(net, "head_dist") and hasattr(net, "head") and hasattr(net.head, "weight") and hasattr(net.head_dist, "weight"):
        result["heads"] = {
            "logit_cosine": _number(means.mean("head_logit_cosine")) if "head_logit_cosine" in means.sums else None,
            "weight_cosine": _number(metrics.weight_cosine(net.head.weight, net.head_dist.weight)),
        }
    else:
        result["heads"] = None
    if layout is None:
        result.update(attention=False, note="no attention/tokens: not a ViT (no blocks[i].attn); landscape only", layers=None)
        return result, None
    distance = means.mean("attention_distance")  # [depth, heads]
    result.update(
        attention=True,
        note=None,
        layout={
            "depth": layout.depth,
            "num_heads": layout.num_heads,
            "num_prefix_tokens": layout.num_prefix,
            "grid": list(layout.grid),
            "patch_size": list(layout.patch_size),
            "dist_token": layout.has_dist_token,
        },
        embedding_patch_cosine=_number(means.mean("embedding_patch_cosine")),
        layers={
            "patch_cosine": [_number(v) for v in means.mean("patch_cosine")],
            "attention_std": [_number(v) for v in means.mean("attention_std")],
            "attention_distance": [[_number(v) for v in row] for row in distance],
            "attention_distance_mean": [_number(v) for v in distance.mean(dim=1)],
            "head_similarity": [_number(v) for v in means.mean("head_similarity")],
            "cls_dist_cosine": [_number(v) for v in means.mean("cls_dist_cosine")] if layout.has_dist_token else None,
        },
    )
    return result, means.mean("attention_maps").float()
