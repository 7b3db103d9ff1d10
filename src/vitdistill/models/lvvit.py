"""LV-ViT students (token labeling), registered in timm as ``lvvit_{tiny,small,medium}``.

Jiang et al. 2021, "All Tokens Matter: Token Labeling for Training Better Vision Transformers"
(arXiv 2104.10858). A DeiT-like ViT with three changes: a 4-layer convolutional patch embedding,
residual branches divided by ``skip_lam``, and an MLP ratio of 3. A per-token head ``aux_head``
classifies every patch token (for token labeling); the class head ``head`` reads the class token.

Architecture, from the reference code github.com/zihangJiang/TokenLabeling
(``tlt/models/lvvit.py`` factories ``lvvit_t/s/m``, ``models/layers.py`` ``PatchEmbed4_2``/``Block``):

============  =====  =====  =====  =========  ========  ============  ==============================
model         depth  width  heads  mlp ratio  skip_lam  patch embed   params at 224, 1000 classes
============  =====  =====  =====  =========  ========  ============  ==============================
lvvit_tiny    12     240    4      3.0        1.0       4_2 (64 ch)   8.53M (ours 8,534,720)
lvvit_small   16     384    6      3.0        2.0       4_2 (64 ch)   26.15M (ours 26,151,824)
lvvit_medium  20     512    8      3.0        2.0       4_2 (64 ch)   55.83M (ours 55,830,544)
============  =====  =====  =====  =========  ========  ============  ==============================

All use ``patch_size=16``, ``qkv_bias=False`` and LayerNorm. The parameter counts quoted are the
reference README's model table (S 26.15M and M 55.83M in the README of June 2021; T 8.53M in its
later table, which added LV-ViT-T; the paper's abstract gives "26M" for S); they include
``aux_head``, as ours do. (LV-ViT-L, 24 x 768, ``skip_lam=3``, a 128-channel
stem, is ``LVViT(embed_dim=768, depth=24, num_heads=12, skip_lam=3, stem_width=128)``; it is not
registered.) Parameter and buffer names follow the reference, so its state dicts load as they are.

Forward order (what a caller re-implementing MixToken runs step by step)::

    x = model.patch_embed(images)   # [B, N, D], N = grid_size[0] * grid_size[1] patches in raster order
    # (MixToken goes here: x.view(B, *grid_size, D), swap a box of tokens between images)
    x = model._pos_embed(x)         # prepend the class token, add pos_embed, pos_drop -> [B, 1 + N, D]
    x = model.blocks(x)
    x = model.norm(x)               # = forward_features(images)
    logits = model.forward_head(x)  # head(head_drop(x[:, 0]))
    token_logits = model.aux_head(x[:, 1:])

Differences from the reference: ``forward`` returns the class head's logits only, in training
and evaluation (the reference's eval forward adds ``0.5 * aux_head(tokens).max(1)``: built with
``eval_aux_weight=0.5``, ours does too in eval mode, which is what ``vitdistill export`` writes for a
run trained with ``model.eval_head: lvvit_aux``; the reference's training forward does MixToken
itself, ours leaves it to vitdistill); dropout arguments follow timm's ViT (``drop_rate`` is
the classifier dropout, ``pos_drop_rate``/``proj_drop_rate``/``attn_drop_rate`` the others, where
the reference's one ``drop_rate`` is position + projection dropout).

Input size: like timm's ViT, the input must have the model's ``img_size`` unless the model is built
with ``dynamic_img_size=True``; then ``patch_embed`` returns an ``[B, H, W, D]`` grid and the
position embedding is resampled (bicubic, timm's ``resample_abs_pos_embed``) to the input's grid.

timm's model contract: each model is registered with a complete ``pretrained_cfg``
(``generate_default_cfgs``, no weights: ``pretrained=True`` needs
``pretrained_cfg_overlay=dict(file=...)``) and built by ``build_model_with_cfg``, so
``features_only=True`` (timm's ``FeatureGetterNet`` over ``forward_intermediates``),
``set_grad_checkpointing``, torch.fx tracing and TorchScript work as for timm's own ViTs.
Because ``forward`` does not use ``aux_head``, timm's generic backward test (every parameter gets
a gradient from ``forward``) fails on the default models, and DDP outside vitdistill would need
``find_unused_parameters``; ``aux_head=False`` builds the inference model without it, which is
what ``vitdistill export`` writes.
"""

from collections.abc import Callable
from typing import Final

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, _assert, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models.vision_transformer import Attention  # here in every timm 1.0.x (timm.layers only from 1.0.16)
from torch import nn

from .weights import unwrap_state_dict


def _pair_even(value, name: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in to_2tuple(value))
    if any(v < 2 or v % 2 for v in pair):
        raise ValueError(f"LV-ViT {name} must be an even number >= 2 (the stem halves the image, then a {name}/2 projection), got {value}")
    return pair  # type: ignore[return-value]


