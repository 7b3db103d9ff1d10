"""Patch diversification (Gong et al. 2021, "Vision Transformers with Patch Diversification").

Three regularisers on the patch tokens of a ViT that keep deep layers from mapping every patch
to the same representation (over-smoothing). They read tokens, not the class heads: ``head`` is
ignored. Notation: ``h_i^(L)`` the final (normalised) patch tokens (``out.patch_tokens``),
``h_i^(1)`` the patch tokens output by the first block (``out.block_tokens[0]``), ``N`` patches.

Typical use, next to ``ce``::

    model: {token_head: true}          # the patch classifier g of patch_mix
    objective:
      - {term: ce, smoothing: 0.1}
      - {term: patch_cosine, weight: 0.1}
      - {term: patch_contrast, weight: 0.1}
      - {term: patch_mix, weight: 0.1}
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..augment.mixing import smooth_one_hot, token_own_share
from ..errors import ConfigError, UserError
from ..models import ModelOutput
from .base import Term, register_term
from .functional import soft_cross_entropy

EPS = 1e-6  # F.normalize: a zero token stays zero instead of dividing by zero


@contextmanager
def _fp32(device: torch.device):
    """Matmuls in fp32 even inside a bf16/fp16 autocast region."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _patches(out: ModelOutput, term: str, minimum: int = 2) -> torch.Tensor:
    """The final patch tokens ``[B, N, D]`` in fp32, with at least ``minimum`` patches."""
    tokens = out.patch_tokens.float()
    if tokens.shape[1] < minimum:
        raise UserError(f"{term} needs at least {minimum} patch tokens, the model gives {tokens.shape[1]}")
    return tokens


@register_term
class PatchCosine(Term):
    """Patch-wise cosine loss: the mean pairwise cosine similarity of the final patch tokens.

    ``L = mean_b 1/(N(N-1)) sum_{i != j} |cos(h_i^(L), h_j^(L))|`` with ``absolute: true`` (our
    default: its minimum, 0, is reached by mutually orthogonal tokens), or
    ``L = mean_b 1/(N(N-1)) sum_{i != j} cos(h_i^(L), h_j^(L))`` with ``absolute: false``, the
    signed form the paper writes (Gong et al. 2021, the patch-wise cosine similarity it both
    measures and minimises): its minimum, ``-1/(N-1)``, is reached by tokens that sum to zero, not
    by orthogonal ones. Identical tokens give 1 in both forms, mutually orthogonal tokens 0.
    """

    name = "patch_cosine"
    uses_head = False

    @dataclass
    class Params:
        absolute: bool = True

    def forward(self, out, batch, teacher):
        x = F.normalize(_patches(out, self.name), dim=-1, eps=EPS)
        n = x.shape[1]
        with _fp32(x.device):
            gram = x @ x.transpose(1, 2)  # [B, N, N], cos_ij
        if self.params.absolute:
            gram = gram.abs()
        off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
        return (off_diagonal / (n * (n - 1))).mean()


