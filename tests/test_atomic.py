"""atomic_path: the target is the old version or the new one, never half, and no temporary outlives a write."""

from __future__ import annotations

import os

import pytest

from vitdistill.atomic import atomic_path, temp_path, write_text_atomic


def test_a_finished_write_replaces_the_target_and_keeps_the_writers_mode(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    mask = os.umask(0)
    os.umask(mask)
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_target_and_removes_the_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_text("old")
    temp_path(target).write_text("left by a crash")  # a stale temporary is replaced, not appended to
    with pytest.raises(RuntimeError), atomic_path(target, fsync=True) as tmp:
        assert tmp == tmp_path / "checkpoint.pt.tmp" and not tmp.exists()
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_folder_and_a_race_lost_to_another_process(tmp_path):
    target = tmp_path / "unpacked"
    with atomic_path(target, "123") as tmp:
        assert tmp.name == "unpacked.tmp123"
        (tmp / "a").mkdir(parents=True)
    assert (target / "a").is_dir()
    with atomic_path(target, "456", keep_existing=True) as tmp:  # the target appeared meanwhile: theirs is kept
        (tmp / "b").mkdir(parents=True)
    assert sorted(p.name for p in target.iterdir()) == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["unpacked"]
    with pytest.raises(OSError), atomic_path(target, "789") as tmp:  # without keep_existing, the failed rename is an error
        (tmp / "c").mkdir(parents=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unpacked"]
