"""Issue 19: pixels are never silently dropped (case 5); a resume that would rewrite the finished
run's history is refused (case 7)."""

from __future__ import annotations

import pytest
import yaml
from conftest import TINY_DEIT, tiny_run

from vitdistill.cli import main
from vitdistill.errors import ConfigError
from vitdistill.validate import load_recipe


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["augment.input_size=30", "model.img_size=30", "model.patch_size=4"], "augment.input_size", "last 2 rows and columns"),
        (["augment.input_size=9", "model.img_size=9", "model.patch_size=2"], "augment.input_size", "use 8 or 10"),
        (
            ["model.name=deit_tiny_patch16_224", "model.patch_size=null", "augment.input_size=40", "model.img_size=40"],
            "augment.input_size",
            "patch size 16",
        ),
        (["augment.input_size=32", "model.img_size=30", "model.patch_size=4"], "model.img_size", "last 2 rows"),
    ],
)
def test_input_size_must_tile_into_patches(overrides, key, words):
    with pytest.raises(ConfigError, match=words) as err:
        load_recipe("demo_student", overrides)
    assert str(err.value).startswith(key)


@pytest.mark.parametrize(
    "overrides",
    [
        ["augment.input_size=32", "model.img_size=32", "model.patch_size=4"],  # N: exactly tiles
        ["augment.input_size=8", "model.img_size=8", "model.patch_size=2"],
        [
            "model.name=vitdistill_convnet_tiny",
            "model.patch_size=null",
            "model.img_size=null",
            "model.kwargs={}",
            "augment.input_size=9",
        ],  # no patches: any size
    ],
)
def test_sizes_that_tile_are_accepted(overrides):
    load_recipe("demo_student", overrides)


def test_resume_with_fewer_epochs_or_new_ema_is_refused_and_keeps_config(tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_run(out, *TINY_DEIT, "optim.epochs=2", "data.train_limit=64", "data.eval_limit=32")
    assert main(["train", "demo_student", *args]) == 0
    before = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "demo_student", *args, "optim.epochs=1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.epochs=1" in err and "2 epochs are already complete" in err
    assert (out / "config.yaml").read_bytes() == before
    assert main(["train", "demo_student", *args, "engine.ema_decay=0.9", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "engine.ema_decay" in err
    assert (out / "config.yaml").read_bytes() == before
    # the same number of epochs (N, not N+1) is a finished run: resumed, nothing trained, config kept
    assert main(["train", "demo_student", *args, "--resume"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["epochs"] == 2


def test_a_schedule_ending_mid_epoch_trains_exactly_its_steps(tmp_path):
    """A (budget) plan that ends 3 steps into the second epoch: 3 steps there, not 4, and the
    partial epoch is the last (evaluated)."""
    from vitdistill.device import setup_distributed
    from vitdistill.runner import build_trainer

    cfg = load_recipe(
        "demo_student", tiny_run(tmp_path / "run", *TINY_DEIT, "optim.epochs=3", "data.train_limit=128", "data.eval_limit=32")
    )
    (tmp_path / "run").mkdir()
    trainer = build_trainer(cfg, setup_distributed("cpu"), tmp_path / "run")
    assert trainer.steps == 4  # 128 images, batches of 32
    trainer.total_steps = trainer.steps + 3
    history = trainer.fit()
    assert trainer.num_updates == 7 and len(history) == 2 and "eval_top1" in history[-1]
