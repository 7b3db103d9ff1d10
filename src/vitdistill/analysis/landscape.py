"""Loss landscape along filter-normalised random directions (Li et al. 2018, "Visualizing the
Loss Landscape of Neural Nets").

A direction ``d`` has one Gaussian tensor per parameter. For a weight with two or more
dimensions, each filter ``d_i`` (a slice along dimension 0: an output row of a linear layer, an
output channel of a convolution; the whole tensor for a ``[1, ...]`` token/position embedding) is
rescaled to the norm of the weight's filter: ``d_i <- d_i / ||d_i|| * ||w_i||``. Biases and other
1-D parameters (norm scales) are zero in the direction. The landscape is the cross-entropy of the
inference head and its top-1 at ``theta + alpha d1 (+ beta d2)`` on fixed evaluation batches;
the weights are restored bit for bit afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.output import ModelOutput
from ..progress import progress

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (normalised images, labels) pairs
Direction = dict[str, torch.Tensor]


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> Direction:
    """A random direction with the shape of every parameter of ``model``, filter-normalised.

    Drawn on the CPU from ``generator`` (the same seed gives the same direction on any device),
    then moved to each parameter's device and dtype.
    """
    direction: Direction = {}
    for name, p in model.named_parameters():
        w = p.detach()
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        w_norm = w.float().flatten(1).norm(dim=1).cpu()
        d_norm = d.flatten(1).norm(dim=1)
        scale = (w_norm / d_norm.clamp_min(1e-10)).view(-1, *([1] * (w.dim() - 1)))
        direction[name] = (d * scale).to(device=w.device, dtype=w.dtype)
    return direction


def axis(span: float, steps: int) -> list[float]:
    """``steps`` evenly spaced points in ``[-span, span]``; exactly 0 in the middle when odd."""
    if steps < 2:
        raise UserError(f"analysis: the landscape needs at least 2 steps per axis, got {steps}")
    if not span > 0:
        raise UserError(f"analysis: the landscape span must be positive, got {span}")
    half = (steps - 1) / 2
    return [span * (i - half) / half for i in range(steps)]


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Mean cross-entropy of the inference head (``out.inference()``) and its top-1 (%)."""
    loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    seen = 0
    for images, labels in batches:
        out = model(images)
        logits = (out.inference() if isinstance(out, ModelOutput) else out).float()
        loss += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        correct += (logits.argmax(dim=-1) == labels).sum().double().cpu()
        seen += int(labels.numel())
    if not seen:
        raise UserError("analysis: no images to evaluate the landscape on")
    return float(loss / seen), float(100.0 * correct / seen)


@torch.no_grad()
def _sweep(
    model: nn.Module, batches: Batches, points: list[tuple[float, float]], d1: Direction, d2: Direction | None, desc: str
) -> list[tuple[float, float]]:
    params = dict(model.named_parameters())
    origin = {name: p.detach().clone() for name, p in params.items()}
    was_training = model.training
    model.eval()
    results = []
    try:
        for alpha, beta in progress(points, total=len(points), desc=desc):
            for name, p in params.items():
                moved = origin[name] + alpha * d1[name]
                if d2 is not None:
                    moved = moved + beta * d2[name]
                p.copy_(moved)
            results.append(evaluate_batches(model, batches))
    finally:
        for name, p in params.items():
            p.copy_(origin[name])
        model.train(was_training)
    return results


def loss_landscape_1d(
    model: nn.Module, batches: Batches, alphas: Sequence[float], seed: int = 0, direction: Direction | None = None
) -> dict:
    """Loss and top-1 at ``theta + alpha d`` for each ``alpha``; ``d`` is
    :func:`filter_normalized_direction` from ``torch.Generator().manual_seed(seed)`` unless given.

    Returns ``{"alpha": [...], "loss": [...], "top1": [...]}``.
    """
    if direction is None:
        direction = filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    alphas = [float(a) for a in alphas]
    results = _sweep(model, batches, [(a, 0.0) for a in alphas], direction, None, "landscape 1-D")
    return {"alpha": alphas, "loss": [r[0] for r in results], "top1": [r[1] for r in results]}


def loss_landscape_2d(
    model: nn.Module,
    batches: Batches,
    alphas: Sequence[float],
    betas: Sequence[float],
    seed: int = 0,
    directions: tuple[Direction, Direction] | None = None,
) -> dict:
    """Loss and top-1 at ``theta + alpha d1 + beta d2`` on the grid ``alphas x betas``; ``d1``
    then ``d2`` are drawn from one generator seeded with ``seed`` unless given.

    Returns ``{"alpha": [...], "beta": [...], "loss": [[...]], "top1": [[...]]}`` with
    ``loss[i][j]`` at ``(alphas[i], betas[j])``.
    """
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = (filter_normalized_direction(model, generator), filter_normalized_direction(model, generator))
    alphas, betas = [float(a) for a in alphas], [float(b) for b in betas]
    points = [(a, b) for a in alphas for b in betas]
    results = _sweep(model, batches, points, directions[0], directions[1], "landscape 2-D")
    m = len(betas)
    return {
        "alpha": alphas,
        "beta": betas,
        "loss": [[results[i * m + j][0] for j in range(m)] for i in range(len(alphas))],
        "top1": [[results[i * m + j][1] for j in range(m)] for i in range(len(alphas))],
    }
