"""Replayable views: the same (seed, epoch, index) gives the same pixels on any batching."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_source

from vitdistill.augment import Augmenter
from vitdistill.augment.geometry import render
from vitdistill.augment.mixing import box_mask, partner_table
from vitdistill.config import AugmentConfig
from vitdistill.data import train_batches
from vitdistill.rng import CounterRNG

FULL = AugmentConfig(input_size=10, crop="rrc", scale=(0.3, 1.0), hflip=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.9)


def test_counter_rng_is_a_pure_function_of_its_key():
    rng = CounterRNG(7)
    idx = torch.tensor([3, 11, 5])
    a = rng.uniform(2, idx, "s", 4)
    assert torch.equal(a[1], rng.uniform(2, torch.tensor([11]), "s", 4)[0])
    assert not torch.equal(a, rng.uniform(3, idx, "s", 4))  # another epoch
    assert not torch.equal(a, rng.uniform(2, idx, "t", 4))  # another stream
    assert not torch.equal(a, CounterRNG(8).uniform(2, idx, "s", 4))  # another seed


def test_counter_rng_distributions():
    rng = CounterRNG(0)
    u = rng.uniform(0, torch.arange(20000), "u", 2)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(torch.corrcoef(u.T)[0, 1].item()) < 0.03
    hist = torch.histc(u[:, 0], bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200
    z = rng.normal(0, torch.arange(20000), "z", 1)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    for alpha in (0.1, 0.2, 0.8, 1.0, 2.0):
        b = rng.beta(0, torch.arange(20000), "b", alpha)
        var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
        assert abs(b.mean().item() - 0.5) < 0.01 and abs(b.var().item() - var) < 0.01


def test_beta_inverse_cdf_matches_the_distribution():
    from scipy import stats

    rng = CounterRNG(5)
    for alpha in (0.1, 0.2, 0.8, 2.0):
        b = rng.beta(0, torch.arange(50000), "beta", alpha).double().numpy()
        left = b[b < 0.5]  # float32 is exact near 0 (near 1, values within 6e-8 round to 1.0)
        result = stats.kstest(left, lambda x, a=alpha: 2 * stats.beta(a, a).cdf(x))
        assert result.statistic < 0.01, (alpha, result)


def test_permutation_and_partners():
    rng = CounterRNG(3)
    perm = rng.permutation(0, 100, "order")
    assert torch.equal(perm.sort().values, torch.arange(100))
    assert not torch.equal(perm, rng.permutation(1, 100, "order"))
    partner = partner_table(rng, 0, 100)
    assert torch.equal(partner.sort().values, torch.arange(100))  # a permutation ...
    assert (partner != torch.arange(100)).all()  # ... without fixed points


@pytest.mark.parametrize("cfg", [FULL, AugmentConfig(input_size=12, crop="pad", pad=3, hflip=0.5)])
def test_views_are_identical_across_batch_sizes(cfg):
    aug = Augmenter(synthetic_source(), cfg, seed=5, mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"))
    index = torch.tensor([0, 7, 3, 19, 4, 11, 23, 2])
    whole = aug.train_batch(index, epoch=2)
    pieces = [aug.train_batch(index[i : i + s], epoch=2) for i, s in ((0, 3), (3, 1), (4, 4))]
    for field in ("images", "boxes", "flips", "partner", "lam", "mix_boxes", "labels", "partner_labels"):
        joined = torch.cat([getattr(p, field) for p in pieces])
        assert torch.equal(getattr(whole, field), joined), field
    reversed_batch = aug.train_batch(index.flip(0), epoch=2)
    assert torch.equal(reversed_batch.images.flip(0), whole.images)
    assert not torch.equal(aug.train_batch(index, epoch=3).images, whole.images)


def test_epoch_batches_cover_the_data_once_and_split_across_processes():
    rng = CounterRNG(1)
    single = train_batches(50, 8, rng, epoch=4)
    assert len(single) == 6 and len(torch.cat(single).unique()) == 48  # last partial batch dropped
    two = [train_batches(50, 8, rng, 4, rank=r, world=2) for r in range(2)]
    for step in range(6):
        assert torch.equal(torch.cat([two[0][step], two[1][step]]), single[step])


def test_render_identity_box_copies_pixels_exactly():
    images = synthetic_source(4, 8).images
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(4, 4)
    out = render(images, boxes, torch.zeros(4, dtype=torch.bool), 8)
    assert torch.allclose(out * 255, images.permute(0, 3, 1, 2).float(), atol=1e-3)


def test_render_shift_pads_with_zeros_and_flip_mirrors():
    images = synthetic_source(1, 8).images
    out = render(images, torch.tensor([[-2.0, 1.0, 6.0, 9.0]]), torch.tensor([False]), 8, pad=2)
    src = images.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(out[0, :, :, :2], torch.zeros(3, 8, 2))  # columns x = -2, -1: padding
    assert torch.allclose(out[0, :, :7, 2:], src[0, :, 1:8, :6], atol=1e-5)
    assert torch.allclose(out[0, :, 7, :], torch.zeros(3, 8))  # row y = 8: padding
    flipped = render(images, torch.tensor([[-2.0, 1.0, 6.0, 9.0]]), torch.tensor([True]), 8, pad=2)
    assert torch.equal(flipped, out.flip(-1))


def test_rrc_boxes_respect_scale_and_stay_inside():
    aug = Augmenter(
        synthetic_source(200, 32),
        AugmentConfig(input_size=16, crop="rrc", scale=(0.25, 0.5)),
        0,
        (0.5,) * 3,
        (0.5,) * 3,
        torch.device("cpu"),
    )
    batch = aug.train_batch(torch.arange(200), epoch=0)
    b = batch.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 32).all() and (b[:, 3] <= 32).all()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (32 * 32)
    assert area.min() > 0.2 and area.max() < 0.56  # integer rounding of the sides


def test_mixing_records_are_consistent_with_pixels():
    aug = Augmenter(synthetic_source(64), FULL, 1, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"))
    index = torch.arange(64)
    batch = aug.train_batch(index, epoch=0)
    plain = Augmenter(
        synthetic_source(64),
        AugmentConfig(**{**FULL.__dict__, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}),
        1,
        (0.0,) * 3,
        (1.0,) * 3,
        torch.device("cpu"),
    )
    own = plain.train_batch(index, epoch=0).images
    other = plain.train_batch(batch.partner, epoch=0).images
    cut = (batch.mix_boxes[:, 2] > batch.mix_boxes[:, 0]) & (batch.mix_boxes[:, 3] > batch.mix_boxes[:, 1])
    unmixed = batch.partner == index
    assert unmixed.any() and cut.any() and (~cut & ~unmixed).any()  # all three kinds occur
    assert torch.equal(batch.images[unmixed], own[unmixed]) and (batch.lam[unmixed] == 1).all()
    for i in torch.nonzero(cut).flatten().tolist():
        mask = box_mask(batch.mix_boxes[i : i + 1], 10)[0]
        assert torch.equal(batch.images[i][:, mask], other[i][:, mask])
        assert torch.equal(batch.images[i][:, ~mask], own[i][:, ~mask])
        assert batch.lam[i].item() == pytest.approx(1 - mask.float().mean().item(), abs=1e-6)
    for i in torch.nonzero(~cut & ~unmixed).flatten().tolist():  # mixup
        lam = batch.lam[i]
        assert torch.allclose(batch.images[i], lam * own[i] + (1 - lam) * other[i], atol=1e-6)


def test_label_targets_mix_with_lambda():
    aug = Augmenter(synthetic_source(16), FULL, 2, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    batch = aug.train_batch(torch.arange(16), epoch=0)
    targets = batch.label_targets(4, smoothing=0.0)
    assert torch.allclose(targets.sum(1), torch.ones(16))
    for i in range(16):
        expected = torch.zeros(4)
        expected[batch.labels[i]] += batch.lam[i]
        expected[batch.partner_labels[i]] += 1 - batch.lam[i]
        assert torch.allclose(targets[i], expected, atol=1e-6)


def test_eval_views_are_deterministic_centre_crops():
    aug = Augmenter(
        synthetic_source(4, 10), AugmentConfig(input_size=10, eval_crop_pct=1.0), 0, (0.0,) * 3, (1.0,) * 3, torch.device("cpu")
    )
    batch = aug.eval_batch(torch.arange(4))
    assert torch.allclose(batch.images * 255, synthetic_source(4, 10).images.permute(0, 3, 1, 2).float(), atol=1e-3)
