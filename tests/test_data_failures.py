"""Nothing silently wrong in the data path (issue 19): correct pixels from every image mode, EXIF
orientation, subfolders, unreadable files, broken links, file names that are not UTF-8, a full
disk under the decode cache, decompression bombs (README, "When things go wrong")."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitdistill import UserError
from vitdistill.config import DataConfig
from vitdistill.data import decoded, open_source
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
    root = folder(tmp_path / "d", {
        "a/top.png": noise(4, 4, 0), "a/sub/deep.png": noise(4, 4, 1), "a/sub/more/deeper.png": noise(4, 4, 2),
        "a/sub/notes.txt.png": noise(4, 4, 3), "b/y.png": noise(4, 4, 4),
    })
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
    assert source.names == ["a/x.png", "b/y.png"] or "a/up/a/x.png" not in source.names
    assert len(source) == len(source.names)


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
    with pytest.raises(UserError, match="is full.*data.cache_dir"):
        open_source(cfg_for(tmp_path, root), "train")
    monkeypatch.undo()

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decoded.os, "posix_fallocate", no_room, raising=False)
    with pytest.raises(UserError, match="is full"):
        open_source(cfg_for(tmp_path, root), "train")
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
