"""Analysis: metrics on inputs with known answers, hooks on a real timm ViT, the loss landscape,
and ``analyze`` end to end on tiny trained models."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run

from vitdistill import load_recipe, train
from vitdistill.analysis import analyze, capture, filter_normalized_direction, loss_landscape_1d, loss_landscape_2d, metrics, vit_layout
from vitdistill.analysis.landscape import axis, evaluate_batches
from vitdistill.errors import UserError
from vitdistill.models import ModelSpec, VisionModel
from vitdistill.models.network import create_backbone

TINY_VIT = ["model.img_size=8", "model.patch_size=2", "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}"]


# ---------------------------------------------------------------------------- metrics
def test_patch_cosine_identical_tokens_is_one_and_orthogonal_tokens_zero():
    prefix = torch.randn(3, 2, 8) * 10  # prefix tokens differ wildly: they must be excluded
    same = torch.randn(3, 1, 8).expand(3, 9, 8)
    assert metrics.patch_cosine_similarity(torch.cat([prefix, same], 1), num_prefix=2).item() == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(8)[None, :6].expand(3, 6, 8) * torch.arange(1, 7.0)[None, :, None]  # orthogonal, unequal norms
    assert metrics.patch_cosine_similarity(torch.cat([prefix, eye], 1), num_prefix=2).item() == pytest.approx(0.0, abs=1e-6)


def test_patch_cosine_equals_the_pairwise_definition():
    x = torch.randn(4, 1 + 5, 7)
    u = F.normalize(x[:, 1:], dim=-1)
    expected = sum(float((u[:, i] * u[:, j]).sum(-1).mean()) for i in range(5) for j in range(5) if i != j) / 20
    assert metrics.patch_cosine_similarity(x, 1).item() == pytest.approx(expected, abs=1e-5)


def _one_hot_attention(targets: list[int], prefix: int, batch: int = 2, heads: int = 3) -> torch.Tensor:
    t = prefix + len(targets)
    attn = torch.full((batch, heads, t, t), 1.0 / t)  # prefix queries: uniform (ignored by the distance)
    for q, k in enumerate(targets):
        attn[:, :, prefix + q] = F.one_hot(torch.tensor(prefix + k), t).float()
    return attn


def test_attention_std_is_zero_for_uniform_and_known_for_one_hot():
    assert metrics.attention_std(torch.full((2, 3, 10, 10), 0.1)).item() == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.eye(10).expand(2, 3, 10, 10)
    assert metrics.attention_std(one_hot).item() == pytest.approx(math.sqrt(9) / 10, rel=1e-5)


def test_uniform_attention_distance_is_the_mean_pairwise_patch_distance():
    grid, patch, prefix = (3, 3), 4, 1
    centres = [((r + 0.5) * patch, (c + 0.5) * patch) for r in range(3) for c in range(3)]
    pairs = list(itertools.product(centres, centres))  # ordered pairs, self pairs (distance 0) included
    expected = sum(math.dist(a, b) for a, b in pairs) / len(pairs)
    # Attention also on the class token: the patch part is renormalised before weighting.
    attn = torch.full((2, 3, 10, 10), 1.0 / 10)
    distance = metrics.attention_distance(attn, grid, patch, prefix)
    assert distance.shape == (3,)
    assert torch.allclose(distance, torch.full((3,), expected), atol=1e-5)


def test_self_attention_has_distance_zero_and_a_shift_has_the_patch_size():
    grid, prefix = (3, 4), 2
    n = 12
    assert torch.allclose(metrics.attention_distance(_one_hot_attention(list(range(n)), prefix), grid, (2, 3), prefix), torch.zeros(3))
    # Each query looks at the patch to its right (the last column at the one to its left): one
    # patch width (3 px) away; below/above: one patch height (2 px).
    right = [q + 1 if q % 4 < 3 else q - 1 for q in range(n)]
    down = [q + 4 if q < 8 else q - 4 for q in range(n)]
    assert torch.allclose(metrics.attention_distance(_one_hot_attention(right, prefix), grid, (2, 3), prefix), torch.full((3,), 3.0))
    assert torch.allclose(metrics.attention_distance(_one_hot_attention(down, prefix), grid, (2, 3), prefix), torch.full((3,), 2.0))
    # Half the attention on a prefix token does not change the distance (renormalised over patches).
    half = _one_hot_attention(right, prefix)
    half[:, :, prefix:] *= 0.5
    half[:, :, prefix:, 0] += 0.5
    assert torch.allclose(metrics.attention_distance(half, grid, (2, 3), prefix), torch.full((3,), 3.0))


def test_head_similarity_identical_heads_one_and_disjoint_heads_zero():
    attn = torch.softmax(torch.randn(2, 1, 6, 6), -1).expand(2, 4, 6, 6)
    assert metrics.head_similarity(attn).item() == pytest.approx(1.0, abs=1e-6)
    disjoint = torch.stack([torch.eye(6), torch.eye(6).roll(1, dims=1)])[None].expand(3, 2, 6, 6)
    assert metrics.head_similarity(disjoint).item() == pytest.approx(0.0, abs=1e-6)
    matrix = metrics.head_similarity_matrix(disjoint)
    assert torch.allclose(matrix, torch.eye(2), atol=1e-6)


def test_mean_map_token_and_head_cosines():
    attn = torch.stack([torch.eye(3), torch.ones(3, 3) / 3])[None].expand(2, 2, 3, 3)
    assert torch.allclose(metrics.mean_attention_map(attn), (torch.eye(3) + 1 / 3) / 2)
    tokens = torch.randn(5, 4, 6)
    tokens[:, 1] = 3 * tokens[:, 0]
    tokens[:, 2] = -tokens[:, 0]
    assert metrics.token_cosine(tokens, 0, 1).item() == pytest.approx(1.0, abs=1e-6)
    assert metrics.token_cosine(tokens, 0, 2).item() == pytest.approx(-1.0, abs=1e-6)
    z = torch.randn(4, 10)
    assert metrics.logit_cosine(z, 2 * z).item() == pytest.approx(1.0, abs=1e-6)
    w = torch.randn(10, 8)
    assert metrics.weight_cosine(w, w).item() == pytest.approx(1.0, abs=1e-6)
    assert metrics.weight_cosine(w, -w).item() == pytest.approx(-1.0, abs=1e-6)


# ---------------------------------------------------------------------------- capture
def _tiny_model(name: str = "deit_tiny_distilled_patch16_224", **kwargs) -> VisionModel:
    torch.manual_seed(0)
    spec = ModelSpec(
        name=name, num_classes=10, kwargs={"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 3, "num_heads": 2, **kwargs}
    )
    return VisionModel(create_backbone(spec), spec).eval()


@pytest.mark.parametrize("name, prefix", [("deit_tiny_distilled_patch16_224", 2), ("deit_tiny_patch16_224", 1)])
def test_capture_on_a_timm_vit(name, prefix):
    model = _tiny_model(name)
    fused = [b.attn.fused_attn for b in model.backbone.blocks]
    x = torch.randn(4, 3, 8, 8)
    cap = capture(model, x)
    assert cap.layout.num_prefix == prefix and cap.layout.grid == (4, 4) and cap.layout.patch_size == (2, 2)
    assert len(cap.tokens) == len(cap.attention) == 3
    for tokens, attn in zip(cap.tokens, cap.attention):
        assert tokens.shape == (4, prefix + 16, 32)
        assert attn.shape == (4, 2, prefix + 16, prefix + 16)
        assert torch.allclose(attn.sum(-1), torch.ones(4, 2, prefix + 16), atol=1e-5)
    assert cap.embeddings.shape == (4, prefix + 16, 32)
    # The captured pieces are the model's own computation: the final norm of the last block's
    # output is forward_features (run with the model's own, fused, attention).
    with torch.no_grad():
        features = model.backbone.forward_features(x)
        assert torch.allclose(model.backbone.norm(cap.tokens[-1]), features, atol=1e-5)
        # Block 0 recomputed from the captured embedding gives the captured block-0 output.
        assert torch.allclose(model.backbone.blocks[0](cap.embeddings), cap.tokens[0], atol=1e-5)
        # The attention is the softmax(q k^T / sqrt(d)) of block 0 on its input.
        attn = model.backbone.blocks[0].attn
        h = model.backbone.blocks[0].norm1(cap.embeddings)
        q, k, _ = attn.qkv(h).reshape(4, prefix + 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
        assert torch.allclose(torch.softmax(q @ k.transpose(-2, -1) * attn.scale, -1), cap.attention[0], atol=1e-5)
    assert [b.attn.fused_attn for b in model.backbone.blocks] == fused
    assert not any(b._forward_hooks or b._forward_pre_hooks or b.attn.attn_drop._forward_hooks for b in model.backbone.blocks)


def test_non_vit_has_no_layout_and_capture_is_a_clear_error():
    spec = ModelSpec(name="vitdistill_convnet_tiny", num_classes=10)
    model = VisionModel(create_backbone(spec), spec).eval()
    assert vit_layout(model) is None
    with pytest.raises(UserError, match="no attention/tokens"):
        capture(model, torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------------------- landscape
def _batches(n_batches: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n_batches)]


def test_filter_normalised_direction_matches_filter_norms_and_is_seeded():
    model = _tiny_model()
    d = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    again = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    other = filter_normalized_direction(model, torch.Generator().manual_seed(4))
    checked = 0
    for name, p in model.named_parameters():
        assert d[name].shape == p.shape
        assert torch.equal(d[name], again[name])
        if p.dim() <= 1:
            assert not d[name].any(), name  # biases and norm scales are not moved
            continue
        assert torch.allclose(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5), name
        assert not torch.equal(d[name], other[name])
        checked += 1
    assert checked > 10


def test_landscape_origin_is_the_model_loss_and_weights_are_restored():
    model = _tiny_model()
    batches = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, top1 = evaluate_batches(model, batches)
    with torch.no_grad():
        logits = torch.cat([model(x).head("mean") for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert top1 == pytest.approx(100 * (logits.argmax(-1) == labels).float().mean().item())
    alphas = axis(1.0, 5)
    assert alphas == [-1.0, -0.5, 0.0, 0.5, 1.0]
    curve = loss_landscape_1d(model, batches, alphas, seed=0)
    assert curve["loss"][2] == pytest.approx(loss, abs=1e-6) and curve["top1"][2] == pytest.approx(top1)
    assert curve["loss"][0] != pytest.approx(loss) and curve["loss"][-1] != pytest.approx(loss)
    assert loss_landscape_1d(model, batches, alphas, seed=0) == curve  # reproducible
    surface = loss_landscape_2d(model, batches, alphas, alphas[1:4], seed=0)
    assert len(surface["loss"]) == 5 and all(len(row) == 3 for row in surface["loss"])
    assert surface["loss"][2][1] == pytest.approx(loss, abs=1e-6)
    # The 1-D direction is the first of the 2-D pair: beta = 0 is the 1-D curve.
    assert [row[1] for row in surface["loss"]] == pytest.approx(curve["loss"], abs=1e-6)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny ViTs (distilled architecture, plain DeiT) and a tiny CNN, 1 epoch on digits."""
    root = tmp_path_factory.mktemp("analysis")
    runs = {  # name: (recipe, overrides); demo_student's objective is ce only (no teacher needed)
        "distilled": ("demo_student", ["model.name=deit_tiny_distilled_patch16_224", *TINY_VIT]),
        "plain": ("demo_student", TINY_VIT),
        "cnn": ("demo_teacher", ["model.name=vitdistill_convnet_tiny"]),
    }
    for name, (recipe, extra) in runs.items():
        train(load_recipe(recipe, tiny_run(root / name, "optim.epochs=1", *extra)))
    return {name: root / name for name in runs}


