"""The typed recipe: what a YAML recipe may contain, with defaults and value checks.

A recipe is one :class:`RunConfig`. Every section is a dataclass; :func:`parse_dataclass`
turns the YAML mapping into it and rejects unknown keys. Objective terms are a list of flat
mappings (``{term: kd_soft, weight: 0.5, tau: 3.0}``) whose extra keys are validated by the
term's own parameter dataclass (see :mod:`vitdistill.objective`).

The checks here need nothing above the config layer. Those that need a registry above it (term
names and parameters, timm model names, evaluation heads, optimizers, RandAugment policies) are
made by :mod:`vitdistill.validate`, which loads recipes.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError, RecipeWarning
from .parsing import parse_duration

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class DataConfig:
    """Where images come from. See :mod:`vitdistill.data.source`."""

    source: Literal["imagefolder", "cifar10", "cifar100", "digits", "hf"] = "imagefolder"
    root: str | None = (
        None  # folder, or a .tar/.tar.gz/.zip of one (unpacked once into cache_dir); hf: a saved DatasetDict or parquet folder
    )
    # hf: the columns of images (an Image feature) and labels (ClassLabel names become the classes);
    # None means "image" / "label" (None, not the names, so that earlier runs still resume)
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    train_limit: int | None = None  # use a class-balanced slice of this many images (quick runs)
    eval_limit: int | None = None
    source_size: int | None = None  # variable-sized images: short side in pixels (aspect kept, see max_aspect)
    max_aspect: float = 4 / 3  # long side kept up to this times the short side (centre-cropped beyond)
    cache_dir: str | None = None  # decoded-array cache; default $VITDISTILL_CACHE or ~/.cache/vitdistill
    # file-based sources: records stored decoded (raw), as JPEG decoded per batch, or auto (raw when small)
    records: Literal["auto", "raw", "jpeg"] = "auto"
    jpeg_quality: int = 90  # JPEG records' quality (FFCV's default)
    decoder: Literal["auto", "cpu", "cuda"] = "auto"  # where JPEG records are decoded (auto: CUDA when there is a GPU)
    download: bool = False  # torchvision CIFAR only
    placement: Literal["auto", "device", "host"] = "auto"  # decoded images on the GPU, or host + prefetch
    workers: int = 4  # threads that gather host-resident images ahead of the GPU
    augment_device: Literal["auto", "cpu"] = "auto"  # cpu: make the views on the CPU (same views), train on the GPU
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    on_corrupt: Literal["error", "skip"] = "error"  # an image that cannot be decoded: stop naming it, or leave it out (counted)
    allow_empty_classes: bool = False  # ImageFolder: keep a class folder without images as a class

    def validate(self, key: str) -> None:
        _check(self.workers >= 0, _join(key, "workers"), "must be >= 0")
        for name in ("train_limit", "eval_limit", "source_size"):
            value = getattr(self, name)
            _check(value is None or value > 0, _join(key, name), "must be positive")
        _check(all(s > 0 for s in self.std), _join(key, "std"), "must be positive")
        _check(1 <= self.jpeg_quality <= 100, _join(key, "jpeg_quality"), "must be between 1 and 100")
        _check(self.max_aspect >= 1, _join(key, "max_aspect"), "must be >= 1 (long side / short side)")
        if self.source == "imagefolder":
            _check(self.root is not None, _join(key, "root"), "imagefolder needs a root folder or archive")
        if self.source == "hf":
            _check(
                self.root is not None,
                _join(key, "root"),
                "hf needs a root: a dataset saved with save_to_disk, or a folder of parquet files",
            )


@dataclass
class AugmentConfig:
    """Training view and evaluation view. Every random choice is keyed by (seed, epoch, index)."""

    input_size: int = 224
    crop: Literal["rrc", "pad", "none"] = "rrc"  # random-resized-crop, pad-and-crop, or full image
    scale: tuple[float, float] = (0.08, 1.0)  # rrc area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # rrc aspect range
    pad: int = 4  # pad-and-crop padding (zeros), in source pixels
    hflip: float = 0.5
    rand_augment: str | None = None  # timm syntax, e.g. rand-m9-mstd0.5-inc1 (replaces color_jitter)
    color_jitter: float | None = None  # brightness/contrast/saturation strength, e.g. 0.4
    erase_prob: float = 0.0  # random erasing (timm's, mode pixel), after normalisation
    eval_crop_pct: float = 1.0  # evaluation: centre crop of this fraction, resized to input_size
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    compile: bool = False  # torch.compile the view function (fuses its many small ops; views equal to ~1e-6)
    repeats: int = 1  # repeated augmentation (DeiT): each epoch takes 1/repeats of the images, each in `repeats` views
    mix_prob: float = 1.0  # probability that a sample is mixed (when an alpha is > 0)
    switch_prob: float = 0.5  # probability of cutmix rather than mixup when both are on

    def validate(self, key: str) -> None:
        _check(self.input_size > 0, _join(key, "input_size"), "must be positive")
        _check(0 < self.scale[0] <= self.scale[1] <= 1, _join(key, "scale"), "needs 0 < min <= max <= 1")
        _check(0 < self.ratio[0] <= self.ratio[1], _join(key, "ratio"), "needs 0 < min <= max")
        _check(self.pad >= 0, _join(key, "pad"), "must be >= 0")
        _check(0 < self.eval_crop_pct <= 1, _join(key, "eval_crop_pct"), "must be in (0, 1]")
        for name in ("hflip", "mix_prob", "switch_prob", "erase_prob"):
            _check(0 <= getattr(self, name) <= 1, _join(key, name), "must be a probability in [0, 1]")
        for name in ("mixup_alpha", "cutmix_alpha"):
            _check(getattr(self, name) >= 0, _join(key, name), "must be >= 0")
        _check(self.color_jitter is None or self.color_jitter >= 0, _join(key, "color_jitter"), "must be >= 0")
        _check(self.repeats >= 1, _join(key, "repeats"), "must be >= 1")
        defaults = AugmentConfig()
        if self.crop != "rrc":
            for name in ("scale", "ratio"):
                if getattr(self, name) != getattr(defaults, name):
                    warnings.warn(
                        f"{_join(key, name)} has no effect with {_join(key, 'crop')}={self.crop} (it applies to crop: rrc)",
                        RecipeWarning,
                        stacklevel=2,
                    )


@dataclass
class ModelConfig:
    """A timm model (or one of ours registered in timm) built with ``pretrained=False``."""

    name: str = "deit_tiny_distilled_patch16_224"
    img_size: int | None = None  # ViTs: input resolution
    patch_size: int | None = None  # ViTs: patch size
    drop_path: float = 0.0
    small_input_stem: bool = False  # CNNs: stride-1 3x3 stem, no max-pool (for 32x32 inputs)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    init: str | None = None  # start from these weights (a vitdistill export or state dict)
    # ViTs: re-draw linear/conv weights, class token and position embedding from N(0, 0.02^2) truncated at
    # +-this many std, then BEiT's per-block rescaling (Feature-Distillation's student: 1.0, std ~0.0108); None: timm's
    init_truncation: float | None = None
    freeze_bn: bool = False  # finetuning: BatchNorm statistics and affine parameters fixed
    token_head: bool = False  # a linear classifier on every patch token (token labeling)
    # the logits a trained model is judged by (evaluation, exports): cls = the class head (the mean
    # of class and distillation heads for DeiT); lvvit_aux = that + 0.5 x max over tokens of the
    # per-token head's logits (LV-ViT's evaluation rule; needs a per-token head)
    eval_head: Literal["cls", "lvvit_aux"] = "cls"

    def validate(self, key: str) -> None:
        _check(0 <= self.drop_path < 1, _join(key, "drop_path"), "must be in [0, 1)")
        _check(self.init_truncation is None or self.init_truncation > 0, _join(key, "init_truncation"), "must be positive (in std)")


@dataclass
class TeacherConfig:
    """A frozen teacher: a vitdistill export (architecture read from it) or a timm name + weights,
    run online; or a teacher store written by ``vitdistill cache``, or label maps written by
    ``vitdistill labelmaps`` (then ``checkpoint``/``name``, when also given, must be the teacher
    that wrote them). An online teacher also gives feature maps (``feature_layer``) when a term
    asks for them.

    Each kind of source is a class in :mod:`vitdistill.targets` that owns its keys' rules (which
    keys choose it, which combinations are refused, which keys name files); they are registered
    from there (the config layer imports nothing above it). ``kind`` names a registered source
    directly, with its own parameters in ``params``."""

    kind: str | None = None  # a registered teacher source (None: chosen by the keys below)
    params: dict[str, Any] = field(default_factory=dict)  # that source's own parameters
    checkpoint: str | None = None  # model.safetensors exported by vitdistill, or its run folder
    name: str | None = None  # timm name, when the weights are a plain state dict
    weights: str | None = None  # .safetensors / .pth state dict for `name`
    store: str | None = None  # read the teacher's top-k predictions from this store instead
    k: int | None = None  # with `store`: the k the store must have
    label_maps: str | None = None  # dense score maps written by `vitdistill labelmaps` (token labeling)
    label_map_mode: Literal["topk_softmax", "zero_filled"] = "topk_softmax"  # how stored top-k become distributions
    small_input_stem: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None  # the teacher's own input normalisation
    std: tuple[float, float, float] | None = None
    input_size: int | None = None  # resize the student's view to this size for the teacher
    feature_layer: int | None = None  # feature terms: stage/block of forward_intermediates (None: the last; negative: from the end)
    # feature terms: a ViT teacher's tokens after its final norm (None: yes for ViTs, as the Feature-Distillation
    # reference; false: the raw block output). CNN stages have no final norm: true is refused for them.
    feature_norm: bool | None = None


@dataclass
class StoreConfig:
    """``vitdistill cache``: where and how to write the teacher's top-k predictions per epoch."""

    path: str | None = None  # the store folder
    k: int = 10  # classes kept per view (0: all)
    epochs: int | None = None  # epochs of views to store (default: optim.epochs)
    temperature: float = 1.0  # probabilities of softmax(Z_t / temperature)
    batch_size: int | None = None  # teacher batch (default: optim.batch_size)

    def validate(self, key: str) -> None:
        _check(self.k >= 0, _join(key, "k"), "must be >= 0 (0 keeps every class)")
        _check(self.epochs is None or self.epochs >= 1, _join(key, "epochs"), "must be >= 1")
        _check(self.temperature > 0, _join(key, "temperature"), "must be positive")


