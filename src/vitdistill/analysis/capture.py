"""Run a ViT on a batch and collect each block's output tokens and attention probabilities.

Forward hooks on ``blocks[i]`` (output tokens ``[B, T, D]``), on ``blocks[0]`` (its input: the
patch embedding with position embedding and prefix tokens) and on ``blocks[i].attn.attn_drop``
(the softmax attention ``[B, heads, T, T]``). timm's fused attention never calls ``attn_drop``,
so it is switched off for the duration and restored afterwards; the hooks are always removed.
Works for timm ``VisionTransformer`` and ``VisionTransformerDistilled``; any other model (a CNN)
has no :func:`vit_layout` and is reported as having no attention/tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..models.output import ModelOutput


@dataclass(frozen=True)
class ViTLayout:
    """Where things are in a ViT's token sequence: ``num_prefix`` prefix tokens (class, then
    distillation when ``has_dist_token``), then a row-major ``grid`` of patches of ``patch_size``
    pixels."""

    depth: int
    num_heads: int
    num_prefix: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    has_dist_token: bool

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def vit_layout(model: nn.Module) -> ViTLayout | None:
    """The layout of a timm ViT (a :class:`VisionModel` or its backbone), or None for a model
    without ``blocks[i].attn.attn_drop`` and a patch grid (CNNs and other architectures)."""
    net = _backbone(model)
    blocks = getattr(net, "blocks", None)
    embed = getattr(net, "patch_embed", None)
    if blocks is None or embed is None or not hasattr(net, "num_prefix_tokens"):
        return None
    try:
        blocks = list(blocks)
    except TypeError:
        return None
    attns = [getattr(b, "attn", None) for b in blocks]
    if not blocks or not all(a is not None and hasattr(a, "attn_drop") and hasattr(a, "num_heads") for a in attns):
        return None
    grid, patch = getattr(embed, "grid_size", None), getattr(embed, "patch_size", None)
    if grid is None or patch is None:
        return None
    heads = {int(a.num_heads) for a in attns}
    return ViTLayout(
        depth=len(blocks),
        num_heads=heads.pop() if len(heads) == 1 else max(heads),
        num_prefix=int(net.num_prefix_tokens),
        grid=(int(grid[0]), int(grid[1])),
        patch_size=(int(patch[0]), int(patch[1])),
        has_dist_token=getattr(net, "dist_token", None) is not None,
    )


@dataclass
class Capture:
    """One batch through a ViT: the model's output and, per block, tokens and attention."""

    output: ModelOutput
    embeddings: torch.Tensor  # [B, T, D] input of block 0 (patch embedding + position + prefix tokens)
    tokens: list[torch.Tensor]  # per block: output [B, T, D] (before the final norm)
    attention: list[torch.Tensor]  # per block: softmax attention [B, heads, T, T]
    layout: ViTLayout


@contextmanager
def unfused_attention(model: nn.Module):
    """Compute attention explicitly (through ``attn_drop``) inside the block; restore after."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for module, _ in saved:
            module.fused_attn = False
        yield
    finally:
        for module, value in saved:
            module.fused_attn = value


@torch.no_grad()
def capture(model: nn.Module, images: torch.Tensor) -> Capture:
    """Run ``model`` (a :class:`VisionModel` over a timm ViT) in eval mode on ``images`` and
    collect every block's output tokens and attention probabilities.

    Raises :class:`UserError` for a model without attention blocks (see :func:`vit_layout`).
    """
    layout = vit_layout(model)
    if layout is None:
        name = getattr(getattr(model, "spec", None), "name", type(_backbone(model)).__name__)
        raise UserError(f"analysis: {name} has no attention/tokens (not a ViT with blocks[i].attn)")
    blocks = list(_backbone(model).blocks)
    tokens: list[torch.Tensor | None] = [None] * len(blocks)
    attention: list[torch.Tensor | None] = [None] * len(blocks)
    embeddings: list[torch.Tensor] = []

    def keep(store: list, i: int):
        def hook(module, args, output):
            store[i] = output.detach()

        return hook

    handles = [blocks[0].register_forward_pre_hook(lambda module, args: embeddings.append(args[0].detach()))]
    was_training = model.training
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(keep(tokens, i)))
            handles.append(block.attn.attn_drop.register_forward_hook(keep(attention, i)))
        model.eval()
        with unfused_attention(model):
            output = model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not isinstance(output, ModelOutput):
        output = ModelOutput(logits=output)
    missing = [i for i in range(len(blocks)) if tokens[i] is None or attention[i] is None]
    if missing or not embeddings:
        raise UserError(f"analysis: blocks {missing} of the model were not run through their attention (unsupported ViT variant)")
    if tokens[-1].shape[1] != layout.num_tokens:
        raise UserError(
            f"analysis: the model has {tokens[-1].shape[1]} tokens, not {layout.num_prefix} prefix + "
            f"{layout.grid[0]}x{layout.grid[1]} patches (input size other than the model's?)"
        )
    return Capture(output=output, embeddings=embeddings[0], tokens=list(tokens), attention=list(attention), layout=layout)  # type: ignore[arg-type]