def _check_model_entry(entry: dict, depth: int, heads: int, dist: bool):
    layers = entry["layers"]
    for key in ("patch_cosine", "attention_std", "attention_distance", "attention_distance_mean", "head_similarity"):
        assert len(layers[key]) == depth, key
    assert all(len(row) == heads for row in layers["attention_distance"])
    assert all(-1 <= v <= 1 for v in layers["patch_cosine"] + layers["head_similarity"])
    assert (layers["cls_dist_cosine"] is not None) == dist
    if dist:
        assert len(layers["cls_dist_cosine"]) == depth
        assert entry["heads"]["logit_cosine"] is not None and entry["heads"]["weight_cosine"] is not None
    assert 0 <= entry["top1"] <= 100 and entry["loss"] > 0
    land = entry["landscape"]
    assert len(land["1d"]["loss"]) == 5 and len(land["2d"]["loss"]) == 3
    if land["images"] == entry["images"]:  # same images: alpha = 0 is the model's own loss
        assert land["1d"]["loss"][2] == pytest.approx(entry["loss"], rel=1e-5)


def test_analyze_one_model(trained, tmp_path):
    out = tmp_path / "report"
    result = analyze(trained["distilled"], out, images=64, landscape_images=64, landscape_steps=5, landscape_grid=3, device="cpu")
    assert json.loads((out / "analysis.json").read_text()) == result
    assert result["images"] == 64 and result["compare"] is None and len(result["models"]) == 1
    _check_model_entry(result["models"][0], depth=2, heads=2, dist=True)
    assert set(result["figures"]) == {
        "patch_similarity",
        "attention_std",
        "attention_distance",
        "head_similarity",
        "attention_maps",
        "cls_dist_cosine",
        "landscape_1d",
        "landscape_2d",
    }
    report = (out / "report.md").read_text()
    for file in result["figures"].values():
        assert (out / file).stat().st_size > 1000
        assert f"]({file})" in report
    assert "patch cosine similarity, last block" in report


