"""Hugging Face ``datasets`` splits, from local files only (nothing is downloaded).

``data.root`` is either

- a ``DatasetDict`` saved with ``save_to_disk`` (a folder with ``dataset_dict.json``): the split
  names are its keys (``data.train_split`` / ``data.eval_split``), read with ``load_from_disk``; or
- a folder of parquet files, named as on the Hub: ``<split>-*.parquet`` or ``<split>.parquet``
  anywhere below the root (e.g. ``data/train-00000-of-00002.parquet``), or any ``*.parquet`` under
  a ``<split>/`` folder; read with ``Dataset.from_parquet`` (arrow cache under ``data.cache_dir``).

``data.image_column`` (default ``image``) must be an ``Image`` feature (its encoded bytes, or the files it points to,
are decoded once into the same ``.npy`` cache as ImageFolder, with ``data.source_size`` for
variable sizes). ``data.label_column`` (default ``label``) gives the labels: class names come from its ``ClassLabel``
feature; plain integers become classes ``"0".."max"``, strings their sorted set. Sample ``i`` is
row ``i`` of the split (dataset order): its stable index.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import UserError
from .decoded import DECODER_VERSION, record_shape
from .records import open_records
from .source import ImageSource, cache_root, hash_items, limit_positions


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("data.source: hf needs the datasets package: pip install 'vitdistill[hf]'") from None
    from ..progress import progress_enabled

    if not progress_enabled():  # quiet logs, as our own bars
        datasets.disable_progress_bars()
    return datasets


def parquet_files(root: Path, split: str) -> list[Path]:
    """The parquet files of ``split`` under ``root`` (Hub naming), sorted."""
    found = set(root.rglob(f"{split}-*.parquet")) | set(root.rglob(f"{split}.parquet"))
    if (root / split).is_dir():
        found |= set((root / split).rglob("*.parquet"))
    return sorted(found)


def parquet_splits(root: Path) -> list[str]:
    """The split names the parquet files under ``root`` have (Hub naming: ``<split>-*.parquet``,
    ``<split>.parquet``, or the folder holding them)."""
    found = set()
    for path in root.rglob("*.parquet"):
        stem = path.name.removesuffix(".parquet")
        name = stem.split("-")[0] if "-" in stem else stem
        found.add(name if name and name != path.parent.name or path.parent == root else path.parent.name)
    return sorted(found)


def load_split(root: Path, split: str, cache: Path):
    """The ``datasets.Dataset`` of one split (see the module docstring for the layouts)."""
    datasets = _datasets()
    if (root / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(root))
        if split not in splits:
            raise UserError(
                f"data: the dataset at {root} has splits {sorted(splits)}, not {split!r} (set data.train_split / data.eval_split)"
            )
        return splits[split]
    if (root / "state.json").is_file():
        raise UserError(
            f"data.root: {root} holds one Dataset without split names; save a DatasetDict instead "
            "(DatasetDict({'train': ..., 'test': ...}).save_to_disk(root))"
        )
    files = parquet_files(root, split)
    if not files and (found := parquet_splits(root)):
        raise UserError(f"data: the parquet files under {root} have splits {found}, not {split!r} (set data.train_split / data.eval_split)")
    if not files:
        raise UserError(
            f"data.root: {root} is neither a saved DatasetDict (no dataset_dict.json) nor has parquet files for split {split!r} "
            f"({split}-*.parquet, {split}.parquet or {split}/*.parquet)"
        )
    return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache / "hf"))


def _labels(ds, column: str) -> tuple[list[str], list[int]]:
    """Class names and integer labels from the label column."""
    from datasets import ClassLabel

    feature = ds.features[column]
    values = ds[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), [int(v) for v in values]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values, default=0) < 0:
            raise UserError(f"data.label_column: {column!r} has negative labels")
        return [str(i) for i in range(max(values, default=-1) + 1)], list(values)
    if all(isinstance(v, str) for v in values):
        classes = sorted(set(values))
        index = {name: i for i, name in enumerate(classes)}
        return classes, [index[v] for v in values]
    raise UserError(f"data.label_column: {column!r} holds {feature}, not class labels (ClassLabel, integers or strings)")


class EncodedImages:
    """The split's images, undecoded, as a sequence that slices (what :func:`decode_files` reads
    chunk by chunk): each item is the encoded bytes, or the path of the file the row points to."""

    def __init__(self, ds, column: str, rows: list[int]):
        from datasets import Image

        self.ds = ds.cast_column(column, Image(decode=False))
        self.column = column
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        if isinstance(item, slice):
            cells = self.ds.select(self.rows[item])[self.column]
            return [cell["bytes"] if cell.get("bytes") is not None else cell["path"] for cell in cells]
        return self[item : item + 1][0]


def open_hf(cfg: DataConfig, split: str, limit: int | None) -> ImageSource:
    datasets = _datasets()
    assert cfg.root is not None
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder (a saved DatasetDict or a folder of parquet files)")
    cache = cache_root(cfg)
    ds = load_split(root, split, cache)
    image_column, label_column = cfg.image_column or "image", cfg.label_column or "label"
    for key, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in ds.column_names:
            raise UserError(f"data.{key}: {root}/{split} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise UserError(f"data.image_column: {image_column!r} is {ds.features[image_column]}, not an Image feature")
    if len(ds) == 0:
        raise UserError(f"data: split {split!r} of {root} is empty")
    classes, labels = _labels(ds, label_column)
    keep = limit_positions(labels, limit)
    labels = [labels[i] for i in keep]
    items_hash = hash_items([f"{i}\t{y}" for i, y in zip(keep, labels)])
    # The dataset's own fingerprint (datasets' cache key: its files and history) pins the content.
    shape = record_shape(cfg)
    key = hash_items([items_hash, ds._fingerprint, repr(shape), f"decoder {DECODER_VERSION}", str(root.resolve()), image_column])[:20]
    array_path = cache / "decoded" / f"hf-{root.name}-{split}-{len(keep)}-{key}.npy"
    names = [f"{root}/{split} row {i}" for i in keep]
    encoded = EncodedImages(ds, image_column, keep)
    images, memory_mapped, sizes, corrupt, contents = open_records(cfg, encoded, shape, array_path, f"decoding {root.name}/{split}", names)
    if corrupt:  # rows left out (data.on_corrupt=skip): the others keep their order
        left_out = set(corrupt)
        kept = [i for i, name in enumerate(names) if name not in left_out]
        keep, labels = [keep[i] for i in kept], [labels[i] for i in kept]
        items_hash = hash_items([f"{i}\t{y}" for i, y in zip(keep, labels)])
    return ImageSource(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=classes,
        name=f"hf:{root.name}/{split}",
        items_hash=items_hash,
        memory_mapped=memory_mapped,
        skipped={"corrupt": corrupt} if corrupt else {},
        sizes=sizes,
        contents=contents,
        names=[f"row {i}" for i in keep],
    )
