"""What rebuilds a trained model: its timm name and arguments and its data conventions."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import ModelConfig
from .adapt import adapt_kwargs


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
    def from_config(cls, cfg: ModelConfig, num_classes: int, **conventions) -> ModelSpec:
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
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        for key in ("mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)
