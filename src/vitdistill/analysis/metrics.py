"""Token and attention statistics of a ViT: pure functions on tensors, batched, no Python per sample.

Shapes: ``tokens`` ``[B, T, D]`` (``T = P + N``: ``P`` prefix tokens -- class, distillation --
then ``N = gh * gw`` patch tokens in row-major order), ``attn`` ``[B, H, T, T]`` softmax
probabilities (rows are queries and sum to 1). Every "averaged over images" is a plain mean over
the batch, so a weighted mean of batch results by batch size is the mean over all images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def patch_cosine_similarity(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the patch tokens (prefix tokens excluded), a scalar.

    ``s = mean_b 1/(N(N-1)) sum_{i != j} cos(x_bi, x_bj)`` with ``x_bi`` the ``i``-th patch token of
    image ``b``. Computed as ``(||sum_i u_i||^2 - sum_i ||u_i||^2) / (N(N-1))`` with ``u_i = x_i /
    ||x_i||``. Identical tokens give 1, mutually orthogonal tokens 0 (over-smoothing shows as -> 1).
    """
    x = F.normalize(tokens[:, num_prefix:].float(), dim=-1, eps=EPS)
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"patch_cosine_similarity needs at least 2 patch tokens, got {n}")
    total = x.sum(dim=1).pow(2).sum(dim=-1)  # ||sum_i u_i||^2 = sum_{i,j} cos_ij
    diagonal = x.pow(2).sum(dim=(1, 2))  # sum_i ||u_i||^2 (= N unless a token is zero)
    return ((total - diagonal) / (n * (n - 1))).mean()


def attention_std(attn: torch.Tensor) -> torch.Tensor:
    """Spread of the attention rows, a scalar: ``mean_{b,h,q} std_k a_bhqk``.

    ``std_k`` is the population standard deviation over the ``T`` keys of one query's row
    (``sqrt(mean_k (a_qk - 1/T)^2)``, since a row's mean is ``1/T``); averaged over all queries
    (prefix tokens included), heads and images. Uniform attention gives 0; a one-hot row gives
    ``sqrt(T - 1) / T``.
    """
    return attn.float().std(dim=-1, correction=0).mean()


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def patch_distances(grid: int | tuple[int, int], patch_size: int | tuple[int, int], device=None) -> torch.Tensor:
    """``[N, N]`` Euclidean pixel distance between patch centres (row-major patch order).

    Patch ``(r, c)`` has its centre at ``((r + 1/2) ph, (c + 1/2) pw)`` pixels.
    """
    (gh, gw), (ph, pw) = _pair(grid), _pair(patch_size)
    rows = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) * ph
    cols = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) * pw
    centres = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cdist(centres, centres)


def attention_distance(attn: torch.Tensor, grid: int | tuple[int, int], patch_size: int | tuple[int, int], num_prefix: int) -> torch.Tensor:
    """Mean attention distance in pixels per head, ``[H]`` (Dosovitskiy et al. 2021, fig. 7).

    ``d_h = mean_{b, q} sum_k a~_bhqk ||p_q - p_k||`` over patch queries ``q`` and patch keys ``k``,
    where ``p`` is a patch centre in pixels and ``a~_qk = a_qk / sum_{k' patch} a_qk'`` is the
    attention renormalised over the patch keys (the prefix tokens have no position). Uniform
    attention gives the mean pairwise patch distance over all ``N^2`` ordered pairs, self pairs
    (distance 0) included; attention of each patch on itself only gives 0.
    """
    (gh, gw) = _pair(grid)
    n = gh * gw
    if attn.shape[-1] != num_prefix + n:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not fit {num_prefix} prefix tokens + a {gh}x{gw} patch grid")
    a = attn[:, :, num_prefix:, num_prefix:].float()
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(EPS)
    dist = patch_distances((gh, gw), patch_size, device=attn.device)
    return (a * dist).sum(dim=-1).mean(dim=(0, 2))


def head_similarity_matrix(attn: torch.Tensor) -> torch.Tensor:
    """``[H, H]``: ``S_hg = mean_b cos(vec(A_bh), vec(A_bg))``, the cosine similarity between the
    flattened ``T x T`` attention maps of heads ``h`` and ``g`` on the same image."""
    maps = F.normalize(attn.float().flatten(2), dim=-1, eps=EPS)  # [B, H, T*T]
    return (maps @ maps.transpose(1, 2)).mean(dim=0)


def head_similarity(attn: torch.Tensor) -> torch.Tensor:
    """Mean similarity between different heads of one layer, a scalar:
    ``mean_{h != g} S_hg`` with ``S`` from :func:`head_similarity_matrix`. Identical heads give 1;
    NaN for a single-head layer (no pair)."""
    s = head_similarity_matrix(attn)
    h = s.shape[0]
    if h < 2:
        return torch.tensor(float("nan"), device=attn.device)
    return (s.sum() - s.diagonal().sum()) / (h * (h - 1))


def mean_attention_map(attn: torch.Tensor) -> torch.Tensor:
    """``[T, T]``: ``M_qk = mean_{b,h} a_bhqk``, the attention averaged over images and heads."""
    return attn.float().mean(dim=(0, 1))


def token_cosine(tokens: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """``mean_b cos(x_bi, x_bj)``: cosine similarity of tokens ``i`` and ``j`` (e.g. 0 = class,
    1 = distillation), averaged over images, a scalar."""
    return F.cosine_similarity(tokens[:, i].float(), tokens[:, j].float(), dim=-1, eps=EPS).mean()


def logit_cosine(cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> torch.Tensor:
    """``mean_b cos(z_cls_b, z_dist_b)``: agreement of the class head's and the distillation head's
    logit vectors ``[B, C]``, averaged over images, a scalar."""
    return F.cosine_similarity(cls_logits.float(), dist_logits.float(), dim=-1, eps=EPS).mean()


def weight_cosine(w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """``cos(vec(W_a), vec(W_b))``: cosine similarity of two flattened weight matrices (the class
    head's and the distillation head's ``[C, D]``), a scalar."""
    return F.cosine_similarity(w_a.detach().float().flatten(), w_b.detach().float().flatten(), dim=0, eps=EPS)
