"""RandAugment (timm's ``rand-...`` policies), batched, on any device, replayable per sample.

Why our own: timm's ops (``timm.data.auto_augment``) work on one PIL image at a time and draw
from Python's global ``random``, so they are neither batched, nor GPU-resident, nor replayable:
a sample's view would depend on the worker and on what was drawn before it. Here every random
number comes from :class:`~vitdistill.rng.CounterRNG` keyed by ``(epoch, sample index, stream)``,
and every op is a tensor op over the whole batch, selected per sample with ``torch.where`` (no
per-sample Python, no host-device syncs).

Semantics follow timm's ``RandAugment`` / ``AugmentOp`` and Pillow:

* each of ``num_ops`` slots picks one of the 15 transforms uniformly (with replacement), applies
  it with probability ``prob``, with magnitude ``gauss(magnitude, magnitude_std)`` (uniform in
  ``[0, magnitude]`` when the std is infinite) clipped to ``[0, magnitude_max]``;
* the level-to-argument maps and their random sign are timm's; arguments are computed in float64
  so ``int(...)`` truncations land where Python's do;
* the 8-bit ops (posterize, solarize, solarize-add, equalize, autocontrast) look at the pixel
  values rounded to 0..255 as Pillow sees them; equalize, autocontrast and posterize output the
  integer levels of Pillow's look-up tables;
* colour blends (color, contrast, brightness, sharpness) build Pillow's degenerate image
  (greyscale "L" with Pillow's fixed-point rounding, its rounded mean, the rounded SMOOTH filter
  with an untouched 1-pixel border) but do not truncate the blended result to an integer as
  ``Image.blend`` does: ours is Pillow's value before truncation (0 to 1 grey level above it);
* rotate / shear / translate are one ``grid_sample`` per slot with Pillow's affine convention
  (output pixel centres ``(x + 0.5, y + 0.5)`` mapped to source coordinates; a source point
  outside ``[0, W) x [0, H)`` takes the fill colour; inside, bilinear with edge clamping), again
  without Pillow's final truncation to an integer.

Deviations from timm: the geometric ops always interpolate bilinearly (timm picks bilinear or
bicubic at random unless an ``interpolation`` is given; Pillow's bicubic uses a = -1, which
``grid_sample`` does not offer), and ``PosterizeIncreasing`` at the top magnitude (0 bits kept)
gives a black image as older Pillow did; Pillow >= 10 raises ``ValueError`` there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError, UserError
from ..rng import CounterRNG

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the full argument range
TRANSLATE_PCT = 0.45  # timm's default translate_pct for the *Rel translations

RAND_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


@dataclass(frozen=True)
class RandAugmentSpec:
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    magnitude_max: float = 10.0
    prob: float = 0.5
    increasing: bool = True

    @property
    def transforms(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


# --------------------------------------------------------------------------------------------
# Parsing timm's config string
# --------------------------------------------------------------------------------------------

_INT_KEYS = {"m": "magnitude", "n": "num_ops", "mmax": "magnitude_max", "inc": "increasing"}
_FLOAT_KEYS = {"mstd": "magnitude_std", "p": "prob"}


def parse_rand_augment(text: str) -> RandAugmentSpec:
    """timm's syntax, e.g. 'rand-m9-mstd0.5-inc1'; a bad string raises vitdistill.errors.UserError with a one-line message.

    Sections after ``rand`` (any order): ``m`` magnitude (int), ``n`` ops per image (int),
    ``mstd`` magnitude std (float; above 100 means uniform in [0, m]), ``mmax`` magnitude clip
    (int; 0 means the default 10, as in timm), ``p`` probability of each op (float), ``inc``
    increasing-severity transforms (0/1). Unset keys take timm's defaults (m10, n2, mstd0, p0.5,
    inc0), not the dataclass defaults. Transform sets (``t...``) other than the default are not
    supported.
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError("rand_augment must be a non-empty string such as 'rand-m9-mstd0.5-inc1'")
    parts = text.strip().split("-")
    if parts[0] != "rand":
        raise UserError(f"rand_augment {text!r} must start with 'rand' (e.g. 'rand-m9-mstd0.5-inc1')")
    values: dict[str, float] = {"magnitude": 10, "num_ops": 2, "magnitude_std": 0.0, "magnitude_max": 10, "prob": 0.5, "increasing": 0}
    for part in parts[1:]:
        if part.startswith("t"):
            raise UserError(f"rand_augment {text!r}: transform sets ('{part}') are not supported, only timm's default set")
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if match is None:
            raise UserError(f"rand_augment {text!r}: section {part!r} is not <key><number> (keys: m, n, mstd, mmax, p, inc)")
        key, raw = match.groups()
        if key not in _INT_KEYS and key not in _FLOAT_KEYS:
            raise UserError(f"rand_augment {text!r}: unknown key {key!r} in {part!r} (keys: m, n, mstd, mmax, p, inc)")
        try:
            value = int(raw) if key in _INT_KEYS else float(raw)
        except ValueError:
            kind = "an integer" if key in _INT_KEYS else "a number"
            raise UserError(f"rand_augment {text!r}: {key!r} needs {kind}, got {raw!r}") from None
        values[_INT_KEYS.get(key) or _FLOAT_KEYS[key]] = value
    if not 0.0 <= values["prob"] <= 1.0:
        raise UserError(f"rand_augment {text!r}: p must be a probability in [0, 1]")
    if values["increasing"] not in (0, 1):
        raise UserError(f"rand_augment {text!r}: inc must be 0 or 1")
    std = float(values["magnitude_std"])
    return RandAugmentSpec(
        num_ops=int(values["num_ops"]),
        magnitude=float(values["magnitude"]),
        magnitude_std=math.inf if std > 100 else std,
        magnitude_max=float(values["magnitude_max"] or LEVEL_DENOM),  # timm: `magnitude_max or _LEVEL_DENOM`
        prob=float(values["prob"]),
        increasing=bool(values["increasing"]),
    )