class ConvPatchEmbed(nn.Module):
    """The reference's ``PatchEmbed4_2``: ``conv7x7/2-BN-ReLU, [conv3x3-BN-ReLU] x 2`` at
    ``stem_width`` channels, then a ``patch_size/2`` convolution (kernel = stride) to ``embed_dim``.
    Total stride ``patch_size``. Returns ``[B, N, D]`` tokens in raster order, or the ``[B, H, W, D]``
    grid with ``dynamic_img_size`` (then any input size is accepted, as timm's ``PatchEmbed``)."""

    dynamic_img_size: Final[bool]

    def __init__(
        self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, stem_width: int = 64, dynamic_img_size: bool = False
    ):
        super().__init__()
        self.dynamic_img_size = dynamic_img_size
        self.strict_img_size = not dynamic_img_size  # read by timm (fixed-size trait)
        self.patch_size = _pair_even(patch_size, "patch_size")
        self.img_size = tuple(int(v) for v in to_2tuple(img_size))
        half = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        # conv1 (k7, s2, p3) gives ceil(H/2) rows; the projection floors by patch_size/2
        self.grid_size = tuple(((s + 1) // 2) // h for s, h in zip(self.img_size, half))
        if min(self.grid_size) < 1:
            raise ValueError(f"LV-ViT img_size {img_size} is smaller than patch_size {patch_size}")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem_width, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_width)
        self.conv3 = nn.Conv2d(stem_width, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_width)
        self.proj = nn.Conv2d(stem_width, embed_dim, kernel_size=half, stride=half)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(((s + 1) // 2) // (p // 2) for s, p in zip(img_size, self.patch_size))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size:  # timm's _assert: traceable by torch.fx, scriptable
            H, W = x.shape[-2], x.shape[-1]
            _assert(
                H == self.img_size[0],
                f"LV-ViT: input height {H} differs from the model's img_size {self.img_size} (or use dynamic_img_size=True)",
            )
            _assert(
                W == self.img_size[1],
                f"LV-ViT: input width {W} differs from the model's img_size {self.img_size} (or use dynamic_img_size=True)",
            )
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.proj(x)
        if self.dynamic_img_size:
            return x.permute(0, 2, 3, 1)  # NHWC, as timm's PatchEmbed with dynamic_img_size
        return x.flatten(2).transpose(1, 2)


class LVViTBlock(nn.Module):
    """Pre-norm transformer block with scaled residuals:
    ``x + drop_path(attn(norm1(x))) / skip_lam``, then ``x + drop_path(mlp(norm2(x))) / skip_lam``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        skip_lam: float = 1.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        return x


class LVViT(nn.Module):
    """LV-ViT with timm's ViT interface (``blocks``, ``num_prefix_tokens``, ``forward_features``,
    ``forward_head``, ``forward_intermediates``, ``group_matcher``...). See the module docstring."""

    dynamic_img_size: Final[bool]

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        skip_lam: float = 1.0,
        stem_width: int = 64,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        dynamic_img_size: bool = False,
        aux_head: bool = True,
        eval_aux_weight: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("", "token", "avg"):
            raise ValueError(f"LV-ViT global_pool must be '', 'token' or 'avg', got {global_pool!r}")
        if embed_dim % num_heads:
            raise ValueError(f"LV-ViT embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        norm_layer = norm_layer or nn.LayerNorm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.skip_lam = skip_lam
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size

        self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim, stem_width, dynamic_img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # linear stochastic depth
        self.blocks = nn.Sequential(
            *[
                LVViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, skip_lam, proj_drop_rate, attn_drop_rate, dpr[i], norm_layer)
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # The per-token head (token labeling) is not used by forward; aux_head=False leaves it out
        # (what an export for inference holds: timm then finds every parameter used).
        self.aux_head = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) if aux_head else None
        # eval mode: logits + eval_aux_weight * max over tokens of aux_head (the reference's 0.5)
        self.eval_aux_weight = float(eval_aux_weight)
        if self.eval_aux_weight and self.aux_head is None:
            raise ValueError("LV-ViT eval_aux_weight reads the per-token head: build it with aux_head=True")

        # timm's feature metadata: every block's output, at the patch grid's stride
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [{"module": f"blocks.{i}", "num_chs": embed_dim, "reduction": reduction} for i in range(depth)]

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^cls_token|pos_embed|patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class (and per-token) heads for ``num_classes`` (0: identity, features out)."""
        if global_pool is not None:
            if global_pool not in ("", "token", "avg"):
                raise ValueError(f"LV-ViT global_pool must be '', 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.cls_token
        for name in ("head", "aux_head") if self.aux_head is not None else ("head",):
            layer = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()
            if isinstance(layer, nn.Linear):
                self._init_weights(layer)
            setattr(self, name, layer.train(self.training))

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` patch tokens (or an ``[B, H, W, D]`` grid, ``dynamic_img_size``) ->
        ``[B, 1 + N, D]``: class token first, plus position embedding (resampled to the grid)."""
        if self.dynamic_img_size:  # a Python flag, not a tensor property: torch.fx can trace it
            B, H, W, C = x.shape
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, new_size=[H, W], old_size=list(self.patch_embed.grid_size), num_prefix_tokens=1
            )
            x = x.reshape(B, H * W, C)
        else:
            pos_embed = self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final normalised tokens ``[B, 1 + N, D]`` (class token first)."""
        x = self._pos_embed(self.patch_embed(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        logits = self.forward_head(x)
        if self.aux_head is not None:  # its own test: TorchScript prunes the branch when aux_head is None
            if self.eval_aux_weight != 0.0 and not self.training:
                # LV-ViT's evaluation rule (reference: x_cls + 0.5 * x_aux.max(1)[0])
                logits = logits + self.eval_aux_weight * self.aux_head(x[:, self.num_prefix_tokens :]).amax(dim=1)
        return logits

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ):
        """As timm's ``VisionTransformer.forward_intermediates``: the outputs of blocks ``indices``
        (list of indices, negative from the end, or an int: the last n; None: all), patch tokens
        only (``[B, N, D]`` for 'NLC', ``[B, D, H, W]`` for 'NCHW'; paired with the ``[B, 1, D]``
        class token when ``return_prefix_tokens``), through the final norm when ``norm``.
        Returns ``(norm(last block output), intermediates)``, only the intermediates when
        ``intermediates_only``, or timm's dict when ``output_dict``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._pos_embed(self.patch_embed(x))
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in intermediates]
        intermediates = [y[:, n:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: LVViT) -> dict[str, torch.Tensor]:
    """Weights for ``model`` from a state dict trained at another input or patch grid: the position
    embedding is resampled to the model's grid (as timm does for its ViTs); the reference's
    training checkpoints are unwrapped (:func:`~vitdistill.models.weights.unwrap_state_dict`)."""
    state_dict = unwrap_state_dict(state_dict)
    if model.aux_head is None:  # an inference-only model: the per-token head stays behind
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("aux_head.")}
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=1)
    return state_dict


def _cfg(**kwargs) -> dict:
    """Every key timm's pretrained configs carry. No weights are published: ``url`` is empty, so
    ``pretrained=True`` needs ``pretrained_cfg_overlay=dict(file=...)`` or a local-dir export."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,  # a ViT: features are tokens, not a pooled grid
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,  # unless built with dynamic_img_size=True
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1",
        "classifier": ("head", "aux_head"),  # both classify: both are reset for another class count
        "license": "apache-2.0",
        "paper_ids": "arXiv:2104.10858",
        "paper_name": "All Tokens Matter: Token Labeling for Training Better Vision Transformers",
        "origin_url": "https://github.com/zihangJiang/TokenLabeling",
        **kwargs,
    }


# Read by timm's register_model (below) from this module: the models' pretrained_cfg.
default_cfgs = generate_default_cfgs({"lvvit_tiny": _cfg(), "lvvit_small": _cfg(), "lvvit_medium": _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> LVViT:
    """timm's builder: pretrained_cfg, weights from a file when asked, ``features_only`` wrapper."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        LVViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **kwargs,
    )


@register_model
def lvvit_tiny(pretrained=False, **kwargs) -> LVViT:
    """LV-ViT-T: 12 blocks x 240, 4 heads, skip_lam 1 (8.53M parameters at 224, 1000 classes)."""
    return _create(
        "lvvit_tiny",
        pretrained,
        **{"patch_size": 16, "embed_dim": 240, "depth": 12, "num_heads": 4, "mlp_ratio": 3.0, "skip_lam": 1.0, **kwargs},
    )


@register_model
def lvvit_small(pretrained=False, **kwargs) -> LVViT:
    """LV-ViT-S: 16 blocks x 384, 6 heads, skip_lam 2 (26.15M parameters)."""
    return _create(
        "lvvit_small",
        pretrained,
        **{"patch_size": 16, "embed_dim": 384, "depth": 16, "num_heads": 6, "mlp_ratio": 3.0, "skip_lam": 2.0, **kwargs},
    )


@register_model
def lvvit_medium(pretrained=False, **kwargs) -> LVViT:
    """LV-ViT-M: 20 blocks x 512, 8 heads, skip_lam 2 (55.83M parameters)."""
    return _create(
        "lvvit_medium",
        pretrained,
        **{"patch_size": 16, "embed_dim": 512, "depth": 20, "num_heads": 8, "mlp_ratio": 3.0, "skip_lam": 2.0, **kwargs},
    )