def test_analyze_compare_and_a_cnn(trained, tmp_path):
    out = tmp_path / "compare"
    result = analyze(
        trained["distilled"],
        out,
        compare=trained["plain"],
        images=48,
        landscape_images=32,
        landscape_steps=5,
        landscape_grid=3,
        device="cpu",
    )
    a, b = result["models"]
    assert (a["label"], b["label"]) == ("distilled", "plain")
    _check_model_entry(a, depth=2, heads=2, dist=True)
    _check_model_entry(b, depth=2, heads=2, dist=False)
    assert b["heads"] is None
    assert result["landscape_images"] == 32 and a["landscape"]["images"] == 32
    report = (out / "report.md").read_text()
    assert "| distilled | plain |" in report
    for file in result["figures"].values():
        assert (out / file).stat().st_size > 1000 and f"]({file})" in report

    cnn_out = tmp_path / "cnn"
    cnn = analyze(
        trained["cnn"], cnn_out, compare=trained["plain"], images=32, landscape_images=32, landscape_steps=3, landscape_grid=0, device="cpu"
    )
    first = cnn["models"][0]
    assert first["attention"] is False and first["layers"] is None and "no attention/tokens" in first["note"]
    assert len(first["landscape"]["1d"]["loss"]) == 3 and "2d" not in first["landscape"]
    assert "landscape_2d" not in cnn["figures"] and "cls_dist_cosine" not in cnn["figures"]
    assert "patch_similarity" in cnn["figures"]  # drawn for the ViT it is compared with
    assert "no attention/tokens" in (cnn_out / "report.md").read_text()


def test_analyze_rejects_bad_arguments(trained, tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        analyze(trained["plain"], tmp_path / "x", landscape_steps=1, device="cpu")
    with pytest.raises(UserError, match="positive"):
        analyze(trained["plain"], tmp_path / "x", images=0, device="cpu")
