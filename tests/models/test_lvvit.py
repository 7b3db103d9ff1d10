"""LV-ViT students (``lvvit_{tiny,small,medium}``): sizes, shapes, residual scaling, timm's ViT
interface, our wrapper, analysis capture and a tiny training run."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import tiny_run
from timm.layers import Attention
from timm.optim import param_groups_layer_decay

import vitdistill.models  # noqa: F401  (registers the models in timm)
from vitdistill import load_recipe, train
from vitdistill.analysis import capture
from vitdistill.config import ModelConfig
from vitdistill.models import build_model, load_model
from vitdistill.models.lvvit import LVViT, LVViTBlock

# Parameters at 224x224, 1000 classes (aux_head included), from the reference README
# (github.com/zihangJiang/TokenLabeling): LV-ViT-T 8.53M, LV-ViT-S 26.15M, LV-ViT-M 55.83M.
REFERENCE_PARAMS = {"lvvit_tiny": 8.53e6, "lvvit_small": 26.15e6, "lvvit_medium": 55.83e6}
ARCH = {  # depth, width, heads, skip_lam (reference tlt/models/lvvit.py: lvvit_t/s/m)
    "lvvit_tiny": (12, 240, 4, 1.0),
    "lvvit_small": (16, 384, 6, 2.0),
    "lvvit_medium": (20, 512, 8, 2.0),
}


def small(depth: int = 4, **kwargs) -> LVViT:
    """A CIFAR-sized LV-ViT-T (32x32, 4x4 patches: 8x8 tokens), 10 classes, ``depth`` blocks
    (12 in LV-ViT-T; fewer keeps the tests fast), in eval mode."""
    torch.manual_seed(0)
    return timm.create_model("lvvit_tiny", pretrained=False, img_size=32, patch_size=4, num_classes=10, depth=depth, **kwargs).eval()


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_and_architecture_match_the_reference(name):
    model = timm.create_model(name, pretrained=False)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.001, count  # exact to the README's 4 digits
    depth, width, heads, skip_lam = ARCH[name]
    assert len(model.blocks) == depth and model.embed_dim == model.num_features == width
    assert all(b.attn.num_heads == heads and b.skip_lam == skip_lam for b in model.blocks)
    assert model.blocks[0].mlp.fc1.out_features == 3 * width  # mlp ratio 3
    assert model.blocks[0].attn.qkv.bias is None  # qkv_bias=False
    assert model.patch_embed.grid_size == (14, 14) and model.patch_embed.patch_size == (16, 16)
    assert model.pos_embed.shape == (1, 197, width)


def test_state_dict_names_are_the_reference_ones():
    """Same names as TokenLabeling's LV_ViT (PatchEmbed4_2, Block, aux_head), so its weights load."""
    model = timm.create_model("lvvit_tiny", img_size=32, patch_size=4, num_classes=10, depth=2)
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias", "aux_head.weight", "aux_head.bias"}
    expected |= {f"patch_embed.conv{i}.weight" for i in (1, 2, 3)} | {f"patch_embed.bn{i}.{k}" for i in (1, 2, 3) for k in bn}
    expected |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(2):
        expected |= {
            f"blocks.{i}.{k}"
            for k in ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias"]
        }
        expected |= {f"blocks.{i}.mlp.{fc}.{k}" for fc in ("fc1", "fc2") for k in ("weight", "bias")}
    assert set(model.state_dict()) == expected
    assert model.patch_embed.conv1.kernel_size == (7, 7) and model.patch_embed.conv1.stride == (2, 2)
    assert model.patch_embed.proj.kernel_size == (2, 2) and model.patch_embed.proj.stride == (2, 2)


