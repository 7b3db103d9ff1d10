"""Colour jitter and erasing against their definitions; host-resident data with prefetching
gives the same views as device-resident data, for any number of gathering threads."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import synthetic_source

from vitdistill.augment import Augmenter
from vitdistill.augment.photometric import color_jitter, erase_boxes, random_erase
from vitdistill.config import AugmentConfig, DataConfig
from vitdistill.data import decoded, open_source, train_batches
from vitdistill.rng import CounterRNG


def test_color_jitter_matches_torchvision_with_the_same_factors():
    rng, index = CounterRNG(4), torch.arange(6)
    images = torch.rand(6, 3, 9, 7)
    out = color_jitter(images, rng, 0, index, 0.4)
    u = rng.uniform(0, index, "color-jitter", 3)
    factors = 0.6 + 0.8 * u
    for i in range(6):
        b, c, s = factors[i].tolist()
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(images[i], b), c), s)
        assert torch.allclose(out[i], expected, atol=1e-5), i
    assert (factors.min() >= 0.6) and (factors.max() <= 1.4)


def test_erase_boxes_follow_timm_ranges_and_probability():
    rng, n = CounterRNG(0), 4000
    boxes = erase_boxes(rng, 0, torch.arange(n), 32, 24, prob=0.25)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    erased = w > 0
    assert abs(erased.float().mean().item() - 0.25) < 0.03
    area = (w * h)[erased] / (32 * 24)
    assert area.min() > 0.015 and area.max() < 1 / 3 + 0.05  # rounding of the sides
    aspect = (h / w)[erased]
    assert aspect.min() > 0.3 * 0.7 and aspect.max() < 1 / 0.3 * 1.4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 24).all() and (boxes[:, 3] <= 32).all()


def test_random_erase_replaces_only_the_box_with_standard_noise():
    rng = CounterRNG(1)
    images = torch.full((200, 3, 32, 32), 7.0)
    out = random_erase(images, rng, 0, torch.arange(200), prob=1.0)
    changed = (out != 7.0).any(dim=1)
    boxes = erase_boxes(rng, 0, torch.arange(200), 32, 32, prob=1.0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert torch.equal(changed.sum(dim=(1, 2)).float(), area)
    # the noise is drawn from the epoch's 3 x 64 x 64 field (12,288 values): its mean has
    # std 0.009, so 0.05 is over 5 sigma
    noise = out[out != 7.0]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


FULL = AugmentConfig(input_size=10, crop="rrc", hflip=0.5, color_jitter=0.4, erase_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_host_resident_prefetch_gives_the_same_views(workers):
    source = synthetic_source(40, 12)
    on_device = Augmenter(source, FULL, 9, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), placement="device")
    host = Augmenter(source, FULL, 9, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), placement="host", workers=workers)
    assert on_device.on_device and not host.on_device
    batches = train_batches(len(source), 8, on_device.rng, epoch=1)
    for a, b in zip(on_device.train_batches(batches, 1), host.train_batches(batches, 1)):
        for field in ("images", "boxes", "flips", "partner", "lam", "mix_boxes"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_photometric_views_still_replay_across_batch_sizes():
    aug = Augmenter(synthetic_source(), FULL, 5, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    index = torch.tensor([0, 7, 3, 19, 4, 11])
    whole = aug.train_batch(index, epoch=2).images
    parts = torch.cat([aug.train_batch(index[:2], 2).images, aug.train_batch(index[2:], 2).images])
    assert torch.equal(whole, parts)


def test_large_decoded_arrays_are_memory_mapped(monkeypatch, tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (6, 5), (40 * i, 100, 7)).save(tmp_path / "data" / "train" / label / f"{i}.png")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    in_ram = open_source(cfg, "train")
    monkeypatch.setattr(decoded, "ram_budget", lambda: 0)
    mapped = open_source(cfg, "train")
    assert not in_ram.memory_mapped and mapped.memory_mapped
    assert torch.equal(in_ram.images, mapped.images) and in_ram.images.shape == (6, 5, 6, 3)
    aug = Augmenter(mapped, AugmentConfig(input_size=4), 0, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    assert not aug.on_device  # memory-mapped data is read ahead by threads, even on a CPU device


def test_erase_noise_is_keyed_by_sample_and_epoch():
    from vitdistill.augment.photometric import erase_noise

    rng = CounterRNG(2)
    batch = erase_noise(rng, 3, torch.arange(20), (20, 3, 16, 16))
    alone = erase_noise(rng, 3, torch.tensor([7]), (1, 3, 16, 16))
    assert torch.equal(batch[7], alone[0])
    assert not torch.equal(batch[7], batch[8])
    assert not torch.equal(batch[7], erase_noise(rng, 4, torch.tensor([7]), (1, 3, 16, 16))[0])  # another epoch
    per_sample = batch.flatten(1)
    assert (per_sample.mean(1).abs() < 0.3).all() and ((per_sample.std(1) - 1).abs() < 0.2).all()  # 768 values each


def test_compiled_views_match_eager_views_and_compile_once():
    """augment.compile: the view function is compiled once; epochs are inputs, not constants."""
    import torch._dynamo

    cfg = AugmentConfig(
        input_size=8, crop="rrc", hflip=0.5, rand_augment="rand-m9-mstd0.5-inc1", erase_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0
    )
    source = synthetic_source(32, 8)
    eager = Augmenter(source, cfg, 1, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    compiled = Augmenter(source, AugmentConfig(**{**cfg.__dict__, "compile": True}), 1, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    torch._dynamo.reset()
    for epoch in range(3):
        a, b = eager.train_batch(torch.arange(16), epoch), compiled.train_batch(torch.arange(16), epoch)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.partner, b.partner)
        close = (a.images - b.images).abs() < 1e-4  # float reassociation; rarely one grey level at an 8-bit rounding boundary
        assert close.float().mean() > 0.999
    a, b = eager.train_batch(torch.arange(5), 3), compiled.train_batch(torch.arange(5), 3)  # a last, partial batch
    assert len(b) == 5 and torch.equal(a.boxes, b.boxes) and ((a.images - b.images).abs() < 1e-4).float().mean() > 0.999
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, graphs  # compiled, and own and partner views share it: no recompiles per epoch or batch shape
