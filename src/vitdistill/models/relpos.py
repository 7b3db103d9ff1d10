"""Relative position bias: from one table shared by all blocks to one table per block.

timm's BEiT (``timm.models.beit.Beit``) has both layouts: ``use_shared_rel_pos_bias=True`` keeps
one table ``rel_pos_bias.relative_position_bias_table`` ``[(2H-1)(2W-1)+3, heads]`` added to
every block's attention (feature distillation pretrains with it); ``use_rel_pos_bias=True``
gives each block its own ``blocks.{i}.attn.relative_position_bias_table`` of the same shape
(fine-tuning). timm loads neither layout into the other, so we convert, as BEiT's own
fine-tuning code does: every block's table starts as an exact copy of the shared one.
"""

from __future__ import annotations

import torch

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
BLOCK_TABLE = "attn.relative_position_bias_table"  # blocks.{i}.attn.relative_position_bias_table


def per_block_rel_pos_bias(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], key: str = "model.init"
) -> dict[str, torch.Tensor]:
    """``state`` with its shared relative position bias table copied into each per-block table
    of the model whose state dict is ``own``; unchanged when ``state`` has no shared table or
    the model has one too. ``key`` names the recipe key in the message printed."""
    if SHARED_TABLE not in state or SHARED_TABLE in own:
        return state
    blocks = [k for k in own if k.startswith("blocks.") and k.endswith(BLOCK_TABLE) and k not in state]
    if not blocks:
        return state
    state = dict(state)
    shared = state.pop(SHARED_TABLE)
    for name in blocks:
        state[name] = shared.clone()
    print(f"vitdistill: {key}: the shared relative position bias table starts each of the {len(blocks)} blocks' own tables")
    return state