def test_cifar_shapes_and_token_head():
    model = small()
    x = torch.randn(3, 3, 32, 32)
    assert model.patch_embed(x).shape == (3, 64, 240)
    assert model.patch_embed.grid_size == (8, 8) and model.patch_embed.patch_size == (4, 4)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 65, 240)
    assert model.aux_head(tokens[:, model.num_prefix_tokens :]).shape == (3, 64, 10)
    logits = model(x)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, model.head(tokens[:, 0]))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    # the documented step-by-step order is forward_features
    steps = model.norm(model.blocks(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(steps, tokens)


def test_patch_size_and_input_size_are_checked():
    for bad in (3, 5, 1):
        with pytest.raises(ValueError, match="patch_size must be an even number"):
            timm.create_model("lvvit_tiny", img_size=32, patch_size=bad, num_classes=10)
    model = small()
    with pytest.raises(AssertionError, match="input height 64 differs"):  # as timm's ViT: unless dynamic_img_size
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):  # timm's error: no file given
        timm.create_model("lvvit_small", pretrained=True)
    # patch 2 (a 1x1 projection) and a non-square image
    odd = timm.create_model("lvvit_tiny", img_size=(8, 12), patch_size=2, num_classes=3, embed_dim=32, depth=1, num_heads=2).eval()
    assert odd.patch_embed.grid_size == (4, 6)
    assert odd.forward_features(torch.randn(2, 3, 8, 12)).shape == (2, 25, 32)


def test_residual_scaling_divides_each_branch_update():
    torch.manual_seed(0)
    one = LVViTBlock(16, num_heads=2, skip_lam=1.0).eval()
    two = LVViTBlock(16, num_heads=2, skip_lam=2.0).eval()
    two.load_state_dict(one.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        # the whole block, against the formula
        h = x + two.attn(two.norm1(x)) / 2
        torch.testing.assert_close(two(x), h + two.mlp(two.norm2(h)) / 2)
        assert not torch.allclose(one(x), two(x))
        # each branch alone (the other zeroed): the update is exactly half
        for branch in ("mlp.fc2", "attn.proj"):
            a, b = LVViTBlock(16, 2, skip_lam=1.0).eval(), LVViTBlock(16, 2, skip_lam=2.0).eval()
            a.load_state_dict(one.state_dict())
            layer = a.get_submodule(branch)
            layer.weight.zero_()
            layer.bias.zero_()
            b.load_state_dict(a.state_dict())
            update_one, update_two = a(x) - x, b(x) - x
            assert update_one.abs().max() > 1e-3
            torch.testing.assert_close(update_two, update_one / 2)


def test_drop_path_schedule_is_linear():
    model = timm.create_model("lvvit_tiny", img_size=32, patch_size=4, num_classes=10, drop_path_rate=0.3, depth=4)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_forward_intermediates_follows_timm_vit():
    model = small()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        final, inter = model.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt="NLC")
        torch.testing.assert_close(final, tokens)
        assert len(inter) == 2 and inter[0].shape == (2, 64, 240)
        torch.testing.assert_close(inter[-1], tokens[:, 1:])
        # without norm: the raw block output
        _, raw = model.forward_intermediates(x, indices=1, output_fmt="NLC")
        torch.testing.assert_close(model.norm(raw[0]), tokens[:, 1:])
        # prefix tokens come paired with the patch tokens
        _, pairs = model.forward_intermediates(x, indices=1, norm=True, return_prefix_tokens=True, output_fmt="NLC")
        patches, prefix = pairs[0]
        assert prefix.shape == (2, 1, 240)
        torch.testing.assert_close(prefix, tokens[:, :1])
        torch.testing.assert_close(patches, tokens[:, 1:])
        # NCHW: [B, D, H, W] of the same patch tokens (raster order)
        maps = model.forward_intermediates(x, indices=[1, 2], output_fmt="NCHW", intermediates_only=True, stop_early=True)
        _, nlc = model.forward_intermediates(x, indices=[1, 2], output_fmt="NLC")
        assert [m.shape for m in maps] == [(2, 240, 8, 8)] * 2
        torch.testing.assert_close(maps[1], nlc[1].transpose(1, 2).reshape(2, 240, 8, 8))
        # default: every block, NCHW
        _, every = model.forward_intermediates(x)
        assert len(every) == 4 and every[0].shape == (2, 240, 8, 8)
        out = model.forward_intermediates(x, indices=2, output_dict=True, return_prefix_tokens=True)
        assert set(out) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    with pytest.raises(Exception, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_timm_interface_heads_and_layer_decay():
    model = small()
    assert model.num_prefix_tokens == 1 and model.global_pool == "token"
    assert isinstance(model.blocks, torch.nn.Sequential) and all(isinstance(b.attn, Attention) for b in model.blocks)
    assert isinstance(model.head_drop, torch.nn.Dropout) and model.get_classifier() is model.head
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model.aux_head.out_features == 7 and model.num_classes == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 240)
    # layer-wise lr decay as for timm's ViT: stem, one group per block (the final norm with the
    # last block), the heads undecayed
    model = small()
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.5)
    scales = {}
    for group in groups:
        for p in group["params"]:
            scales[p] = group["lr_scale"]
    depth = len(model.blocks)
    assert scales[model.pos_embed] == scales[model.patch_embed.conv1.weight] == pytest.approx(0.5 ** (depth + 1))
    assert scales[model.blocks[0].attn.qkv.weight] == pytest.approx(0.5**depth)
    assert scales[model.blocks[-1].mlp.fc2.weight] == scales[model.norm.weight] == pytest.approx(0.5)
    assert scales[model.head.weight] == scales[model.aux_head.weight] == pytest.approx(1.0)
    model.set_grad_checkpointing(True)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.patch_embed.conv1.weight.grad is not None


