"""torchrun with two CPU processes (gloo) trains the same model as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import TINY_DEIT, tiny_run
from safetensors.torch import load_file

from vitdistill import load_recipe, train


def two_processes(*args: str) -> None:
    """``vitdistill ARGS`` under torchrun with 2 processes on this machine; it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VITDISTILL_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitdistill", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(tmp_path, tiny_teacher):
    overrides = tiny_run(
        tmp_path / "one", *TINY_DEIT, f"teacher.checkpoint={tiny_teacher}", "augment.cutmix_alpha=1.0", "engine.device=cpu"
    )
    single = train(load_recipe("demo_student_distilled", overrides))
    two = [o.replace(str(tmp_path / "one"), str(tmp_path / "two")) for o in overrides]
    two_processes("train", "demo_student_distilled", *two)
    a, b = load_file(str(single.output / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for key in a:  # same global batches, gradients averaged across the processes
        assert torch.allclose(a[key], b[key], atol=2e-4, rtol=1e-3), key
    rows = open(tmp_path / "two" / "metrics.csv").read().splitlines()
    assert len(rows) == 3  # header + 2 epochs, written once (by rank 0)


def test_two_processes_write_the_same_store_as_one(tmp_path, tiny_teacher):
    import numpy as np

    from vitdistill.store import Manifest, write_store

    def overrides(folder):
        return tiny_run(
            tmp_path / "unused",
            f"teacher.checkpoint={tiny_teacher}",
            f"store.path={folder}",
            "store.epochs=2",
            "store.k=3",
            "augment.mixup_alpha=0.8",
            "augment.cutmix_alpha=1.0",
            "engine.device=cpu",
        )

    write_store(load_recipe("demo_student_distilled", overrides(tmp_path / "one")))
    two_processes("cache", "demo_student_distilled", *overrides(tmp_path / "two"))
    one, two = Manifest.read(tmp_path / "one"), Manifest.read(tmp_path / "two")
    assert one.complete_epochs() == two.complete_epochs() == [0, 1]
    for epoch in (0, 1):
        a = np.memmap(tmp_path / "one" / f"epoch_000{epoch}.bin", dtype=one.dtype, mode="r")
        b = np.memmap(tmp_path / "two" / f"epoch_000{epoch}.bin", dtype=two.dtype, mode="r")
        # each process wrote its own half; the teacher ran on other batch compositions
        assert (a["ids"][:, 0] == b["ids"][:, 0]).mean() > 0.99
        assert np.abs(a["probs"].astype(np.float32) - b["probs"].astype(np.float32)).max() < 2e-3
