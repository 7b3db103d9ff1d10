"""Batched RandAugment against timm's PIL reference, plus replay, statistics and parsing.

Tolerances (float32, the production dtype), measured on random uint8 images:

* 8-bit ops (invert, posterize, solarize, solarize-add, equalize, autocontrast) are exact.
* Blends (color, contrast, brightness, sharpness) and the affine ops (rotate, shear, translate)
  return Pillow's value *before* its final truncation to uint8, so ``0 <= ours - pil < 1`` (plus
  float32 noise); after flooring ours equals Pillow on every blend pixel. For affine ops it
  equals Pillow on >= 94% of pixels (fill/border pixels included) and is one level above on the
  rest: where the exact bilinear value is an integer, Pillow's double arithmetic lands just
  below it (e.g. dx = 0.39999999999999997) and truncation drops a level.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import timm.data.auto_augment as taa
import torch
from PIL import Image

import vitdistill.augment.randaugment as ra
from vitdistill.errors import UserError
from vitdistill.rng import CounterRNG

BILINEAR = Image.Resampling.BILINEAR
FILL_255 = (124, 116, 104)
MEAN = (0.485, 0.456, 0.406)  # timm's img_mean for these is round(255 * mean) = FILL_255
SHAPES = [(16, 16), (12, 20), (40, 40)]  # 40x40: equalize's step is > 0 (below 256 pixels it is the identity)


def uint8_images(shape, n=4, seed=0) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    images = [gen.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]
    images[1] = (images[1] // 5 + 70).astype(np.uint8)  # low contrast: autocontrast has work to do
    images[2][..., 1] = 77  # a constant channel: autocontrast / equalize leave it alone
    return images


def to_tensor(images: list[np.ndarray], dtype=torch.float32) -> torch.Tensor:
    """[B, 3, H, W] in the 0..255 domain."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(dtype)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).double().numpy()


def pil_reference(fn, images, *args, **kwargs) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im), *args, **kwargs)) for im in images]).astype(np.float64)


