"""Nothing silently wrong in the data path (issue 19): correct pixels from every image mode, EXIF
orientation, subfolders, unreadable files, broken links, file names that are not UTF-8, a full
disk under the decode cache, decompression bombs (README, "When things go wrong")."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from vitdistill import UserError
from vitdistill.config import DataConfig
from vitdistill.data import decoded, open_source, records
from vitdistill.data.hf import load_split


def folder(root: Path, files: dict[str, Image.Image], split: str = "train") -> Path:
    """An ImageFolder split from ``{"class/name.png": image}``."""
    for name, img in files.items():
        path = root / split / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return root


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def cfg_for(tmp_path: Path, root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


# ------------------------------------------------------------------ 3. every mode, EXIF orientation
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    grey16 = Image.fromarray(np.full((6, 10), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    assert grey16.mode.startswith("I")
    root = folder(tmp_path / "d", {"a/grey16.png": grey16, "b/x.png": noise(6, 10, 0)})
    images = open_source(cfg_for(tmp_path, root), "train").images
    assert (images[0].numpy() == 128).all()  # 32768 >> 8, not the 255 convert() clips it to
    eight_in_i = Image.fromarray(np.full((6, 10), 200, dtype=np.int32), "I")  # 8-bit values in a 32-bit mode: kept
    root = folder(tmp_path / "e", {"a/i.tiff": eight_in_i, "b/x.png": noise(6, 10, 0)})
    assert (open_source(cfg_for(tmp_path, root), "train").images[0].numpy() == 200).all()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "CMYK", "F", "I"])
def test_every_mode_decodes_to_the_rgb_pillow_means(tmp_path, mode):
    rgb = noise(5, 7, 1)
    if mode == "F":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0, "F")  # [0, 1] floats
        expected = np.repeat(np.asarray(rgb.convert("L"))[..., None], 3, axis=2)
        path = "a/x.tiff"
    elif mode == "I":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 257, "I")  # 16-bit data in a 32-bit mode
        expected = np.repeat(np.asarray(rgb.convert("L"))[..., None], 3, axis=2)
        path = "a/x.tiff"
    else:
        img = rgb.convert(mode)
        expected = np.asarray(img.convert("RGB"))
        path = "a/x.tiff" if mode == "CMYK" else "a/x.png"
    if mode == "LA":  # half transparent: composited on black
        alpha = Image.new("L", img.size, 128)
        img.putalpha(alpha)
        expected = (np.asarray(rgb.convert("L"), dtype=np.float32)[..., None].repeat(3, 2) * 128 / 255).round()
    root = folder(tmp_path / "d", {path: img, "b/y.png": noise(5, 7, 2)})
    got = open_source(cfg_for(tmp_path, root), "train").images[0].numpy().astype(np.float32)
    assert np.abs(got - expected).max() <= 1


def test_a_palette_image_with_transparency_is_composited_on_black(tmp_path):
    img = Image.new("P", (6, 4), 1)
    img.putpalette([255, 255, 255, 200, 10, 10] + [0] * 762)
    img.paste(0, (0, 0, 3, 4))  # left half: index 0 (white), made transparent
    img.info["transparency"] = 0
    root = folder(tmp_path / "d", {"a/p.png": img, "b/y.png": noise(4, 6, 2)})
    got = open_source(cfg_for(tmp_path, root), "train").images[0].numpy()
    assert (got[:, :3] == 0).all() and (got[:, 3:] == [200, 10, 10]).all()


def test_exif_orientation_is_applied(tmp_path):
    img = noise(4, 8, 3)  # stored landscape 8x4
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": seen as a 4x8 portrait
    root = tmp_path / "d"
    (root / "train" / "a").mkdir(parents=True)
    img.save(root / "train" / "a" / "photo.jpg", exif=exif, quality=100)
    folder(root, {"b/y.jpg": Image.new("RGB", (4, 8))})
    got = open_source(cfg_for(tmp_path, root), "train").images[0].numpy()
    upright = np.asarray(Image.open(root / "train" / "a" / "photo.jpg").transpose(Image.Transpose.ROTATE_270))
    assert got.shape == (8, 4, 3) and np.abs(got.astype(int) - upright.astype(int)).max() == 0


def test_the_decoder_version_is_in_the_cache_key(tmp_path, monkeypatch):
    root = folder(tmp_path / "d", {"a/x.png": noise(4, 4, 0), "b/y.png": noise(4, 4, 1)})
    open_source(cfg_for(tmp_path, root), "train")
    monkeypatch.setattr("vitdistill.data.imagefolder.DECODER_VERSION", decoded.DECODER_VERSION + 1)
    open_source(cfg_for(tmp_path, root), "train")
    assert len(list((tmp_path / "cache" / "decoded").glob("*-train-2-*[0-9a-f].npy"))) == 2  # decoded again, not reused


# ------------------------------------------------------------------ 4. an unreadable file is not corrupt
def test_an_unreadable_file_fails_naming_it_and_is_used_once_readable(tmp_path, monkeypatch):
    root = folder(tmp_path / "d", {"a/x.png": noise(4, 4, 0), "a/z.png": noise(4, 4, 5), "b/y.png": noise(4, 4, 1)})
    locked = root / "train" / "a" / "z.png"
    original = decoded.read_encoded

    def read_encoded(path):  # what chmod 000 gives a non-root user (tests may run as root)
        if str(path).endswith("z.png"):
            try:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            except OSError as err:
                return None, f"{type(err).__name__}: {err.strerror}"
        return original(path)

    monkeypatch.setattr(decoded, "read_encoded", read_encoded)
    for on_corrupt in ("error", "skip"):
        with pytest.raises(UserError, match="cannot read .*z.png.*Permission denied"):
            open_source(cfg_for(tmp_path, root, on_corrupt=on_corrupt), "train")
    monkeypatch.undo()
    source = open_source(cfg_for(tmp_path, root, on_corrupt="skip"), "train")
    assert len(source) == 3 and not source.skipped
    assert np.array_equal(source.images[1].numpy(), np.asarray(Image.open(locked)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_not_recorded_as_corrupt(tmp_path):
    root = folder(tmp_path / "d", {"a/x.png": noise(4, 4, 0), "a/z.png": noise(4, 4, 5), "b/y.png": noise(4, 4, 1)})
    locked = root / "train" / "a" / "z.png"
    locked.chmod(0)
    try:
        with pytest.raises(UserError, match="cannot read .*z.png"):
            open_source(cfg_for(tmp_path, root, on_corrupt="skip"), "train")
    finally:
        locked.chmod(0o644)
    assert len(open_source(cfg_for(tmp_path, root), "train")) == 3


# ------------------------------------------------------------------ 6. subfolders of a class folder
def test_subfolders_of_a_class_folder_are_walked_like_torchvision(tmp_path):
    root = folder(
        tmp_path / "d",
        {
            "a/top.png": noise(4, 4, 0),
            "a/sub/deep.png": noise(4, 4, 1),
            "a/sub/more/deeper.png": noise(4, 4, 2),
            "a/sub/notes.txt.png": noise(4, 4, 3),
            "b/y.png": noise(4, 4, 4),
        },
    )
    (root / "train" / "a" / "sub" / "readme.txt").write_text("not an image")
    source = open_source(cfg_for(tmp_path, root), "train")
    assert source.names == ["a/sub/deep.png", "a/sub/more/deeper.png", "a/sub/notes.txt.png", "a/top.png", "b/y.png"]
    assert source.labels.tolist() == [0, 0, 0, 0, 1] and source.classes == ["a", "b"]
    assert source.skipped == {"not_image": ["a/sub/readme.txt"]}
    assert np.array_equal(source.images[1].numpy(), np.asarray(noise(4, 4, 2)))


# ------------------------------------------------------------------ 9. links, names, a full disk
def test_dangling_and_looping_links_are_left_out_and_reported(tmp_path):
    root = folder(tmp_path / "d", {"a/x.png": noise(4, 4, 0), "b/y.png": noise(4, 4, 1)})
    a = root / "train" / "a"
    (a / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (a / "loop1.png").symlink_to(a / "loop2.png")
    (a / "loop2.png").symlink_to(a / "loop1.png")
    (a / "up").symlink_to(root / "train")  # a folder link to an ancestor: walked once, no endless loop
    source = open_source(cfg_for(tmp_path, root), "train")
    assert source.skipped["broken_link"] == ["a/gone.png", "a/loop1.png", "a/loop2.png"]
    # a/up/a is class a's own folder again (skipped); a/up/b is another folder, listed once as the link says
    assert source.names == ["a/up/b/y.png", "a/x.png", "b/y.png"] and source.labels.tolist() == [0, 0, 1]


def test_a_file_name_that_is_not_utf8_decodes_and_prints(tmp_path, capsys):
    from vitdistill.runner import describe_skipped

    root = folder(tmp_path / "d", {"a/x.png": noise(4, 4, 0), "b/y.png": noise(4, 4, 1)})
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: kept by Python as a surrogate
    try:
        noise(4, 4, 7).save(root / "train" / "a" / odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (root / "train" / "a" / (odd[:-4] + ".txt")).write_text("x")
    source = open_source(cfg_for(tmp_path, root), "train")
    assert len(source) == 3 and np.array_equal(source.images[0].numpy(), np.asarray(noise(4, 4, 7)))
    line = describe_skipped(source)[0]
    print(line)  # does not raise UnicodeEncodeError
    assert "caf\\xe9.txt" in capsys.readouterr().out


def test_a_full_disk_under_the_decode_cache_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    root = folder(tmp_path / "d", {"a/x.png": noise(4, 4, 0), "b/y.png": noise(4, 4, 1)})

    class Usage:
        free = 10  # bytes: less than the 96 the array needs

    monkeypatch.setattr(decoded.shutil, "disk_usage", lambda path: Usage)
    monkeypatch.setattr(records.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(
        UserError, match=r"\(raw\) records need about .* free; set data.records=jpeg.*data.cache_dir"
    ):  # the check before any record is written
        open_source(cfg_for(tmp_path, root, records="raw"), "train")
    monkeypatch.undo()

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decoded.os, "posix_fallocate", no_room, raising=False)
    with pytest.raises(UserError, match="is full"):  # the disk filled after the check: the reservation fails
        open_source(cfg_for(tmp_path, root, records="raw"), "train")
    assert [p.name for p in (tmp_path / "cache" / "decoded").iterdir()] == []


# ------------------------------------------------------------------ 10. bombs, parquet splits
def test_a_decompression_bomb_warning_names_the_file(tmp_path, monkeypatch, capsys):
    root = folder(tmp_path / "d", {"a/big.png": noise(20, 20, 0), "b/y.png": noise(8, 8, 1)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels warn; more than twice (600) is an error
    open_source(cfg_for(tmp_path, root, source_size=8), "train")
    err = capsys.readouterr().err
    assert "big.png" in err and "decompression bomb" in err.lower() and "y.png" not in err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    with pytest.raises(UserError, match="big.png.*DecompressionBombError"):
        open_source(cfg_for(tmp_path, root, source_size=4), "train")


def test_a_parquet_folder_without_the_split_lists_the_splits_it_has(tmp_path):
    pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    table = pa.table({"label": [0, 1]})
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table, root / "data" / "validation-00000-of-00001.parquet")
    with pytest.raises(UserError, match=r"splits \['train', 'validation'\], not 'test'"):
        load_split(root, "test", tmp_path / "cache")


# ------------------------------------------------------------------ 8. checks before any image is decoded
@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding any image fails the test: what must be found before the data is touched."""

    def decode(*args, **kwargs):
        raise AssertionError("an image was decoded before the run's checks")

    monkeypatch.setattr("vitdistill.data.decoded.decode_files", decode)  # raw records
    monkeypatch.setattr("vitdistill.data.jpeg.build_jpeg_records", decode)  # JPEG records


