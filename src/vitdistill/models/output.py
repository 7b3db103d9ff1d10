"""The typed result of a model's forward pass, whatever the architecture."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError

HEADS = ("cls", "dist", "mean")


@dataclass
class TokenMix:
    """MixToken: where ``mask`` ``[B, N]`` is True, sample b's patch token comes from the sample
    at batch position ``partner[b]`` (right after patch embedding)."""

    mask: torch.Tensor
    partner: torch.Tensor


@dataclass
class ModelOutput:
    """What a forward pass gives the objective.

    ``logits``: class head; ``dist_logits``: distillation head (DeiT) or None. ViTs also give
    ``tokens``, the final normalised sequence ``[B, prefix + N, D]`` (``num_prefix`` class /
    distillation tokens first, then the N patch tokens in raster order), ``token_logits``
    ``[B, N, C]`` when the model has a per-token head, and ``block_tokens``: the patch tokens
    ``[B, N, D]`` output by the blocks the objective asked for (by block index). Evaluation of a
    two-head model uses the mean of the two heads' logits.
    """

    logits: torch.Tensor
    dist_logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    num_prefix: int = 0
    token_logits: torch.Tensor | None = None
    block_tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    token_mix: TokenMix | None = None  # the MixToken the forward applied, if any

    @property
    def patch_tokens(self) -> torch.Tensor:
        """The final patch tokens ``[B, N, D]`` (prefix tokens removed)."""
        if self.tokens is None:
            raise UserError("the objective needs patch tokens, but the model is not a vision transformer")
        return self.tokens[:, self.num_prefix :]

    def head(self, name: str) -> torch.Tensor:
        """Logits of head ``cls``, ``dist`` or ``mean`` (= cls for one-head models)."""
        if name == "cls":
            return self.logits
        if name == "dist":
            if self.dist_logits is None:
                raise UserError("the objective asks for the distillation head, but the model has none")
            return self.dist_logits
        if name == "mean":
            return self.logits if self.dist_logits is None else (self.logits + self.dist_logits) / 2
        raise ValueError(f"unknown head {name!r}; expected one of {HEADS}")

    @property
    def heads(self) -> dict[str, torch.Tensor]:
        """Every head this output has, by name (what evaluation reports)."""
        if self.dist_logits is None:
            return {"cls": self.logits}
        return {"cls": self.logits, "dist": self.dist_logits, "mean": self.head("mean")}
