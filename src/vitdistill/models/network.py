"""Build timm models by name, wrap them with a uniform typed forward, save and load them.

An exported model is a ``.safetensors`` file holding the timm model's own state dict (so timm
users can load it directly) and, in its metadata, a :class:`ModelSpec`: everything needed to
rebuild it (architecture, class names, input size, normalisation).
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, UserError, short_reason
from . import convnet, lvvit  # noqa: F401  (register our CNNs and LV-ViT in timm)
from .adapt import adapt_kwargs
from .output import EVAL_HEADS, ModelOutput, TokenMix
from .relpos import per_block_rel_pos_bias
from .stems import SMALL_STEM

SPEC_KEY = "vitdistill"
EXTRA_PREFIX = "_vitdistill."  # keys of weights that are not the timm model's (e.g. our token head)


@dataclass
class ModelSpec:
    """What rebuilds a trained model: timm name and arguments plus its data conventions."""

    name: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    small_input_stem: bool = False
    classes: list[str] = field(default_factory=list)
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    token_head: bool = False  # a linear classifier on every patch token (token labeling)
    eval_head: str = "cls"  # model.eval_head: the evaluation rule (ModelOutput.inference)

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_classes: int, **conventions) -> "ModelSpec":
        kwargs = dict(cfg.kwargs)
        if cfg.img_size is not None:
            kwargs["img_size"] = cfg.img_size
        if cfg.patch_size is not None:
            kwargs["patch_size"] = cfg.patch_size
        kwargs = adapt_kwargs(cfg.name, kwargs)
        return cls(
            name=cfg.name,
            num_classes=num_classes,
            kwargs=kwargs,
            small_input_stem=cfg.small_input_stem,
            token_head=cfg.token_head,
            eval_head=cfg.eval_head,
            **conventions,
        )

    def to_json(self) -> str:
        data = asdict(self)
        if data["eval_head"] == "cls":  # the default is left out: specs written before it existed stay byte-identical
            del data["eval_head"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        data = json.loads(text)
        for key in ("mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


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
            raise ConfigError("model.eval_head", f"lvvit_aux adds the per-token head's logits, but {spec.name} has none: set model.token_head: true")

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
        return ModelOutput(logits, dist_logits, tokens, prefix, token_logits, block_tokens, token_mix, self.spec.eval_head)

    def forward_with_features(self, x: torch.Tensor, layer: int) -> tuple[ModelOutput, torch.Tensor]:
        """The usual output and, from the same pass, the feature map ``[B, C, H, W]`` output by
        stage (CNNs) or block (ViTs) ``layer`` of timm's ``forward_intermediates`` (negative:
        from the end). A ViT's map is its patch tokens on their grid, before the final norm;
        prefix tokens (class, distillation) are dropped."""
        net = self.backbone
        if not hasattr(net, "forward_intermediates"):
            raise UserError(f"teacher: {self.spec.name} has no forward_intermediates (timm's feature API), so its feature maps cannot be read")
        try:
            final, inter = net.forward_intermediates(x, indices=[layer], norm=False, output_fmt="NCHW")
        except AssertionError as err:  # timm's feature_take_indices: index out of range
            raise UserError(f"teacher.feature_layer: {layer} does not fit {self.spec.name} ({err})") from None
        features = inter[0]
        if self.is_vit:
            return self._token_output(final, {}, None), features
        return ModelOutput(logits=net.forward_head(final)), features

    def freeze_batchnorm(self) -> None:
        """Fix every BatchNorm (running statistics and affine parameters), for finetuning: it
        stays in eval mode whatever ``train()`` is called with."""
        self.bn_frozen = True
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VisionModel":
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
        raise ConfigError("model.eval_head", f"lvvit_aux adds the per-token head's logits, but {model.name} has none: set model.token_head: true")


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
        raise UserError(f"model: {spec.name} rejected its arguments {sorted(kwargs)}: {err}") from None


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
    if cfg.init:
        load_weights(model, cfg.init, "model.init")
    if cfg.freeze_bn:
        model.freeze_batchnorm()
    return model


@contextmanager
def damaged_file_errors(path: Path):
    """A weights file that cannot be parsed (truncated, overwritten) is one :class:`UserError`."""
    try:
        yield
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} cannot be read: the file is damaged or truncated ({short_reason(err)})") from None


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``state_dict``/``model`` entries and
    ``module.`` prefixes are unwrapped). ``key`` names the recipe key in errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{key}: {path} does not exist")
    if path.suffix == ".safetensors":
        with damaged_file_errors(path):
            state = load_file(str(path))
    else:
        with damaged_file_errors(path):
            state = torch.load(path, map_location="cpu", weights_only=True)
        for entry in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(entry), dict):
                state = state[entry]
    if not isinstance(state, dict):
        raise UserError(f"{key}: {path} does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_weights(model: VisionModel, path: str | Path, key: str) -> None:
    """Weights for a model (an export, run folder or plain state dict). The classifier may have
    another class count (finetuning on other classes): it is then left freshly initialised."""
    state = read_state_dict(path, key)
    model.load_extra_state(state)
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    own = model.backbone.state_dict()
    state = per_block_rel_pos_bias(state, own, key)
    classifier = {n for n, _ in model.backbone.named_parameters() if n.startswith(classifier_prefixes(model.backbone))}
    skipped = [k for k in state if k in classifier and k in own and state[k].shape != own[k].shape]
    if skipped:
        print(f"vitdistill: {key}: {path} has another class count; the classifier ({', '.join(skipped)}) starts fresh")
    load_backbone_weights(model.backbone, {k: v for k, v in state.items() if k not in skipped}, key, missing_ok=set(skipped))


def classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Prefixes of the classification heads' parameter names."""
    names = []
    for attr in ("head", "head_dist", "fc", "classifier", "aux_head"):
        if isinstance(getattr(backbone, attr, None), nn.Module):
            names.append(f"{attr}.")
    return tuple(names) or ("head.",)


