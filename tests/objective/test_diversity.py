"""Patch diversification terms against their equations on hand-made tensors, and a tiny run."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import TINY_DEIT, tiny_run
from helpers import batch_of, contrast_by_loop
from torch import nn

from vitdistill import UserError, load_recipe, train
from vitdistill.augment import ViewBatch
from vitdistill.augment.mixing import token_own_share
from vitdistill.models import ModelOutput
from vitdistill.objective import Objective
from vitdistill.objective.diversity import patch_targets


def patch_own_share(batch, n):
    return token_own_share(batch.mix_boxes, batch.lam, batch.images.shape[-2:], n)


C = 3


def view_batch(labels, partner_labels=None, lam=None, mix_boxes=None, size=8) -> ViewBatch:
    return batch_of(labels, partner_labels, lam, mix_boxes, size)


def vit_output(patches: torch.Tensor, first=None, token_logits=None, prefix: int = 1) -> ModelOutput:
    """A ViT's output with ``prefix`` (random) class/distillation tokens before ``patches``."""
    b, _, d = patches.shape
    tokens = torch.cat([torch.randn(b, prefix, d), patches], dim=1)
    return ModelOutput(torch.zeros(b, C), None, tokens, prefix, token_logits, {} if first is None else {0: first})


def term_value(term: dict, out: ModelOutput, batch: ViewBatch) -> torch.Tensor:
    loss, parts = Objective([term], C, has_dist_head=False)(out, batch, None)
    assert torch.equal(parts[term["term"]], loss.detach())  # weight 1: the total is the term
    return loss


def cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


# ---------------------------------------------------------------------------- patch_cosine
@pytest.mark.parametrize("absolute", [True, False])
def test_patch_cosine_of_identical_tokens_is_one_and_of_orthogonal_tokens_zero(absolute):
    term = {"term": "patch_cosine", "absolute": absolute}
    same = torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(2, 5, 4).clone()
    assert term_value(term, vit_output(same), view_batch([0, 1])).item() == pytest.approx(1.0, abs=1e-6)
    orthogonal = torch.eye(6)[:4].expand(2, 4, 6).clone() * torch.tensor([1.0, 2.0, 3.0, 0.5])[:, None]
    assert term_value(term, vit_output(orthogonal), view_batch([0, 1])).item() == pytest.approx(0.0, abs=1e-6)
    # one image of identical and one of orthogonal tokens: the batch mean
    both = torch.cat([same[:1, :4, :], orthogonal[:1, :, :4]], dim=0)
    assert term_value(term, vit_output(both), view_batch([0, 1])).item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("absolute", [True, False])