# --------------------------------------------------------------------------------------------
# Level -> argument (timm's *_level_to_arg), batched: level and sign are [B] float64 tensors
# --------------------------------------------------------------------------------------------


def _fraction(level: torch.Tensor) -> torch.Tensor:
    """``level / 10`` correctly rounded, as Python computes it (so ``int(...)`` truncations agree).

    Dividing by a tensor, not a Python number: on CUDA, ``t / 10.0`` is computed as ``t * 0.1``,
    which can be one ulp off and flip ``int(level / 10 * 4)`` at a boundary.
    """
    return level / torch.full_like(level, LEVEL_DENOM)


def _rotate_arg(level, sign):
    return _fraction(level) * 30.0 * sign


def _enhance_arg(level, sign):
    return _fraction(level) * 1.8 + 0.1


def _enhance_increasing_arg(level, sign):
    return torch.clamp(1.0 + _fraction(level) * 0.9 * sign, min=0.1)


def _shear_arg(level, sign):
    return _fraction(level) * 0.3 * sign


def _translate_rel_arg(level, sign):
    return _fraction(level) * TRANSLATE_PCT * sign


def _posterize_arg(level, sign):
    return torch.floor(_fraction(level) * 4)


def _posterize_increasing_arg(level, sign):
    return 4 - _posterize_arg(level, sign)


def _solarize_arg(level, sign):
    return torch.clamp(torch.floor(_fraction(level) * 256), max=256)


def _solarize_increasing_arg(level, sign):
    return 256 - _solarize_arg(level, sign)


def _solarize_add_arg(level, sign):
    return torch.clamp(torch.floor(_fraction(level) * 110), max=128)


# --------------------------------------------------------------------------------------------
# Pixel ops on [B, 3, H, W] float images in the 0..255 domain; `arg` is a [B] tensor
# --------------------------------------------------------------------------------------------


def _per_sample(arg: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return arg.to(like.dtype).view(-1, 1, 1, 1)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit values Pillow would hold."""
    return torch.round(x).clamp_(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> "L": (19595 R + 38470 G + 7471 B + 0x8000) >> 16, as [B, 1, H, W]."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` clipped to 0..255, without the final truncation."""
    return (degenerate + _per_sample(factor, x) * (x - degenerate)).clamp_(0, 255)


def auto_contrast(x, arg=None):
    """Pillow's ``ImageOps.autocontrast`` (cutoff 0): a per-channel LUT ``int(ix * scale + offset)`` in float64."""
    b, c, h, w = x.shape
    q = _levels(x).to(torch.int64).reshape(b, c, h * w)
    lo = q.amin(dim=2, keepdim=True).to(torch.float64)
    hi = q.amax(dim=2, keepdim=True).to(torch.float64)
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp_min(1)  # not `255.0 / t`: torch computes that as 255 * (1 / t)
    offset = -lo * scale
    ramp = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = torch.floor(ramp * scale + offset).clamp_(0, 255)  # [B, C, 256], Pillow's double arithmetic
    out = lut.gather(2, q).view(b, c, h, w).to(x.dtype)
    return torch.where((hi > lo).view(b, c, 1, 1), out, x)


def equalize(x, arg=None):
    """Pillow's ``ImageOps.equalize``: per channel, ``lut[i] = (step // 2 + #pixels below i) // step``.

    ``step = (#pixels - #pixels at the highest level) // 255``; ``step == 0`` is the identity.
    """
    b, c, h, w = x.shape
    q = _levels(x).to(torch.int64).reshape(b, c, h * w)
    hist = torch.zeros(b, c, 256, dtype=torch.int64, device=x.device).scatter_add_(2, q, torch.ones_like(q))
    last = hist.gather(2, q.amax(dim=2, keepdim=True))  # count of the highest level present
    step = torch.div(h * w - last, 255, rounding_mode="floor")
    below = torch.cumsum(hist, dim=2) - hist  # pixels strictly below each level
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + below, step.clamp_min(1), rounding_mode="floor").clamp_(max=255)
    out = lut.gather(2, q).view(b, c, h, w).to(x.dtype)
    return torch.where((step > 0).view(b, c, 1, 1), out, x)