@dataclass
class LabelMapConfig:
    """``vitdistill labelmaps``: the teacher's classifier at every location of its last feature
    map, on every whole training image; top-k scores per location."""

    path: str | None = None  # the label-map folder
    k: int = 5
    batch_size: int | None = None  # teacher batch (default: optim.batch_size)

    def validate(self, key: str) -> None:
        _check(self.k >= 1, _join(key, "k"), "must be >= 1")


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine (timm). ``lr`` is for ``lr_base_batch`` images; it scales linearly."""

    epochs: int = 100
    batch_size: int = 256  # global batch (all processes together)
    opt: str = "adamw"
    lr: float = 5e-4
    lr_base_batch: int | None = 512  # None: use lr as given
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = None
    layer_decay: float | None = None  # e.g. 0.8: lr x 0.8 per block from the head down
    # with layer_decay: warmup_lr and min_lr scaled per block too (timm >= 0.9); false: shared by every block, only the
    # peak lr scaled (timm 0.4.12's scheduler, which the BEiT and Feature-Distillation references ran)
    layer_decay_scales_floor: bool = True
    decay_rel_pos_bias: bool = False  # weight decay on relative position bias tables (Swin/FD reference code); timm exempts them
    budget: str | None = None  # e.g. 8m, 90s, 1h30m: train as many steps as fit (optim.epochs is the upper bound)

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, _join(key, "epochs"), "must be >= 1")
        _check(self.batch_size >= 1, _join(key, "batch_size"), "must be >= 1")
        _check(self.lr > 0, _join(key, "lr"), "must be positive")
        _check(self.warmup_epochs >= 0, _join(key, "warmup_epochs"), "must be >= 0")
        _check(self.clip_grad is None or self.clip_grad > 0, _join(key, "clip_grad"), "must be positive")
        ld = self.layer_decay
        _check(ld is None or 0 < ld <= 1, _join(key, "layer_decay"), "must be in (0, 1]")
        if self.budget is not None:
            parse_duration(self.budget, _join(key, "budget"))


@dataclass
class EngineConfig:
    """How the loop runs; nothing here changes what is learned (except ema)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    ema_decay: float | None = None
    eval_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    eval_batch_size: int | None = None
    nan_policy: Literal["stop", "skip_step"] = "stop"  # a non-finite loss: stop the run, or skip that update
    max_skipped_steps: int = 10  # skip_step: stop after this many skipped updates
    # also checkpoint inside epochs: every N steps (an integer) or every period of time ("20m"); None: at epochs' ends only
    checkpoint_every: int | str | None = None

    def validate(self, key: str) -> None:
        _check(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            _join(key, "device"),
            f"expected auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _check(self.eval_every >= 1, _join(key, "eval_every"), "must be >= 1")
        _check(self.max_skipped_steps >= 0, _join(key, "max_skipped_steps"), "must be >= 0")
        every = self.checkpoint_every
        if isinstance(every, int) and not isinstance(every, bool):
            _check(every >= 1, _join(key, "checkpoint_every"), "must be >= 1 steps (or a time such as 20m)")
        elif every is not None:
            parse_duration(every, _join(key, "checkpoint_every"))
        e = self.ema_decay
        _check(e is None or 0 < e < 1, _join(key, "ema_decay"), "must be in (0, 1)")


@dataclass
class RunConfig:
    """One training run: a teacher's or a student's; the engine does not tell them apart."""

    name: str = "run"
    seed: int = 0
    output: str | None = None  # default: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig | None = None
    store: StoreConfig = field(default_factory=StoreConfig)
    labelmaps: LabelMapConfig = field(default_factory=LabelMapConfig)
    objective: list[dict[str, Any]] = field(default_factory=lambda: [{"term": "ce"}])
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, key: str) -> None:
        _check(len(self.objective) > 0, "objective", "needs at least one term")

    @property
    def output_dir(self) -> str:
        return self.output or f"runs/{self.name}"