def test_patch_cosine_matches_a_hand_computation_on_three_tokens(absolute):
    h = [[1.0, 0.0, 2.0], [1.0, 1.0, 0.0], [-1.0, 0.5, -1.0]]
    pairs = [cos(h[i], h[j]) for i in range(3) for j in range(3) if i != j]
    assert min(pairs) < 0  # the absolute and the signed loss differ on these tokens
    expected = sum(abs(c) if absolute else c for c in pairs) / (3 * 2)
    loss = term_value({"term": "patch_cosine", "absolute": absolute}, vit_output(torch.tensor([h])), view_batch([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == torch.float32


def test_patch_cosine_ignores_prefix_tokens_and_is_fp32_from_bf16():
    torch.manual_seed(0)
    patches = torch.randn(2, 9, 16)
    out_a, out_b = vit_output(patches, prefix=1), vit_output(patches, prefix=2)
    a = term_value({"term": "patch_cosine"}, out_a, view_batch([0, 1]))
    b = term_value({"term": "patch_cosine"}, out_b, view_batch([0, 1]))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    bf16 = ModelOutput(out_a.logits, None, out_a.tokens.bfloat16(), 1)
    assert term_value({"term": "patch_cosine"}, bf16, view_batch([0, 1])).dtype == torch.float32


def test_diversity_terms_stay_fp32_under_bf16_autocast():
    torch.manual_seed(5)
    patches, first = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    g = nn.Linear(32, C)
    out = vit_output(patches, first, token_logits=g(patches))
    batch = view_batch([0, 1], partner_labels=[2, 0], lam=[0.75, 0.5], mix_boxes=[[0, 0, 4, 4], [0, 0, 0, 0]])
    for name in ("patch_cosine", "patch_contrast", "patch_mix"):
        plain = term_value({"term": name}, out, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = term_value({"term": name}, out, batch)
        assert autocast.dtype == torch.float32
        assert autocast.item() == pytest.approx(plain.item(), rel=1e-6), name


# ---------------------------------------------------------------------------- patch_contrast


@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_patch_contrast_matches_a_loop_implementation(tau):
    torch.manual_seed(1)
    first, last = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    loss = term_value({"term": "patch_contrast", "tau": tau}, vit_output(last, first), view_batch([0, 1, 2]))
    assert loss.item() == pytest.approx(contrast_by_loop(first, last, tau), rel=1e-5)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("detach_first", [True, False])
def test_patch_contrast_gradient_reaches_the_first_block_only_without_detach(detach_first):
    torch.manual_seed(2)
    first = torch.randn(2, 6, 8, requires_grad=True)
    last = torch.randn(2, 6, 8, requires_grad=True)
    loss = term_value({"term": "patch_contrast", "detach_first": detach_first}, vit_output(last, first), view_batch([0, 1]))
    loss.backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    if detach_first:
        assert first.grad is None
    else:
        assert first.grad is not None and first.grad.abs().sum() > 0


def test_patch_contrast_is_lower_when_last_tokens_align_with_their_first_tokens():
    torch.manual_seed(3)
    first = torch.randn(4, 16, 32)
    shuffled = first[:, torch.roll(torch.arange(16), 1)]  # every patch gets another patch's token
    term = {"term": "patch_contrast", "tau": 0.5}
    aligned_loss = term_value(term, vit_output(2.0 * first + 0.1 * torch.randn(4, 16, 32), first), view_batch([0] * 4))
    shuffled_loss = term_value(term, vit_output(shuffled, first), view_batch([0] * 4))
    assert aligned_loss.item() < shuffled_loss.item() - 0.5


def test_patch_contrast_asks_for_block_zero_and_needs_it():
    objective = Objective([{"term": "ce"}, {"term": "patch_contrast"}], C, has_dist_head=False)
    assert objective.needed_blocks == {0}
    with pytest.raises(UserError, match="block 0"):
        objective(vit_output(torch.randn(1, 4, 8)), view_batch([0]), None)


# ---------------------------------------------------------------------------- patch_mix
def test_patch_mix_targets_for_cutmix_mixup_and_unmixed_samples():
    # 8x8 views, 16 patches: a 4x4 grid of 2x2-pixel patches.
    batch = view_batch(
        labels=[0, 0, 1, 2, 1],
        partner_labels=[1, 2, 2, 0, 0],
        lam=[0.75, 0.625, 0.3, 1.0, 0.0],
        mix_boxes=[
            [0, 0, 4, 4],  # cutmix: the top-left 4x4 pixels show the partner
            [2, 1, 7, 6],  # cutmix: patch centres at x in {3, 5}, y in {3, 5} are inside
            [0, 0, 0, 0],  # mixup with lam 0.3
            [0, 0, 0, 0],  # unmixed
            [0, 0, 8, 8],  # cutmix over the whole view
        ],
    )
    own = patch_own_share(batch, 16)
    expected_first = torch.ones(4, 4)
    expected_first[:2, :2] = 0  # exactly the 4 top-left patches (raster indices 0, 1, 4, 5)
    assert torch.equal(own[0], expected_first.flatten())
    assert torch.equal((own[0] == 0).nonzero().flatten(), torch.tensor([0, 1, 4, 5]))
    assert torch.equal((own[1] == 0).nonzero().flatten(), torch.tensor([5, 6, 9, 10]))
    assert torch.equal(own[2], torch.full((16,), 0.3))
    assert torch.equal(own[3], torch.ones(16))
    assert torch.equal(own[4], torch.zeros(16))

    targets = patch_targets(batch, 16, C)
    assert targets.shape == (5, 16, C)
    assert torch.equal(targets[0, 0], torch.tensor([0.0, 1.0, 0.0]))  # partner's label 1
    assert torch.equal(targets[0, 2], torch.tensor([1.0, 0.0, 0.0]))  # own label 0
    assert torch.allclose(targets[2], torch.tensor([0.0, 0.3, 0.7]).expand(16, C))
    assert torch.equal(targets[3], torch.tensor([0.0, 0.0, 1.0]).expand(16, C))
    smoothed = patch_targets(batch, 16, C, smoothing=0.3)
    assert torch.allclose(smoothed[0, 0], torch.tensor([0.1, 0.8, 0.1]))
    assert torch.allclose(smoothed.sum(-1), torch.ones(5, 16))


def test_patch_mix_needs_a_square_grid():
    with pytest.raises(UserError, match="square"):
        patch_own_share(view_batch([0]), 15)
    rect = view_batch([0])
    rect.images = torch.zeros(1, 3, 8, 6)
    with pytest.raises(UserError, match="square"):
        patch_own_share(rect, 16)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_patch_mix_matches_a_hand_computation_with_the_classifier_weights(smoothing):
    torch.manual_seed(4)
    d = 5
    g = nn.Linear(d, C)
    patches = torch.randn(2, 4, d)  # 4 patches: a 2x2 grid of 4x4-pixel patches on 8x8 views
    batch = view_batch(labels=[0, 2], partner_labels=[1, 0], lam=[0.75, 0.4], mix_boxes=[[4, 0, 8, 4], [0, 0, 0, 0]])
    loss = term_value({"term": "patch_mix", "smoothing": smoothing}, vit_output(patches, token_logits=g(patches)), batch)

    w, bias = g.weight.tolist(), g.bias.tolist()
    own_share = [[1, 0, 1, 1], [0.4] * 4]  # sample 0: the top-right patch shows the partner
    expected = 0.0
    for b, (y, yp) in enumerate([(0, 1), (2, 0)]):
        for i in range(4):
            h = patches[b, i].tolist()
            z = [sum(wk * hk for wk, hk in zip(w[c], h)) + bias[c] for c in range(C)]
            p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
            share = own_share[b][i]
            own = [(1 - smoothing) * (c == y) + smoothing / C for c in range(C)]
            other = [(1 - smoothing) * (c == yp) + smoothing / C for c in range(C)]
            target = [share * o + (1 - share) * q for o, q in zip(own, other)]
            expected += -sum(t * math.log(q) for t, q in zip(target, p))
    assert loss.item() == pytest.approx(expected / 8, rel=1e-5)
    loss.backward()
    assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0


def test_patch_mix_without_a_token_head_is_a_clear_error():
    with pytest.raises(UserError, match="token_head"):
        term_value({"term": "patch_mix"}, vit_output(torch.randn(1, 4, 8)), view_batch([0]))


# ---------------------------------------------------------------------------- recipe and run
def test_diverse_recipe_has_ce_and_the_three_terms():
    cfg = load_recipe("deit_tiny_diverse_cifar10")
    assert [t["term"] for t in cfg.objective] == ["ce", "patch_cosine", "patch_contrast", "patch_mix"]
    assert cfg.model.token_head and cfg.augment.cutmix_alpha > 0
    assert Objective(cfg.objective, 10, has_dist_head=False).needed_blocks == {0}


def test_tiny_deit_trains_with_the_three_terms(tmp_path):
    terms = ", ".join(f"{{term: {t}, weight: 0.1}}" for t in ("patch_cosine", "patch_contrast", "patch_mix"))
    objective = f"objective=[{{term: ce}}, {terms}]"
    overrides = [*TINY_DEIT, "model.token_head=true", "augment.cutmix_alpha=1.0", objective]
    result = train(load_recipe("demo_student", tiny_run(tmp_path / "run", *overrides)))
    with open(result.output / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # TINY_DEIT has a distillation head, so every term's label carries its (here unused) route.
    for column in ("train_ce@cls", "train_patch_cosine", "train_patch_contrast", "train_patch_mix"):
        values = [float(r[column]) for r in rows]
        assert all(math.isfinite(v) for v in values), column
    for row in rows:
        assert 0 < float(row["train_patch_cosine"]) <= 1
        assert 0 < float(row["train_patch_contrast"]) < math.log(1 + math.e**2)  # logits in [-1, 1]
        assert float(row["train_patch_mix"]) > 0
        regularisers = sum(float(row[f"train_{t}"]) for t in ("patch_cosine", "patch_contrast", "patch_mix"))
        weighted = float(row["train_ce@cls"]) + 0.1 * regularisers
        assert float(row["train_loss"]) == pytest.approx(weighted, rel=1e-4)


def test_a_missing_token_head_is_reported_before_training(tmp_path):
    from vitdistill import ConfigError, train

    cfg = load_recipe("demo_student", tiny_run(tmp_path / "run", *TINY_DEIT, "objective=[{term: ce}, {term: patch_mix}]"))
    with pytest.raises(ConfigError, match="model.token_head"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing was started
