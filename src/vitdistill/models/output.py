"""The typed result of a model's forward pass, whatever the architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

HEADS = ("cls", "dist", "mean")


@dataclass
class ModelOutput:
    """Class-head logits, distillation-head logits when the model has that head, and tokens.

    ``tokens`` is the final normalised token sequence ``[B, prefix + N, D]`` of a ViT (None for
    CNNs). Evaluation of a two-head model uses the mean of the two heads' logits.
    """

    logits: torch.Tensor
    dist_logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

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