def invert(x, arg=None):
    return 255.0 - x


def posterize(x, bits):
    """Keep the ``bits`` high bits (0 bits: black, as Pillow's mask arithmetic gave before it rejected 0)."""
    bits = _per_sample(bits, x)
    size = torch.pow(2.0, 8.0 - bits.clamp(max=8))
    out = torch.floor(_levels(x) / size) * size
    return torch.where(bits >= 8, x, out)


def solarize(x, threshold):
    return torch.where(_levels(x) < _per_sample(threshold, x), x, 255.0 - x)


def solarize_add(x, add, threshold=128):
    return torch.where(_levels(x) < threshold, (x + _per_sample(add, x)).clamp_(max=255), x)


def color(x, factor):
    return _blend(_grey(x), x, factor)


def contrast(x, factor):
    total = _grey(x).sum(dim=(1, 2, 3), keepdim=True, dtype=torch.float64)
    mean = total / torch.full_like(total, x.shape[2] * x.shape[3])  # ImageStat's sum / count, correctly rounded
    return _blend(torch.floor(mean + 0.5).to(x.dtype), x, factor)  # Pillow: int(mean + 0.5)


def brightness(x, factor):
    return (x * _per_sample(factor, x)).clamp_(0, 255)


def sharpness(x, factor):
    """Blend with Pillow's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, border pixels kept).

    The 3x3 sum is written as shifted slices (not conv2d) so that a sample's result cannot
    depend on the batch it is in (conv backends pick algorithms by batch size).
    """
    h, w = x.shape[2], x.shape[3]
    rows = x[:, :, :, 0 : w - 2] + x[:, :, :, 1 : w - 1] + x[:, :, :, 2:w]
    box = rows[:, :, 0 : h - 2] + rows[:, :, 1 : h - 1] + rows[:, :, 2:h]  # 3x3 sums of the interior
    smooth = (box + 4.0 * x[:, :, 1 : h - 1, 1 : w - 1]) / 13.0
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5)  # Pillow rounds and keeps the border
    return _blend(degenerate, x, factor)


# --------------------------------------------------------------------------------------------
# Geometric ops as Pillow affine matrices (output pixel centre -> source point), [B, 2, 3]
# --------------------------------------------------------------------------------------------


def _affine(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, c], dim=-1), torch.stack([d, e, f], dim=-1)], dim=-2)