def run_args(tmp_path, root, *extra):
    from conftest import tiny_run

    return [
        "train",
        "demo_student_distilled",
        *tiny_run(
            tmp_path / "run",
            "data.source=imagefolder",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.train_limit=null",
            "data.eval_limit=null",
            "augment.input_size=8",
            "model.img_size=8",
            "model.patch_size=2",
            "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
            *extra,
        ),
    ]


def digit_folder(root: Path, classes=10) -> Path:
    return folder(root, {f"{c}/{i}.png": noise(8, 8, 10 * c + i) for c in range(classes) for i in range(2)})


@pytest.mark.parametrize(
    "extra, message",
    [
        (["teacher.checkpoint=/nowhere/teacher.safetensors"], "teacher.checkpoint: /nowhere/teacher.safetensors does not exist"),
        (["teacher.store=/nowhere/store", "teacher.checkpoint=null"], "teacher.store: /nowhere/store does not exist"),
        (["model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, no_such_key: 1}"], "no_such_key"),
        (["augment.input_size=9"], "augment.input_size"),
    ],
)
def test_a_bad_teacher_or_model_is_one_line_before_any_image_is_decoded(tmp_path, capsys, no_decoding, tiny_teacher, extra, message):
    from vitdistill.cli import main

    root = digit_folder(tmp_path / "d")
    assert main([*run_args(tmp_path, root, f"teacher.checkpoint={tiny_teacher}"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_a_teacher_for_other_classes_is_refused_before_decoding(tmp_path, capsys, no_decoding, tiny_teacher):
    from vitdistill.cli import main

    root = digit_folder(tmp_path / "d", classes=3)  # the teacher predicts 10 digits
    assert main(run_args(tmp_path, root, f"teacher.checkpoint={tiny_teacher}")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predicts 10 classes but the data has 3" in err


# ------------------------------------------------------------------ 9. output folder, checkpoint, Ctrl-C
def test_a_read_only_output_folder_is_one_line_before_decoding(tmp_path, capsys, monkeypatch, no_decoding, tiny_teacher):
    import tempfile

    from vitdistill.cli import main

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    root = digit_folder(tmp_path / "d")
    assert main(run_args(tmp_path, root, f"teacher.checkpoint={tiny_teacher}")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is on a read-only file system" in err and str(tmp_path / "run") in err


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    from vitdistill.runner import check_writable

    check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_writable(tmp_path / "file" / "run")


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 3200 vs 3110"),
    ],
)
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, capsys, monkeypatch, failure):
    from conftest import tiny_run

    from vitdistill.cli import main
    from vitdistill.engine import checkpoint

    original, calls = checkpoint.torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's checkpoint
            f.write(b"partial")
            raise failure
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert main(["train", "demo_teacher", *tiny_run(tmp_path / "run", "model.name=vitdistill_convnet_tiny")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.pt" in err and "--resume" in err
    state = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "tmp" in p.name) == []


def test_ctrl_c_while_the_cli_imports_is_one_line_and_exit_130(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vitdistill.runner':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['vitdistill', 'recipes']\n"
        "import runpy\n"
        "runpy.run_module('vitdistill', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 130 and done.stderr == "vitdistill: interrupted\n"


def test_cache_with_a_missing_teacher_is_one_line_before_decoding(tmp_path, capsys, no_decoding):
    from vitdistill.cli import main

    root = digit_folder(tmp_path / "d")
    args = run_args(tmp_path, root, "teacher.checkpoint=/nowhere/teacher.safetensors", f"store.path={tmp_path / 'store'}")
    assert main(["cache", *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/nowhere/teacher.safetensors does not exist" in err