def per_sample(value, n=4):
    return torch.full((n,), float(value), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Each op against timm's PIL op
# --------------------------------------------------------------------------------------------

EXACT_OPS = [
    ("auto_contrast", taa.auto_contrast, ra.auto_contrast, [None]),
    ("equalize", taa.equalize, ra.equalize, [None]),
    ("invert", taa.invert, ra.invert, [None]),
    ("posterize", taa.posterize, ra.posterize, [1, 2, 3, 4, 8]),
    ("solarize", taa.solarize, ra.solarize, [0, 26, 128, 230, 256]),
    ("solarize_add", taa.solarize_add, ra.solarize_add, [0, 33, 99, 110]),
]
BLEND_OPS = [
    ("color", taa.color, ra.color),
    ("contrast", taa.contrast, ra.contrast),
    ("brightness", taa.brightness, ra.brightness),
    ("sharpness", taa.sharpness, ra.sharpness),
]
BLEND_FACTORS = [0.1, 0.37, 1.0, 1.45, 1.9]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,timm_op,our_op,args", EXACT_OPS, ids=[op[0] for op in EXACT_OPS])
def test_8bit_ops_match_pillow_exactly(shape, name, timm_op, our_op, args):
    images = uint8_images(shape)
    for arg in args:
        ref = pil_reference(timm_op, images) if arg is None else pil_reference(timm_op, images, arg)
        ours = to_numpy(our_op(to_tensor(images), None if arg is None else per_sample(arg)))
        np.testing.assert_array_equal(ours, ref, err_msg=f"{name}({arg}) on {shape}")
    if name == "equalize" and shape == (40, 40):
        assert (ref != np.stack(images)).mean() > 0.5  # not vacuous: equalize really remapped values


def test_posterize_zero_bits_is_black():
    """timm's PosterizeIncreasing at magnitude 10 keeps 0 bits; Pillow >= 10 raises there, older Pillow gave black."""
    images = uint8_images((8, 8))
    with pytest.raises(ValueError):
        taa.posterize(Image.fromarray(images[0]), 0)
    assert torch.equal(ra.posterize(to_tensor(images), per_sample(0)), torch.zeros(4, 3, 8, 8))


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("name,timm_op,our_op", BLEND_OPS, ids=[op[0] for op in BLEND_OPS])
def test_blend_ops_match_pillow_before_truncation(shape, name, timm_op, our_op):
    images = uint8_images(shape)
    for factor in BLEND_FACTORS:
        ref = pil_reference(timm_op, images, factor)
        ours = to_numpy(our_op(to_tensor(images), per_sample(factor)))
        diff = ours - ref
        assert diff.min() >= -1e-3 and diff.max() < 1 + 1e-3, f"{name}({factor}): diff in [{diff.min()}, {diff.max()}]"
        np.testing.assert_array_equal(np.floor(ours + 1e-3), ref, err_msg=f"{name}({factor}) on {shape}")


GEOMETRIC_OPS = [
    ("rotate", taa.rotate, ra.rotate, [-30.0, -13.7, 5.0, 27.0, 30.0]),
    ("shear_x", taa.shear_x, ra.shear_x, [-0.3, -0.1, 0.17, 0.3]),
    ("shear_y", taa.shear_y, ra.shear_y, [-0.3, 0.17, 0.3]),
    ("translate_x_rel", taa.translate_x_rel, ra.translate_x_rel, [-0.45, -0.1, 0.123, 0.45]),
    ("translate_y_rel", taa.translate_y_rel, ra.translate_y_rel, [-0.45, 0.123, 0.3]),
]


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("name,timm_op,geometry,args", GEOMETRIC_OPS, ids=[op[0] for op in GEOMETRIC_OPS])
def test_geometric_ops_match_pillow_bilinear(shape, name, timm_op, geometry, args):
    images = uint8_images(shape)
    height, width = shape
    for arg in args:
        ref = pil_reference(timm_op, images, arg, fillcolor=FILL_255, resample=BILINEAR)
        matrix = geometry(per_sample(arg), height, width)
        ours = to_numpy(ra.warp_affine(to_tensor(images), matrix, torch.tensor(FILL_255, dtype=torch.float32)))
        diff = ours - ref
        assert diff.min() >= -1e-3 and diff.max() < 1 + 1e-3, f"{name}({arg}): diff in [{diff.min()}, {diff.max()}]"
        exact = (np.floor(ours + 1e-3) == ref).mean()
        assert exact >= 0.9, f"{name}({arg}) on {shape}: only {exact:.3f} of pixels equal Pillow's"
        assert (ref == np.array(FILL_255)).all(axis=-1).any() or name == "rotate" and abs(arg) < 10  # fill shows up


# --------------------------------------------------------------------------------------------
# Level -> argument and the whole policy against timm
# --------------------------------------------------------------------------------------------

LEVELS = [0.0, 0.5, 1.0, 3.3, 5.0, 7.77, 8.0, 9.0, 9.5, 10.0, 12.0]


@pytest.mark.parametrize("name", sorted(set(ra.RAND_TRANSFORMS) | set(ra.RAND_INCREASING_TRANSFORMS)))
def test_level_to_arg_matches_timm(name, monkeypatch):
    timm_fn, ours = taa.LEVEL_TO_ARG[name], ra.OPS[name].level_to_arg
    assert (timm_fn is None) == (ours is None)
    if ours is None:
        return
    for negate in (False, True):
        monkeypatch.setattr(random, "random", lambda value=0.9 if negate else 0.1: value)  # timm negates when random() > 0.5
        expected = [timm_fn(level, {"translate_const": 100})[0] for level in LEVELS]
        got = ours(torch.tensor(LEVELS, dtype=torch.float64), torch.full((len(LEVELS),), -1.0 if negate else 1.0, dtype=torch.float64))
        assert got.tolist() == pytest.approx(expected, abs=1e-12), name


def test_one_op_per_image_matches_timm_end_to_end(monkeypatch):
    """num_ops=1, prob=1: each sample's output equals timm's op with the drawn name, magnitude and sign."""
    spec = ra.RandAugmentSpec(num_ops=1, magnitude=8.0, magnitude_std=0.5, prob=1.0, increasing=True)
    n, rng, epoch = 150, CounterRNG(3), 2
    images = uint8_images((12, 14), n=n, seed=1)
    index = torch.arange(100, 100 + n)
    out = ra.rand_augment(to_tensor(images) / 255.0, rng, epoch, index, spec, MEAN)
    draws = ra.draw_slot(rng, epoch, index, spec, 0)
    hparams = {"translate_const": 100, "img_mean": tuple(min(255, round(255 * m)) for m in MEAN)}
    assert hparams["img_mean"] == FILL_255
    seen = set()
    for i in range(n):
        name = spec.transforms[int(draws.op[i])]
        seen.add(name)
        negate = bool(draws.sign[i] < 0)
        monkeypatch.setattr(random, "random", lambda value=0.9 if negate else 0.1: value)
        level_fn = taa.LEVEL_TO_ARG[name]
        args = level_fn(float(draws.level[i]), hparams) if level_fn is not None else ()
        ref = np.asarray(taa.NAME_TO_OP[name](Image.fromarray(images[i]), *args, fillcolor=FILL_255, resample=BILINEAR))
        ours = out[i].permute(1, 2, 0).double().numpy() * 255.0
        diff = ours - ref
        assert diff.min() >= -1e-3 and diff.max() < 1 + 1e-3, f"sample {i}: {name}{args} diff in [{diff.min()}, {diff.max()}]"
    assert seen == set(spec.transforms)  # every op was exercised


# --------------------------------------------------------------------------------------------
# Replay, identity, statistics
# --------------------------------------------------------------------------------------------


def float_batch(n=12, h=24, w=20, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", [ra.RandAugmentSpec(), ra.RandAugmentSpec(num_ops=3, prob=1.0, increasing=False)])
def test_a_sample_is_augmented_the_same_in_any_batch(spec):
    rng, epoch = CounterRNG(11), 4
    images, index = float_batch(), torch.arange(40, 52)
    full = ra.rand_augment(images, rng, epoch, index, spec, MEAN)
    assert full.shape == images.shape and full.dtype == images.dtype
    assert 0 <= full.min() and full.max() <= 1
    assert (full != images).flatten(1).any(1).float().mean() > 0.5  # it does augment
    for i in range(len(index)):
        alone = ra.rand_augment(images[i : i + 1], rng, epoch, index[i : i + 1], spec, MEAN)
        assert torch.equal(alone[0], full[i])
    perm = torch.tensor([5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6])
    shuffled = ra.rand_augment(images[perm], rng, epoch, index[perm], spec, MEAN)
    assert torch.equal(shuffled, full[perm])
    assert not torch.equal(ra.rand_augment(images, rng, epoch + 1, index, spec, MEAN), full)  # a new epoch, new views


def test_prob_zero_returns_the_input_exactly():
    images = float_batch()
    for dtype in (torch.float32, torch.float16):
        batch = images.to(dtype)
        out = ra.rand_augment(batch, CounterRNG(0), 0, torch.arange(12), ra.RandAugmentSpec(prob=0.0), MEAN)
        assert out.dtype == dtype and torch.equal(out, batch)


def test_choice_probability_and_magnitude_statistics():
    n = 30000
    index = torch.arange(n)
    for spec in (ra.RandAugmentSpec(), ra.RandAugmentSpec(prob=0.3, increasing=False)):
        draws = ra.draw_slot(CounterRNG(5), 1, index, spec, slot=1)
        counts = torch.bincount(draws.op, minlength=15)
        assert len(counts) == 15
        expected, sigma = n / 15, math.sqrt(n * (1 / 15) * (14 / 15))
        assert (counts - expected).abs().max() < 5 * sigma, counts
        rate = draws.applied.float().mean().item()
        assert abs(rate - spec.prob) < 5 * math.sqrt(spec.prob * (1 - spec.prob) / n)
        assert abs((draws.sign < 0).float().mean().item() - 0.5) < 0.015
        assert draws.level.min() >= 0 and draws.level.max() <= 10
        # N(9, 0.5) clipped to 10: mean 8.9957, std 0.4898
        assert abs(draws.level.mean().item() - 8.9957) < 0.02 and abs(draws.level.std().item() - 0.4898) < 0.02
    slots = [ra.draw_slot(CounterRNG(5), 1, index, ra.RandAugmentSpec(), slot=s).op for s in (0, 1)]
    assert (slots[0] == slots[1]).float().mean().item() == pytest.approx(1 / 15, abs=0.006)  # independent slots


def test_uniform_magnitude_and_fixed_magnitude():
    index = torch.arange(20000)
    uniform = ra.draw_slot(CounterRNG(1), 0, index, ra.parse_rand_augment("rand-m9-mstd101"), 0).level
    assert uniform.min() >= 0 and uniform.max() < 9 and abs(uniform.mean().item() - 4.5) < 0.1
    fixed = ra.draw_slot(CounterRNG(1), 0, index, ra.parse_rand_augment("rand-m7"), 0).level
    assert torch.all(fixed == 7)
    clipped = ra.draw_slot(CounterRNG(1), 0, index, ra.parse_rand_augment("rand-m15"), 0).level
    assert torch.all(clipped == 10)  # timm clips to magnitude_max (10 unless mmax is given)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def test_parse_matches_timm():
    assert ra.parse_rand_augment("rand-m9-mstd0.5-inc1") == ra.RandAugmentSpec()
    assert ra.parse_rand_augment("rand-n3-m7") == ra.RandAugmentSpec(3, 7.0, 0.0, 10.0, 0.5, False)
    assert ra.parse_rand_augment("rand-p0.25-mmax15-m12") == ra.RandAugmentSpec(2, 12.0, 0.0, 15.0, 0.25, False)
    assert ra.parse_rand_augment("rand") == ra.RandAugmentSpec(2, 10.0, 0.0, 10.0, 0.5, False)
    assert ra.parse_rand_augment("rand-mstd200").magnitude_std == math.inf
    for text in ("rand-m9-mstd0.5-inc1", "rand-n3-m7", "rand-p0.25-mmax15-m12", "rand-inc1-mstd1", "rand", "rand-mmax0"):
        spec, ref = ra.parse_rand_augment(text), taa.rand_augment_transform(text, {"translate_const": 100, "img_mean": FILL_255})
        assert spec.num_ops == ref.num_layers
        assert spec.transforms == tuple(op.name for op in ref.ops)
        op = ref.ops[0]
        assert (spec.magnitude, spec.prob, spec.magnitude_std) == (op.magnitude, op.prob, op.magnitude_std)
        assert spec.magnitude_max == (op.magnitude_max or 10)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rnd-m9",
        "m9-rand",
        "rand-x9",
        "rand-m",
        "rand-m9.5",
        "rand-mfoo",
        "rand-p1.5",
        "rand-inc2",
        "rand-tweights",
        "rand-m9--n2",
        "rand-mstdx",
    ],
)
def test_parse_rejects_bad_strings(text):
    with pytest.raises(UserError) as err:
        ra.parse_rand_augment(text)
    assert "\n" not in str(err.value) and str(err.value)