def rotate(degrees, height, width):
    """``Image.rotate(degrees)`` (counter-clockwise about the centre, same size)."""
    angle = -torch.deg2rad(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    return _affine(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def shear_x(factor, height, width):
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return _affine(one, factor, zero, zero, one, zero)


def shear_y(factor, height, width):
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return _affine(one, zero, zero, factor, one, zero)


def translate_x_rel(pct, height, width):
    one, zero = torch.ones_like(pct), torch.zeros_like(pct)
    return _affine(one, zero, pct * width, zero, one, zero)


def translate_y_rel(pct, height, width):
    one, zero = torch.ones_like(pct), torch.zeros_like(pct)
    return _affine(one, zero, zero, zero, one, pct * height)


def warp_affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's ``transform(AFFINE, resample=BILINEAR, fillcolor=fill)`` for a batch (no final truncation).

    ``matrix`` [B, 2, 3] maps an output pixel centre ``(x + 0.5, y + 0.5)`` to a source point in
    pixel-edge coordinates; ``fill`` is a [3] colour in the image's value range.
    """
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
    xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
    px, py = xs.view(1, 1, w), ys.view(1, h, 1)
    m = matrix.to(x.dtype).reshape(b, 6, 1, 1).unbind(1)  # elementwise, not a matmul: batch-invariant results
    sx = m[0] * px + m[1] * py + m[2]  # [B, H, W]
    sy = m[3] * px + m[4] * py + m[5]
    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)).unsqueeze(1)
    grid = torch.stack([2.0 * sx / w - 1.0, 2.0 * sy / h - 1.0], dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(inside, out, fill.to(x.dtype).view(1, -1, 1, 1))


# --------------------------------------------------------------------------------------------
# The op table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    level_to_arg: Callable | None  # (level [B], sign [B]) -> arg [B], float64
    pixel: Callable | None = None  # (x [B,3,H,W] in 0..255, arg [B]) -> same
    geometry: Callable | None = None  # (arg [B], H, W) -> Pillow affine matrices [B, 2, 3]


OPS: dict[str, _Op] = {
    "AutoContrast": _Op(None, pixel=auto_contrast),
    "Equalize": _Op(None, pixel=equalize),
    "Invert": _Op(None, pixel=invert),
    "Rotate": _Op(_rotate_arg, geometry=rotate),
    "Posterize": _Op(_posterize_arg, pixel=posterize),
    "PosterizeIncreasing": _Op(_posterize_increasing_arg, pixel=posterize),
    "Solarize": _Op(_solarize_arg, pixel=solarize),
    "SolarizeIncreasing": _Op(_solarize_increasing_arg, pixel=solarize),
    "SolarizeAdd": _Op(_solarize_add_arg, pixel=solarize_add),
    "Color": _Op(_enhance_arg, pixel=color),
    "ColorIncreasing": _Op(_enhance_increasing_arg, pixel=color),
    "Contrast": _Op(_enhance_arg, pixel=contrast),
    "ContrastIncreasing": _Op(_enhance_increasing_arg, pixel=contrast),
    "Brightness": _Op(_enhance_arg, pixel=brightness),
    "BrightnessIncreasing": _Op(_enhance_increasing_arg, pixel=brightness),
    "Sharpness": _Op(_enhance_arg, pixel=sharpness),
    "SharpnessIncreasing": _Op(_enhance_increasing_arg, pixel=sharpness),
    "ShearX": _Op(_shear_arg, geometry=shear_x),
    "ShearY": _Op(_shear_arg, geometry=shear_y),
    "TranslateXRel": _Op(_translate_rel_arg, geometry=translate_x_rel),
    "TranslateYRel": _Op(_translate_rel_arg, geometry=translate_y_rel),
}


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotDraws:
    """What one op slot drew for each sample: op id [B] int64, applied [B] bool, level and sign [B] float64."""

    op: torch.Tensor
    applied: torch.Tensor
    level: torch.Tensor
    sign: torch.Tensor


def draw_slot(rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, spec: RandAugmentSpec, slot: int) -> SlotDraws:
    """The random choices of op slot ``slot`` for every sample (timm's ``RandAugment`` + ``AugmentOp``)."""
    n_ops = len(spec.transforms)
    u_op = rng.uniform(epoch, index, f"randaug/{slot}/op")[:, 0]
    op = torch.floor(u_op * n_ops).to(torch.int64).clamp_(max=n_ops - 1)
    applied = rng.uniform(epoch, index, f"randaug/{slot}/apply")[:, 0] < spec.prob  # prob 0: never, 1: always
    level = torch.full_like(u_op, spec.magnitude, dtype=torch.float64)
    if spec.magnitude_std == math.inf:
        level = level * rng.uniform(epoch, index, f"randaug/{slot}/magnitude")[:, 0].to(torch.float64)
    elif spec.magnitude_std > 0:
        level = level + spec.magnitude_std * rng.normal(epoch, index, f"randaug/{slot}/magnitude")[:, 0].to(torch.float64)
    level = level.clamp(0.0, spec.magnitude_max)
    negate = rng.uniform(epoch, index, f"randaug/{slot}/sign")[:, 0] > 0.5  # timm's _randomly_negate
    sign = torch.where(negate, -1.0, 1.0).to(torch.float64)
    return SlotDraws(op, applied, level, sign)


def apply_slot(x: torch.Tensor, draws: SlotDraws, transforms: tuple[str, ...], fill: torch.Tensor) -> torch.Tensor:
    """Apply each sample's drawn op to ``x`` ([B, 3, H, W] in 0..255): every op runs on the batch, samples pick theirs."""
    b, _, h, w = x.shape
    out = x
    matrix = torch.eye(2, 3, dtype=torch.float64, device=x.device).expand(b, 2, 3)
    geometric = torch.zeros(b, dtype=torch.bool, device=x.device)
    for k, name in enumerate(transforms):
        op = OPS[name]
        chosen = draws.applied & (draws.op == k)
        arg = op.level_to_arg(draws.level, draws.sign) if op.level_to_arg is not None else None
        if op.geometry is not None:
            matrix = torch.where(chosen.view(b, 1, 1), op.geometry(arg, h, w), matrix)
            geometric = geometric | chosen
        else:
            out = torch.where(chosen.view(b, 1, 1, 1), op.pixel(x, arg), out)
    return torch.where(geometric.view(b, 1, 1, 1), warp_affine(x, matrix, fill), out)


def slot_geometry(draws: SlotDraws, transforms: tuple[str, ...], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine warp a slot applied to each sample (Pillow matrices ``[B, 2, 3]`` float64, the
    identity where no geometric op was drawn) and whether it applied one ``[B]``: exactly what
    :func:`apply_slot` warps the image with."""
    b = draws.op.shape[0]
    matrix = torch.eye(2, 3, dtype=torch.float64, device=draws.op.device).expand(b, 2, 3)
    geometric = torch.zeros(b, dtype=torch.bool, device=draws.op.device)
    for k, name in enumerate(transforms):
        op = OPS[name]
        if op.geometry is None:
            continue
        chosen = draws.applied & (draws.op == k)
        matrix = torch.where(chosen.view(b, 1, 1), op.geometry(op.level_to_arg(draws.level, draws.sign), height, width), matrix)
        geometric = geometric | chosen
    return matrix, geometric


def geometric_warps(
    rng: CounterRNG, epoch: int | torch.Tensor, index: torch.Tensor, spec: RandAugmentSpec, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per op slot, the warp RandAugment applied to each ``size x size`` view (see
    :func:`slot_geometry`): re-derived from the same draws, so targets laid over a view (token
    labels) can follow its rotations, shears and translations."""
    return [slot_geometry(draw_slot(rng, epoch, index, spec, slot), spec.transforms, size, size) for slot in range(spec.num_ops)]


def fill_levels(fill: tuple[float, float, float], device, dtype=torch.float32) -> torch.Tensor:
    """timm's ``img_mean`` fill colour in 0..255 (a ``[3]`` tensor on ``device``; make it once
    per device: building it from a Python list is a host-to-device copy)."""
    return torch.tensor([min(255, round(255 * v)) for v in fill], dtype=dtype, device=device)


def rand_augment(
    images: torch.Tensor,
    rng: CounterRNG,
    epoch: int | torch.Tensor,
    index: torch.Tensor,
    spec: RandAugmentSpec,
    fill: tuple[float, float, float] | torch.Tensor,
) -> torch.Tensor:
    """images: [B, 3, H, W] float in [0, 1] (un-normalised), index: [B] int64 sample ids on the same device.

    Returns the augmented batch, same shape/dtype, values in [0, 1]. fill: colour (in [0,1]) for
    pixels uncovered by rotate/shear/translate (timm uses the dataset mean, rounded to 8 bits as
    here), or that colour already made by :func:`fill_levels`. A sample's result depends only on (rng seed, epoch, its index, its image), not on the
    batch; samples no op was applied to are returned bit-identical.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"rand_augment expects [B, 3, H, W] images, got {tuple(images.shape)}")
    work_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    x = images.to(work_dtype) * 255.0
    fill255 = fill.to(work_dtype) if isinstance(fill, torch.Tensor) else fill_levels(fill, images.device, work_dtype)  # from fill_levels
    changed = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    for slot in range(spec.num_ops):
        draws = draw_slot(rng, epoch, index, spec, slot)
        x = apply_slot(x, draws, spec.transforms, fill255)
        changed = changed | draws.applied
    out = (x / 255.0).clamp_(0.0, 1.0).to(images.dtype)
    return torch.where(changed.view(-1, 1, 1, 1), out, images)


def check_rand_augment(cfg) -> None:
    """``augment.rand_augment`` is a policy this module can run."""
    if cfg.augment.rand_augment is not None:
        try:
            parse_rand_augment(cfg.augment.rand_augment)
        except UserError as err:
            raise ConfigError("augment.rand_augment", str(err)) from None
