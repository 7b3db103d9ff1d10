"""The typed result of a model's forward pass, whatever the architecture."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError

HEADS = ("cls", "dist", "mean")
EVAL_HEADS = ("cls", "lvvit_aux")  # model.eval_head: how a trained model's inference logits are made
LVVIT_AUX_WEIGHT = 0.5  # LV-ViT's evaluation rule: x_cls + 0.5 * x_aux.max(1)[0] (reference tlt/models/lvvit.py)


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
    ``[B, N, D]`` output by the blocks the objective asked for (by block index). Evaluation uses
    :meth:`inference`: the mean of the two heads' logits for a two-head model, the class head
    otherwise, plus LV-ViT's token term when ``eval_head`` is ``lvvit_aux``.

    ``tokens`` have been through the model's ``norm``; average-pooled timm models (BEiT, ViTs
    with ``global_pool: avg``) make that an identity and normalise after pooling instead
    (``fc_norm``), given here as ``pending_norm``; :attr:`final_tokens` applies it.
    """

    logits: torch.Tensor
    dist_logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    num_prefix: int = 0
    token_logits: torch.Tensor | None = None
    block_tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    token_mix: TokenMix | None = None  # the MixToken the forward applied, if any
    eval_head: str = "cls"  # the model's evaluation rule (model.eval_head), read by inference()
    pending_norm: nn.Module | None = None  # the final norm the model applies after pooling, not yet to `tokens`

    @property
    def patch_tokens(self) -> torch.Tensor:
        """The final patch tokens ``[B, N, D]`` (prefix tokens removed)."""
        if self.tokens is None:
            raise UserError("the objective needs patch tokens, but the model is not a vision transformer")
        return self.tokens[:, self.num_prefix :]

    @property
    def final_tokens(self) -> torch.Tensor:
        """The whole sequence ``[B, prefix + N, D]`` after the model's final norm, whether timm
        applies it to every token (``norm``) or only after pooling (``fc_norm``)."""
        if self.tokens is None:
            raise UserError("the objective needs tokens, but the model is not a vision transformer")
        return self.tokens if self.pending_norm is None else self.pending_norm(self.tokens)

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

    def inference(self) -> torch.Tensor:
        """The logits a trained model is judged by (evaluation, exports, a teacher's predictions).

        ``eval_head: cls``: ``head("mean")`` (the class head, or the mean of the class and
        distillation heads). ``eval_head: lvvit_aux`` (LV-ViT's rule):
        ``head("mean") + 0.5 * max_i token_logits_i``, the per-token head's logits maximised over
        the N patch tokens class by class.
        """
        logits = self.head("mean")
        if self.eval_head == "cls":
            return logits
        if self.eval_head == "lvvit_aux":
            if self.token_logits is None:
                raise UserError("model.eval_head: lvvit_aux needs a per-token head (model.token_head: true, or an lvvit_* model)")
            return logits + LVVIT_AUX_WEIGHT * self.token_logits.amax(dim=1)
        raise ValueError(f"unknown eval_head {self.eval_head!r}; expected one of {EVAL_HEADS}")

    @property
    def heads(self) -> dict[str, torch.Tensor]:
        """Every head this output has, by name (what evaluation reports)."""
        if self.dist_logits is None:
            return {"cls": self.logits}
        return {"cls": self.logits, "dist": self.dist_logits, "mean": self.head("mean")}