def test_through_our_wrapper():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lvvit_tiny", img_size=32, patch_size=4), 10).eval()
    assert model.is_vit and model.token_head is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.logits.shape == (2, 10) and out.tokens.shape == (2, 65, 240) and out.num_prefix == 1
        assert out.token_logits.shape == (2, 64, 10)
        torch.testing.assert_close(out.token_logits, model.backbone.aux_head(out.tokens[:, 1:]))
        model.capture({0, -1})
        captured = model(x)
    assert set(captured.block_tokens) == {0, 11}
    assert all(t.shape == (2, 64, 240) for t in captured.block_tokens.values())
    torch.testing.assert_close(model.backbone.norm(captured.block_tokens[11]), out.tokens[:, 1:])
    torch.testing.assert_close(captured.logits, out.logits)


def test_analysis_capture_gives_attention_probabilities():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lvvit_tiny", img_size=32, patch_size=4, kwargs={"depth": 3}), 10)
    fused = [b.attn.fused_attn for b in model.backbone.blocks]
    result = capture(model, torch.randn(2, 3, 32, 32))
    layout = result.layout
    assert (layout.depth, layout.num_heads, layout.num_prefix, layout.grid, layout.patch_size) == (3, 4, 1, (8, 8), (4, 4))
    assert not layout.has_dist_token
    assert len(result.attention) == 3 and len(result.tokens) == 3
    for attn in result.attention:
        assert attn.shape == (2, 4, 65, 65)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 65))
    assert result.embeddings.shape == (2, 65, 240)
    assert [b.attn.fused_attn for b in model.backbone.blocks] == fused  # restored


def test_tiny_training_run_on_digits(tmp_path):
    overrides = ["model.name=lvvit_tiny", "model.img_size=8", "model.patch_size=2", "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}"]
    result = train(load_recipe("demo_student", tiny_run(tmp_path / "run", *overrides)))
    assert len(result.history) == 2
    first, last = result.history
    assert last["train_loss"] < first["train_loss"] and last["eval_top1"] > 15.0  # it learns: chance is 10%
    model = load_model(result.output / "model.safetensors")
    net = model.backbone
    assert isinstance(net, LVViT) and net.embed_dim == 32 and len(net.blocks) == 2 and net.patch_embed.grid_size == (4, 4)
    with torch.no_grad():
        out = model(torch.randn(4, 3, 8, 8))
    assert out.logits.shape == (4, 10) and out.token_logits.shape == (4, 16, 10)


def test_dynamic_img_size_through_our_wrapper_with_mixtoken():
    """dynamic_img_size: other input sizes work, and MixToken (between patch embedding and
    position embedding, on the NHWC grid) mixes in raster order as with fixed sizes."""
    from vitdistill.models.output import TokenMix

    torch.manual_seed(0)
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "dynamic_img_size": True}
    model = build_model(ModelConfig(name="lvvit_tiny", img_size=16, patch_size=4, kwargs=kwargs), 10).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
        unmixed = model(x, token_mix=TokenMix(torch.zeros(3, 16, dtype=torch.bool), torch.arange(3)))
        swapped = model(x, token_mix=TokenMix(torch.ones(3, 16, dtype=torch.bool), torch.tensor([2, 1, 0])))
        larger = model(torch.randn(2, 3, 24, 24))
    torch.testing.assert_close(unmixed.logits, plain.logits)
    torch.testing.assert_close(swapped.logits, plain.logits[[2, 1, 0]])  # every patch token from the partner
    assert larger.token_logits.shape == (2, 36, 10) and larger.logits.shape == (2, 10)


def test_checkpoint_filter_unwraps_training_checkpoints_and_resamples_positions():
    from vitdistill.models.lvvit import checkpoint_filter_fn

    trained = small(depth=1)  # 8x8 tokens
    wrapped = {"epoch": 3, "model": {f"module.{k}": v for k, v in trained.state_dict().items()}}  # a DDP training checkpoint
    wider = timm.create_model("lvvit_tiny", pretrained=False, img_size=(32, 48), patch_size=4, num_classes=10, depth=1)  # 8x12 tokens
    state = checkpoint_filter_fn(wrapped, wider)
    assert set(state) == set(trained.state_dict())
    assert state["pos_embed"].shape == wider.pos_embed.shape == (1, 1 + 8 * 12, trained.embed_dim)
    wider.load_state_dict(state)