@register_term
class PatchContrast(Term):
    """Patch-wise contrastive loss: each final patch token stays closest to its own first-block
    token, against a mean of the final patch tokens.

    ``form: normalized`` (our default): with ``a_i = h_i^(1) / ||h_i^(1)||`` and
    ``z_i = h_i^(L) / ||h_i^(L)||``,
    ``L = mean_b -1/N sum_i log( exp(a_i.z_i / tau) / (exp(a_i.z_i / tau) + exp(a_i.zbar_i / tau)) )``
    with ``zbar_i = 1/(N-1) sum_{j != i} z_j`` (the mean of the *other* patches); i.e.
    ``mean_{b,i} softplus((a_i.zbar_i - a_i.z_i) / tau)``. Both sides L2-normalised keep the
    logits in ``[-1/tau, 1/tau]`` whatever the width and the token scale.

    ``form: paper`` (the equation of Gong et al. 2021): raw dot products and the mean over *all*
    patches, ``L = mean_b -1/N sum_i log( exp(h_i^(1).h_i^(L) / tau) / (exp(h_i^(1).h_i^(L) / tau)
    + exp(h_i^(1).hbar^(L) / tau)) )`` with ``hbar^(L) = 1/N sum_j h_j^(L)``; i.e.
    ``mean_{b,i} softplus((h_i^(1).hbar^(L) - h_i^(1).h_i^(L)) / tau)``. Its logits grow with the
    width and the tokens' norms (on the same random tensors the two forms differ several-fold).

    ``detach_first`` (default, as in the paper: "we stop the gradient on h^[1]"): the first-block
    tokens are a fixed anchor, so the loss moves the last layer, not the first block. The paper
    has no temperature (``tau = 1``).
    """

    name = "patch_contrast"
    needs_blocks = (0,)
    uses_head = False

    @dataclass
    class Params:
        tau: float = 1.0
        detach_first: bool = True
        form: Literal["normalized", "paper"] = "normalized"

        def validate(self, key: str) -> None:
            if self.tau <= 0:
                raise ConfigError(f"{key}.tau", "must be positive")

    def forward(self, out, batch, teacher):
        last = _patches(out, self.name)
        if 0 not in out.block_tokens:
            raise UserError(f"{self.name} needs the patch tokens of block 0, but the model did not return them (VisionModel.capture)")
        first = out.block_tokens[0].float()
        if first.shape != last.shape:
            raise UserError(f"{self.name}: block-0 tokens {tuple(first.shape)} do not match the final patch tokens {tuple(last.shape)}")
        if self.params.detach_first:
            first = first.detach()
        n = last.shape[1]
        with _fp32(last.device):
            if self.params.form == "paper":
                a, z = first, last
                negatives = z.mean(dim=1, keepdim=True)  # hbar: every patch, itself included, [B, 1, D]
            else:
                a = F.normalize(first, dim=-1, eps=EPS)
                z = F.normalize(last, dim=-1, eps=EPS)
                negatives = (z.sum(dim=1, keepdim=True) - z) / (n - 1)  # zbar_i, [B, N, D]
            positive = (a * z).sum(dim=-1)
            negative = (a * negatives).sum(dim=-1)
            return F.softplus((negative - positive) / self.params.tau).mean()


def patch_targets(batch, num_patches: int, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``[B, N, C]`` per-patch label distributions:
    ``w_bi * smooth(onehot(label_b)) + (1 - w_bi) * smooth(onehot(partner_label_b))`` with
    ``w`` from :func:`~vitdistill.augment.mixing.token_own_share` and ``smooth(y) = (1 - eps) y + eps / C``."""
    own = smooth_one_hot(batch.labels, num_classes, smoothing)
    other = smooth_one_hot(batch.partner_labels, num_classes, smoothing)
    w = token_own_share(batch.mix_boxes, batch.lam, batch.images.shape[-2:], num_patches)[:, :, None]
    return w * own[:, None, :] + (1.0 - w) * other[:, None, :]


@register_term
class PatchMix(Term):
    """Patch-wise mixing loss: a linear classifier ``g`` shared by all patches classifies every
    final patch token as the image its pixels came from.

    ``L = mean_b 1/N sum_i H(y_bi, psi(g(h_bi^(L))))`` with ``y_bi`` from
    :func:`patch_targets`: under CutMix the partner's label inside the box, the own label
    outside; under Mixup the mixed label; otherwise the own label (``smoothing`` as in ``ce``).

    ``g`` is the model's per-token head (``out.token_logits``): set ``model.token_head: true``
    (models with their own ``aux_head`` use that). It is built with the model, so it knows the
    token width, is optimised with the model from the first step, and is saved with it.
    """

    name = "patch_mix"
    needs_token_logits = True
    uses_head = False

    @dataclass
    class Params:
        smoothing: float = 0.0

        def validate(self, key: str) -> None:
            if not 0 <= self.smoothing < 1:
                raise ConfigError(f"{key}.smoothing", "must be in [0, 1)")

    def forward(self, out, batch, teacher):
        if out.token_logits is None:
            if out.tokens is None:
                raise UserError(f"{self.name} needs patch tokens, but the model is not a vision transformer")
            raise UserError(f"{self.name} classifies every patch token with the model's token head: set model.token_head: true")
        logits = out.token_logits  # [B, N, C]
        target = patch_targets(batch, logits.shape[1], self.num_classes, self.params.smoothing)
        return soft_cross_entropy(logits, target)