def load_backbone_weights(backbone: nn.Module, path: str | Path | dict, key: str, missing_ok: set[str] = frozenset()) -> None:
    state = read_state_dict(path, key) if not isinstance(path, dict) else path
    source = "the state dict" if isinstance(path, dict) else path  # what the errors name
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches, e.g. another class count
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise UserError(f"{key}: {source} does not fit the model ({detail})") from None
    missing = [k for k in result.missing_keys if k not in missing_ok]
    if missing or result.unexpected_keys:
        missing, unexpected = missing[:3], result.unexpected_keys[:3]
        raise UserError(f"{key}: {source} does not fit the model (missing {missing}, unexpected {unexpected})")


def export_model(model: VisionModel, path: str | Path) -> None:
    """Write the backbone's weights and the spec to ``path`` (atomic: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in {**model.backbone.state_dict(), **model.extra_state()}.items()}
    try:
        save_file(state, str(tmp), metadata={SPEC_KEY: model.spec.to_json()})
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600; other run files follow the umask
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_spec(path: str | Path) -> ModelSpec:
    with damaged_file_errors(path), safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if SPEC_KEY not in meta:
        raise UserError(f"{path} is not a vitdistill export (no model spec in its metadata); use teacher.name + teacher.weights")
    return ModelSpec.from_json(meta[SPEC_KEY])


def resolve_export(path: str | Path) -> Path:
    """A run folder or an export file -> the export file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist (expected a model.safetensors written by vitdistill, or its run folder)")
    return path


def load_model(path: str | Path) -> VisionModel:
    """Rebuild an exported model (in eval mode) from its ``.safetensors`` file or run folder."""
    path = resolve_export(path)
    spec = read_spec(path)
    model = VisionModel(create_backbone(spec), spec)
    load_weights(model, path, str(path))
    return model.eval()
