"""Runs that survive a cluster (issue 18): preemption signals end a run at a step boundary with a
checkpoint and one line; checkpoints inside epochs resume exactly; ``--resume auto``; one run per
output folder."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_DEIT, interrupted_at_epoch, tiny_run
from safetensors.torch import load_file

from vitdistill import load_recipe, train
from vitdistill.cli import main
from vitdistill.engine.trainer import Trainer
from vitdistill.errors import UserError

# drop-path and mixing draw random numbers: a resume that lost the generator's state would differ
STUDENT = [
    *TINY_DEIT,
    "model.drop_path=0.1",
    "augment.mixup_alpha=0.8",
    "augment.cutmix_alpha=1.0",
    "engine.ema_decay=0.9",
    "engine.device=cpu",
    "optim.epochs=2",
]


def recipe(folder, *more):
    return load_recipe("demo_student", tiny_run(folder, *STUDENT, *more))


def assert_same_run(a, b):
    for name in ("model.safetensors", "model_ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)
    ra, rb = (list(csv.DictReader((f / "metrics.csv").read_text().splitlines())) for f in (a, b))
    keys = [k for k in ra[0] if not k.startswith(("train_time", "train_img"))]  # all but the clock
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(recipe(out))
    return out


def signal_at_step(monkeypatch, signum: int, at: int):
    """Send ``signum`` to this process during training step number ``at`` (counted over the run)."""
    original, count = Trainer.train_step, {"n": 0}

    def train_step(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == at:
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize(("signum", "at"), [(signal.SIGTERM, 3), (signal.SIGUSR1, 8), (signal.SIGINT, 11)])
def test_a_signal_stops_at_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, capsys, straight, signum, at):
    out = tmp_path / "run"
    signal_at_step(monkeypatch, signum, at)
    argv = ["train", "demo_student", *tiny_run(out, *STUDENT)]
    assert main(argv) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    name = signal.Signals(signum).name
    # 8 steps an epoch: the step during which the signal came is finished, then saved
    epoch, step = divmod(at, 8)
    where = f"after epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}/8"
    assert err[0].startswith(f"vitdistill: stopped by {name} {where}; checkpoint {out / 'checkpoint.pt'}; continue with: vitdistill train")
    assert err[0].endswith(f"--resume auto (exit {128 + signum})")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (epoch, step)
    assert not (out / "model.safetensors").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".lock" in p.name]
    monkeypatch.undo()
    assert main([*argv, "--resume", "auto"]) == 0
    assert_same_run(straight, out)


def test_a_signal_before_training_saves_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from vitdistill import runner

    original = runner.build_trainer

    def build_trainer(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "build_trainer", build_trainer)
    assert main(["train", "demo_student", *tiny_run(tmp_path / "run", *STUDENT)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vitdistill: stopped by SIGINT before anything was saved; run the same command again to start over (exit 130)"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name or ".lock" in p.name]


def test_checkpoint_every_steps_writes_inside_epochs_and_resumes_exactly(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    saved = []
    original = Trainer.save_inside

    def save_inside(self, epoch, step, partial):
        saved.append((epoch, step))
        original(self, epoch, step, partial)
        if (epoch, step) == (1, 6):
            raise KeyboardInterrupt  # the machine went away after this checkpoint

    monkeypatch.setattr(Trainer, "save_inside", save_inside)
    with pytest.raises(KeyboardInterrupt):
        train(recipe(out, "engine.checkpoint_every=3"))
    assert saved == [(0, 3), (0, 6), (1, 3), (1, 6)]  # every 3 steps, counted from the epoch's end checkpoint too
    monkeypatch.undo()
    train(recipe(out, "engine.checkpoint_every=3"), resume="auto")
    assert_same_run(straight, out)


def test_resume_auto_starts_or_continues_and_plain_resume_still_fails(tmp_path, straight):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="does not exist"):
        train(recipe(out), resume=True)
    with interrupted_at_epoch(2), pytest.raises(KeyboardInterrupt):
        train(recipe(out), resume="auto")  # nothing to resume: starts
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    train(recipe(out), resume="auto")  # continues to epoch 2
    assert_same_run(straight, out)
    with pytest.raises(UserError, match="optim.lr"):  # another recipe's checkpoint is not silently replaced
        train(recipe(out, "optim.lr=1e-2"), resume="auto")


def test_resume_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "demo_student", "--resume", *tiny_run(out, *STUDENT)]) == 2  # `--resume key=value`: a bare --resume
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "demo_student", "--resume", "sometimes"])


def test_a_second_run_into_the_same_folder_stops_naming_the_first(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vitdistill", "train", "demo_student", *tiny_run(out, *STUDENT, "optim.epochs=50")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VITDISTILL_PROGRESS": "0"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".vitdistill.lock"
        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert lock.exists()
        with pytest.raises(UserError, match=f"in use by another run \\(process {first.pid}\\)"):
            train(recipe(out))
        first.send_signal(signal.SIGTERM)
        assert first.wait(120) == 143
        assert "stopped by SIGTERM" in first.stderr.read()
    finally:
        first.kill()
        first.wait()
    assert not lock.exists()  # released on exit


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    from vitdistill.lock import LOCK_NAME, folder_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"{os.uname().nodename} {dead.pid}\n")
    with folder_lock(tmp_path) as lock:
        assert lock.read_text().split()[1] == str(os.getpid())
    assert not lock.exists()
    (tmp_path / LOCK_NAME).write_text(f"{os.uname().nodename} {os.getppid()}\n")  # alive
    with pytest.raises(UserError, match=f"process {os.getppid()}"), folder_lock(tmp_path):
        pass


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitdistill", *args]


CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VITDISTILL_PROGRESS": "0"}


def kill_at_position(cmd: list[str], checkpoint, position: int, steps: int) -> None:
    """Start ``cmd`` and ``kill -9`` it once its checkpoint holds ``position`` steps or more."""
    proc = subprocess.Popen(cmd, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = None
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if stamp is not None and stamp != seen:
                seen = stamp
                state = torch.load(checkpoint, weights_only=False)
                if state["epoch"] * steps + state["step"] >= position:
                    proc.kill()
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_auto_equals_the_uninterrupted_run(tmp_path):
    import random

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    every = ["engine.checkpoint_every=1"]
    assert (
        subprocess.run(
            cli("train", "demo_student", *tiny_run(straight, *STUDENT, *every)), env=CLI_ENV, capture_output=True, check=False
        ).returncode
        == 0
    )
    cmd = cli("train", "demo_student", *tiny_run(killed, *STUDENT, *every), "--resume", "auto")
    positions = sorted(random.Random(os.getpid()).sample(range(2, 15), 2))  # 16 steps in all (2 epochs of 8)
    for position in positions:
        kill_at_position(cmd, killed / "checkpoint.pt", position, 8)
    state = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) != (2, 0), "the run finished before it was killed"
    assert (killed / ".vitdistill.lock").exists()  # left by the killed process...
    done = subprocess.run(cmd, env=CLI_ENV, capture_output=True, text=True, check=False)  # ...and taken over
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vitdistill: resuming from" in done.stdout
    assert_same_run(straight, killed)


def test_labelmaps_stopped_by_a_signal_continue_at_the_next_batch_to_the_same_file(tmp_path, tiny_teacher, monkeypatch, capsys):
    from vitdistill.labelmaps import maps

    def argv(folder):
        return [
            "labelmaps",
            "demo_student_distilled",
            *tiny_run(
                tmp_path / "unused", f"teacher.checkpoint={tiny_teacher}", f"labelmaps.path={folder}", "labelmaps.k=3", "engine.device=cpu"
            ),
        ]

    assert main(argv(tmp_path / "straight")) == 0
    original, calls = maps.whole_image_scores, {"n": 0}

    def scores(teacher, source, index, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # the probe, then batches 1 and 2 are written; the signal comes before the 3rd
            os.kill(os.getpid(), signal.SIGTERM)
        return original(teacher, source, index, *args)

    monkeypatch.setattr(maps, "whole_image_scores", scores)
    out = tmp_path / "resumed"
    capsys.readouterr()
    assert main(argv(out)) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"vitdistill: stopped by SIGTERM after 2/8 batches (kept in labelmaps.bin.partial); checkpoint {out}"
    )
    assert not (out / "labelmaps.bin").exists() and not (out / ".vitdistill.lock").exists()
    calls["n"] = 0
    monkeypatch.setattr(maps, "whole_image_scores", lambda *a: (calls.__setitem__("n", calls["n"] + 1), original(*a))[1])
    assert main(argv(out)) == 0
    assert calls["n"] == 1 + 8 - 2  # the probe and the 6 batches not written
    assert (out / "labelmaps.bin").read_bytes() == (tmp_path / "straight" / "labelmaps.bin").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())


def session_processes(sid: int) -> list[int]:
    """Processes still alive in session ``sid`` (a command started with start_new_session)."""
    alive = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = Path(f"/proc/{stat}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
                alive.append(int(stat))
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_while_decoding_leaves_no_temporary_file_and_no_worker(tmp_path, signum):
    from PIL import Image

    root, cache = tmp_path / "images", tmp_path / "cache"
    noise = torch.Generator().manual_seed(0)
    for split, count in (("train", 3000), ("val", 20)):
        for i in range(count):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (96, 96, 3), generator=noise, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    cmd = cli(
        "train",
        "demo_student",
        f"output={tmp_path / 'run'}",
        "data.source=imagefolder",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        "engine.device=cpu",
    )
    proc = subprocess.Popen(cmd, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not [p for p in cache.rglob("*") if ".tmp" in p.name] and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "decoding ended before the signal"
        proc.send_signal(signum)
        assert proc.wait(60) == 128 + signum
        err = proc.stderr.read().strip().splitlines()
        assert (
            err[-1]
            == f"vitdistill: stopped by {signal.Signals(signum).name} before anything was saved; run the same command again to start over (exit {128 + signum})"
        )
        time.sleep(1)
        assert session_processes(proc.pid) == []  # the decoding workers are gone with it
        assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    finally:
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
