"""Boundary tests for survivors of the issue-19 mutation audit: fixtures on values where the bug
shows (an inf gradient with a finite loss, limits at N and N+1, a shrink by a factor that is not
2, an edited image of the same size, token-target warps at epoch 0 through the targets path)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import TINY_DEIT, tiny_run
from PIL import Image

from vitdistill.augment.pipeline import ViewBatch
from vitdistill.augment.randaugment import RandAugmentSpec, rand_augment
from vitdistill.config import DataConfig
from vitdistill.data import open_source
from vitdistill.device import setup_distributed
from vitdistill.engine.guard import TrainingDiverged
from vitdistill.objective.feature import adapt_grid
from vitdistill.rng import CounterRNG
from vitdistill.runner import build_trainer
from vitdistill.targets.labelmaps import LabelMapTargets
from vitdistill.validate import load_recipe


def test_skip_step_skips_an_inf_gradient_with_a_finite_loss_up_to_the_limit(tmp_path):
    """max_skipped_steps=2: steps whose gradient is inf (loss finite) are skipped, weights untouched;
    the 2nd skip (N) is allowed, the 3rd (N + 1) stops the run."""
    cfg = load_recipe(
        "demo_student",
        tiny_run(
            tmp_path / "run",
            *TINY_DEIT,
            "data.train_limit=64",
            "data.eval_limit=32",
            "engine.nan_policy=skip_step",
            "engine.max_skipped_steps=2",
        ),
    )
    (tmp_path / "run").mkdir()
    trainer = build_trainer(cfg, setup_distributed("cpu"), tmp_path / "run")
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    params[0].register_hook(lambda grad: grad * math.inf)  # every gradient of this tensor becomes inf (or nan)
    before = [p.detach().clone() for p in params]
    batch = trainer.train_views.train_batch(torch.arange(32), 0)
    for step in range(2):
        assert trainer.train_step(batch, 0, step) is None  # skipped: the loss itself is finite
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and trainer.num_updates == 0
    assert trainer.guard.skipped_total == 2
    with pytest.raises(TrainingDiverged, match="3 steps with a non-finite loss or gradient"):
        trainer.train_step(batch, 0, 2)


def test_feature_map_shrink_is_antialiased_by_value():
    """A 6x12 teacher map of period-3 stripes (1, 0, 0) shrunk to a non-square 2x2 / 3x2 grid: each
    token holds about the stripes' mean (1/3), as an average over its footprint; plain bilinear
    sampling reads two neighbours and gives 0.5."""
    features = torch.zeros(1, 1, 6, 12)
    features[..., 0::3] = 1.0
    for grid in ((2, 2), (3, 2)):
        tokens = adapt_grid(features, grid)
        assert tokens.shape == (1, grid[0] * grid[1], 1)
        assert (tokens - 1 / 3).abs().max() < 0.05, tokens.flatten()


def test_an_edited_image_of_the_same_size_is_decoded_again(tmp_path):
    """BMP files of one size have one byte length: only the modification time tells the edit."""
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / "test" / name).mkdir(parents=True)
        Image.new("RGB", (6, 4), (10, 20, 30)).save(root / "test" / name / "0.bmp")
    cfg = DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"))
    first = open_source(cfg, "test")
    path = root / "test" / "a" / "0.bmp"
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.new("RGB", (6, 4), (200, 100, 50)).save(path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a second later (coarse file-system clocks)
    assert path.stat().st_size == size
    second = open_source(cfg, "test")
    assert first.images[0, 0, 0].tolist() == [10, 20, 30] and second.images[0, 0, 0].tolist() == [200, 100, 50]


class GeometricOnly(RandAugmentSpec):
    @property
    def transforms(self) -> tuple[str, ...]:
        return ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_token_targets_follow_the_warps_at_epoch_0_through_the_targets_path():
    """Label-map targets of training views at epoch 0 (the first epoch) follow RandAugment's warps:
    tokens showing the red half are labelled 0, the blue half 1."""
    size, grid, n = 32, (8, 8), 128
    spec = GeometricOnly(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=1.0)
    images = torch.zeros(n, 3, size, size)
    images[:, 0, :, : size // 2], images[:, 2, :, size // 2 :] = 1.0, 1.0
    half = torch.zeros(n, 64, 2)
    columns = torch.arange(64) % 8
    half[:, columns < 4, 0], half[:, columns >= 4, 1] = 1.0, 1.0
    targets = object.__new__(LabelMapTargets)  # the targets path, with its maps given directly
    targets.rand_augment, targets.view_size, targets.rng, targets.grid = spec, size, CounterRNG(5), grid
    targets.targets = lambda index, boxes, flips: (half[index], torch.full((len(index), 2), 0.5))
    keys = torch.arange(n)
    warped = rand_augment(images, targets.rng, 0, keys, spec, fill=(0.0, 1.0, 0.0))
    boxes, flips = torch.zeros(n, 4), torch.zeros(n, dtype=torch.bool)
    batch = ViewBatch(
        images=warped,
        labels=torch.zeros(n, dtype=torch.long),
        index=keys,
        epoch=0,
        boxes=boxes,
        flips=flips,
        partner=keys,
        partner_labels=torch.zeros(n, dtype=torch.long),
        partner_boxes=boxes,
        partner_flips=flips,
        lam=torch.ones(n),
        mix_boxes=torch.zeros(n, 4),
    )
    label = targets(batch).token_probs.argmax(-1)
    pixels = warped.view(n, 3, 8, 4, 8, 4).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
    red, blue = pixels[..., 0] > 0.9, pixels[..., 2] > 0.9
    assert red.sum() > 1000 and blue.sum() > 1000
    assert (label[red] == 0).all() and (label[blue] == 1).all()
    assert (label != half.argmax(-1)).any(dim=1).float().mean() > 0.5  # most views were really moved
