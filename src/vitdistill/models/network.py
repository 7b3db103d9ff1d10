"""Build timm models by name and wrap them with a uniform typed forward (:class:`VisionModel`);
rebuild exported ones. Weight files are :mod:`vitdistill.models.weights`."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, UserError
from . import convnet, lvvit  # noqa: F401  (register our CNNs and LV-ViT in timm)
from .init import truncated_init
from .output import EVAL_HEADS, ModelOutput, TokenMix
from .spec import ModelSpec
from .stems import SMALL_STEM
from .weights import EXTRA_PREFIX, load_weights, read_spec, resolve_export


def is_vit(net: nn.Module) -> bool:
    """A token model with timm's ViT interface (tokens, prefix tokens, intermediates)."""
    return all(hasattr(net, a) for a in ("blocks", "num_prefix_tokens", "forward_features", "forward_intermediates"))


class VisionModel(nn.Module):
    """A timm model with a uniform forward: :class:`ModelOutput` for any architecture.

    DeiT-style distilled ViTs (a ``head_dist``) give both heads' logits in training and in
    evaluation (timm's own forward averages them in eval mode, hiding each head's accuracy).
    ViTs also give their tokens, per-token logits (a model's own ``aux_head``, or ours when
    ``spec.token_head``), and the patch tokens of the blocks in ``capture_blocks``.
    """

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.has_dist_head = hasattr(backbone, "head_dist")
        self.is_vit = is_vit(backbone)
        self.capture_blocks: tuple[int, ...] = ()
        self.bn_frozen = False
        self.token_head = None
        if spec.token_head and getattr(backbone, "aux_head", None) is None:
            if not self.is_vit:
                raise UserError(f"model.token_head: {spec.name} has no patch tokens")
            self.token_head = nn.Linear(backbone.num_features, spec.num_classes)
        if spec.eval_head not in EVAL_HEADS:
            raise ConfigError("model.eval_head", f"expected one of {', '.join(EVAL_HEADS)}, got {spec.eval_head!r}")
        if spec.eval_head == "lvvit_aux" and not self.has_token_logits:
            raise ConfigError(
                "model.eval_head", f"lvvit_aux adds the per-token head's logits, but {spec.name} has none: set model.token_head: true"
            )

    @property
    def has_token_logits(self) -> bool:
        return self.token_head is not None or getattr(self.backbone, "aux_head", None) is not None

    def capture(self, blocks: set[int]) -> None:
        """Also return the patch tokens output by these blocks (negative: from the end)."""
        if blocks and not self.is_vit:
            raise UserError(f"the objective needs block outputs, but {self.spec.name} is not a vision transformer")
        depth = len(self.backbone.blocks) if self.is_vit else 0
        self.capture_blocks = tuple(sorted({b % depth for b in blocks})) if blocks else ()

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """The patch-token grid ``(rows, columns)`` of a ViT, None for other models."""
        grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
        return tuple(grid) if self.is_vit and grid is not None else None

    def _mixed_tokens(self, x: torch.Tensor, mix: TokenMix) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """timm's ``forward_features`` with MixToken between patch embedding and position
        embedding (timm has no hook there). Used only with MixToken; tested to equal
        ``forward_features`` when nothing is mixed."""
        net = self.backbone
        t = net.patch_embed(x)
        if t.dim() == 4:  # NHWC patch grids (dynamic_img_size models): mix in raster order, keep the grid
            grid = t
            t = t.flatten(1, 2)
            t = torch.where(mix.mask[..., None], t[mix.partner], t).view_as(grid)
        else:
            t = torch.where(mix.mask[..., None], t[mix.partner], t)
        t = net._pos_embed(t)
        t = getattr(net, "patch_drop", nn.Identity())(t)
        t = getattr(net, "norm_pre", nn.Identity())(t)
        block_tokens = {}
        for i, block in enumerate(net.blocks):
            t = block(t)
            if i in self.capture_blocks:
                block_tokens[i] = t[:, net.num_prefix_tokens :]
        return net.norm(t), block_tokens

    def forward(self, x: torch.Tensor, token_mix: TokenMix | None = None) -> ModelOutput:
        net = self.backbone
        if not self.is_vit:
            if token_mix is not None:
                raise UserError(f"MixToken needs a vision transformer; {self.spec.name} is not one")
            return ModelOutput(logits=net(x))
        block_tokens = {}
        if token_mix is not None:
            tokens, block_tokens = self._mixed_tokens(x, token_mix)
        elif self.capture_blocks:
            tokens, inter = net.forward_intermediates(x, indices=list(self.capture_blocks), norm=False, output_fmt="NLC")
            block_tokens = dict(zip(self.capture_blocks, inter))
        else:
            tokens = net.forward_features(x)
        return self._token_output(tokens, block_tokens, token_mix)

    def _token_output(self, tokens: torch.Tensor, block_tokens: dict[int, torch.Tensor], token_mix: TokenMix | None) -> ModelOutput:
        """The heads of a ViT from its final (normalised) token sequence."""
        net = self.backbone
        prefix = net.num_prefix_tokens
        if self.has_dist_head:
            logits = net.head(net.head_drop(tokens[:, 0]))
            dist_logits = net.head_dist(net.head_drop(tokens[:, 1]))
        else:
            logits, dist_logits = net.forward_head(tokens), None
        head = getattr(net, "aux_head", None) or self.token_head
        token_logits = head(tokens[:, prefix:]) if head is not None else None
        return ModelOutput(
            logits, dist_logits, tokens, prefix, token_logits, block_tokens, token_mix, self.spec.eval_head, self.pending_norm
        )

    @property
    def pending_norm(self) -> nn.Module | None:
        """A ViT's final norm when timm applies it only after pooling: ``fc_norm`` of an
        average-pooled model, whose ``norm`` is an identity (BEiT's default); None otherwise."""
        net = self.backbone
        fc = getattr(net, "fc_norm", None)
        if (
            self.is_vit
            and isinstance(getattr(net, "norm", None), nn.Identity)
            and isinstance(fc, nn.Module)
            and not isinstance(fc, nn.Identity)
        ):
            return fc
        return None

    @property
    def final_norm(self) -> nn.Module:
        """A ViT's final norm over each token's channels: ``norm``, or ``fc_norm`` where timm
        normalises after pooling (:attr:`pending_norm`)."""
        return self.pending_norm or getattr(self.backbone, "norm", None) or nn.Identity()

    def forward_with_features(
        self, x: torch.Tensor, layer: int, norm: bool = False
    ) -> tuple[ModelOutput, torch.Tensor, torch.Tensor | None]:
        """The usual output and, from the same pass, the feature map ``[B, C, H, W]`` output by
        stage (CNNs) or block (ViTs) ``layer`` of timm's ``forward_intermediates`` (negative:
        from the end), and a ViT's class token ``[B, C]`` at that block (None for models without
        one). A ViT's map is its patch tokens on their grid; other prefix tokens (distillation,
        registers) are dropped. ``norm``: a ViT's tokens go through its :attr:`final_norm` (the
        Feature-Distillation reference's ``PRED_FEAT_AFTERNORM``); a CNN's stages have no final
        norm over channels (its head normalises pooled features, if anything), so it is refused."""
        net = self.backbone
        if not hasattr(net, "forward_intermediates"):
            raise UserError(
                f"teacher: {self.spec.name} has no forward_intermediates (timm's feature API), so its feature maps cannot be read"
            )
        if norm and not self.is_vit:
            raise UserError(
                f"teacher.feature_norm: {self.spec.name} is not a vision transformer; its stages have no final norm over channels (set it false)"
            )
        extra = {"return_prefix_tokens": True} if self.is_vit and net.num_prefix_tokens else {}
        try:
            final, inter = net.forward_intermediates(x, indices=[layer], norm=False, output_fmt="NCHW", **extra)
        except AssertionError as err:  # timm's feature_take_indices: index out of range
            raise UserError(f"teacher.feature_layer: {layer} does not fit {self.spec.name} ({err})") from None
        features, prefix = inter[0] if extra else (inter[0], None)
        if not self.is_vit:
            return ModelOutput(logits=net.forward_head(final)), features, None
        if norm:  # a per-token norm: the same on the grid (channels last) as on the sequence
            features = self.final_norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            prefix = self.final_norm(prefix) if prefix is not None else None
        cls = prefix[:, 0] if prefix is not None and getattr(net, "cls_token", None) is not None else None
        return self._token_output(final, {}, None), features, cls

    def freeze_batchnorm(self) -> None:
        """Fix every BatchNorm (running statistics and affine parameters), for finetuning: it
        stays in eval mode whatever ``train()`` is called with."""
        self.bn_frozen = True
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> VisionModel:
        super().train(mode)
        if mode and self.bn_frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Weights outside the timm model (our token head), saved beside its state dict."""
        if self.token_head is None:
            return {}
        return {f"{EXTRA_PREFIX}token_head.{k}": v for k, v in self.token_head.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.token_head is not None:
            prefix = f"{EXTRA_PREFIX}token_head."
            self.token_head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in inner()} if inner else set()


def check_model_names(cfg) -> None:
    """``model.name`` and ``teacher.name`` are models timm (with ours registered) can build."""
    names = [("model.name", cfg.model.name)]
    if cfg.teacher is not None and cfg.teacher.name is not None:
        names.append(("teacher.name", cfg.teacher.name))
    for key, name in names:
        if not timm.is_model(name):
            close = timm.list_models(f"{name[: max(3, len(name) - 2)]}*")[:3] or difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(key, f"unknown timm model {name!r}{hint} (see timm.list_models())")


def has_own_token_head(name: str) -> bool:
    """A registered model whose per-token classifier is part of the architecture (LV-ViT's
    ``aux_head``, listed among the classifiers of its ``pretrained_cfg``)."""
    cfg = timm.get_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    return isinstance(classifier, (list, tuple)) and "aux_head" in classifier


def check_eval_head(cfg) -> None:
    """``model.eval_head: lvvit_aux`` reads a per-token head: the model has its own, or
    ``model.token_head`` adds one (checked here, before any data is read)."""
    model = cfg.model
    if model.eval_head == "lvvit_aux" and not model.token_head and timm.is_model(model.name) and not has_own_token_head(model.name):
        raise ConfigError(
            "model.eval_head", f"lvvit_aux adds the per-token head's logits, but {model.name} has none: set model.token_head: true"
        )


def patch_size_of(model: ModelConfig) -> int | None:
    """The patch size a ViT recipe asks for: ``model.patch_size``, ``model.kwargs.patch_size``, or
    the ``patch<N>`` in a timm name (``deit_tiny_patch16_224``); None for models without patches."""
    import re

    if model.patch_size is not None:
        return int(model.patch_size)
    if isinstance(model.kwargs.get("patch_size"), int):
        return int(model.kwargs["patch_size"])
    found = re.search(r"patch(\d+)", model.name)
    return int(found.group(1)) if found else None


def check_patch_grid(cfg) -> None:
    """Views (``augment.input_size``) and ``model.img_size`` tile into whole patches; else the
    last rows and columns of every image would never reach the model (timm's patch embedding
    drops them silently), so the recipe is refused before any data is read."""
    patch = patch_size_of(cfg.model)
    if not patch:
        return
    for key, size in (("augment.input_size", cfg.augment.input_size), ("model.img_size", cfg.model.img_size)):
        if size is not None and size % patch:
            lower, upper = size - size % patch, size - size % patch + patch
            raise ConfigError(
                key,
                f"{size} is not a multiple of the patch size {patch}: the last {size % patch} rows and columns of every "
                f"image would never reach the model; use {lower or upper} or {upper}",
            )


def create_backbone(spec: ModelSpec, drop_path: float = 0.0) -> nn.Module:
    kwargs = dict(spec.kwargs)
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    if not timm.is_model(spec.name):
        raise UserError(f"model: unknown timm model {spec.name!r} (see timm.list_models())")
    name = spec.name
    if spec.small_input_stem:  # the base model with our stem, registered in timm (same weight names)
        name, kwargs = SMALL_STEM, {"base": spec.name, **kwargs}
    try:
        return timm.create_model(name, pretrained=False, num_classes=spec.num_classes, **kwargs)
    except TypeError as err:
        raise UserError(
            f"model: {spec.name} rejected its arguments {sorted(kwargs)}: {err} (a recipe's model.kwargs merge into its base's: "
            "write `kwargs: {_replace: true, ...}` to replace them)"
        ) from None


def fixed_input_size(backbone: nn.Module) -> tuple[int, int] | None:
    """The only input size ``(height, width)`` a model accepts (timm ViTs built without
    ``dynamic_img_size``, LV-ViT), or None when it takes any size (CNNs, TinyViT)."""
    embed = getattr(backbone, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or not getattr(embed, "strict_img_size", True):
        return None
    return (int(size[0]), int(size[1]))


def check_input_size(backbone: nn.Module, size: int, key: str, name: str, fix: str) -> None:
    """A model that accepts one input size gets that size, or a one-line error naming ``key``."""
    fixed = fixed_input_size(backbone)
    if fixed is not None and fixed != (size, size):
        raise ConfigError(key, f"{size}x{size} views, but {name} takes {fixed[1]}x{fixed[0]} inputs; {fix}")


def build_model(cfg: ModelConfig, num_classes: int, **conventions) -> VisionModel:
    """A fresh model from the recipe (``pretrained=False``; ``init`` loads local weights)."""
    spec = ModelSpec.from_config(cfg, num_classes, **conventions)
    model = VisionModel(create_backbone(spec, cfg.drop_path), spec)
    if cfg.init_truncation is not None:
        if not model.is_vit:
            raise ConfigError("model.init_truncation", f"applies to vision transformers; {spec.name} is not one")
        truncated_init(model.backbone, cfg.init_truncation)
    if cfg.init:
        load_weights(model, cfg.init, "model.init")
    if cfg.freeze_bn:
        model.freeze_batchnorm()
    return model


def load_model(path: str | Path) -> VisionModel:
    """Rebuild an exported model (in eval mode) from its ``.safetensors`` file or run folder."""
    path = resolve_export(path)
    spec = read_spec(path)
    model = VisionModel(create_backbone(spec), spec)
    load_weights(model, path, str(path))
    return model.eval()
