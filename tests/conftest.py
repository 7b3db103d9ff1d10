"""Shared test helpers: tiny CPU runs on the offline digits data, and the shared CIFAR-10 set."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("VITDISTILL_PROGRESS", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITDISTILL_SHARED", ROOT.parent / "shared"))
CIFAR_ARCHIVE = SHARED / "datasets" / "cifar10-jpg.tar.gz"
CACHE = ROOT / ".cache" / "test-data"  # git-ignored: unpacked and decoded data survive between runs

# A DeiT small enough for a CPU test: 8x8 digits, 2x2 patches (16 tokens), 2 blocks of width 32.
TINY_DEIT = [
    "model.name=deit_tiny_distilled_patch16_224",
    "model.img_size=8",
    "model.patch_size=2",
    "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
]


def tiny_run(output: Path, *overrides: str) -> list[str]:
    """Overrides for a seconds-long run on digits (the demo recipes, shrunk)."""
    return [
        f"output={output}",
        "data.train_limit=256",
        "data.eval_limit=128",
        "optim.epochs=2",
        "optim.batch_size=32",
        "optim.warmup_epochs=0",
        f"data.cache_dir={CACHE}",
        *overrides,
    ]


@contextlib.contextmanager
def interrupted_at_epoch(n: int = 2):
    """Inside the block, training raises KeyboardInterrupt (as if the machine went away) when its
    ``n``-th epoch begins, after ``n - 1`` epochs and their checkpoint; restored on leaving."""
    from vitdistill.engine.trainer import Trainer

    original, calls = Trainer.train_epoch, {"n": 0}

    def train_epoch(self, epoch, bar):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, epoch, bar)

    Trainer.train_epoch = train_epoch
    try:
        yield
    finally:
        Trainer.train_epoch = original


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny CNN teacher trained for 2 epochs on digits; returns its exported weights."""
    from vitdistill import load_recipe, train

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_recipe("demo_teacher", tiny_run(out, "model.name=vitdistill_convnet_tiny", "optim.epochs=3"))
    train(cfg)
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {CIFAR_ARCHIVE} (the shared datasets folder is absent)")
    return CIFAR_ARCHIVE
