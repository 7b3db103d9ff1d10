"""A trained student on images: ``vitdistill predict`` and ``vitdistill.predict(...)``.

:func:`open_predictor` reads a run (its folder, ``model.safetensors`` or ``checkpoint.pt``), a timm
export (the folder ``vitdistill export`` writes: ``config.json`` + ``model.safetensors``) or an
ONNX export (``model.onnx`` or its folder, run with ONNX Runtime) into one :class:`Predictor`: a
module whose forward gives a :class:`~vitdistill.models.output.ModelOutput` (so ``vitdistill eval``
reads all three), the class names, and how inputs are made.

Inputs are made as ``vitdistill eval`` makes them, by the same code: each file is decoded as the
decode cache stores it (:func:`~vitdistill.data.decoded.decode_image`, with the run's
``data.source_size``/``max_aspect``; exports keep the images as they are), then
:meth:`Augmenter.eval_batch <vitdistill.augment.Augmenter.eval_batch>` takes the centre crop of
``eval_crop_pct``, resizes it to the input size and normalises it with the model's mean/std.
"""

from __future__ import annotations

import json
import tarfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .augment import Augmenter
from .config import AugmentConfig, DataConfig
from .config.parsing import parse_dataclass
from .data import ImageSource
from .data.decoded import RecordShape, decode_image
from .data.imagefolder import ARCHIVE_SUFFIXES, IMAGE_SUFFIXES
from .device import resolve_device
from .errors import UserError, short_reason
from .models import VisionModel, load_model
from .models.output import ModelOutput
from .progress import progress
from .run_folder import is_hf_folder, load_trained

EXIT_SOME_BAD = 3  # `vitdistill predict`: some inputs could not be read (the others were predicted)


class OnnxLogits(nn.Module):
    """An ONNX export run by ONNX Runtime, answering as a vitdistill model does (``inference()``
    gives the exported logits)."""

    def __init__(self, path: Path, device: torch.device):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"{path} is an ONNX export: reading it needs onnxruntime (pip install 'vitdistill[export]')") from None
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for unreadable models
            raise UserError(f"{path} cannot be read by ONNX Runtime ({short_reason(err)})") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def forward(self, x: torch.Tensor) -> ModelOutput:
        (logits,) = self.session.run(["logits"], {"input": x.detach().float().cpu().numpy()})
        return ModelOutput(logits=torch.from_numpy(logits).to(x.device))


@dataclass
class Predictor:
    """A trained model and how its inputs are made."""

    module: nn.Module  # forward gives a ModelOutput; judged by .inference()
    classes: list[str]
    input_size: int
    crop_pct: float  # evaluation centre crop (augment.eval_crop_pct)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    record: RecordShape  # how files are decoded (the run's data.source_size / max_aspect)
    kind: str  # "run", "timm export" or "onnx export"
    recipe: dict | None = None  # the run's recipe, when known
    has_class_names: bool = True  # False: the model did not record its classes ("0", "1", ... stand in)
    num_classes: int = field(init=False)

    def __post_init__(self):
        self.num_classes = len(self.classes)

    def augment_config(self) -> AugmentConfig:
        """The evaluation view's settings (all an :class:`Augmenter` reads for ``eval_batch``)."""
        return AugmentConfig(input_size=self.input_size, eval_crop_pct=self.crop_pct)


def _onnx_file(path: Path) -> Path | None:
    if path.suffix == ".onnx" and path.is_file():
        return path
    if path.is_dir() and (path / "model.onnx").is_file() and not (path / "model.safetensors").is_file():
        return path / "model.onnx"
    return None


def open_predictor(path: str | Path, device: torch.device | None = None) -> Predictor:
    """A run folder, ``model.safetensors``, ``checkpoint.pt``, a timm export folder or an ONNX export."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (expected a run folder, an export folder, model.safetensors, checkpoint.pt or model.onnx)")
    device = device or torch.device("cpu")
    onnx_path = _onnx_file(path)
    if onnx_path is not None:
        module = OnnxLogits(onnx_path, device)
        meta = {k: json.loads(v) for k, v in module.metadata.items() if k in ("label_names", "input_size", "mean", "std", "crop_pct")}
        if "label_names" not in meta or "input_size" not in meta:
            raise UserError(f"{onnx_path} has no label_names/input_size metadata: not an ONNX export written by vitdistill")
        mean, std = tuple(meta.get("mean") or (0.485, 0.456, 0.406)), tuple(meta.get("std") or (0.229, 0.224, 0.225))
        names = list(meta["label_names"])
        if not names:  # an export of a model that did not record its classes: count them from the output
            names = [str(i) for i in range(module.session.get_outputs()[0].shape[-1])]
        return Predictor(
            module,
            names,
            int(meta["input_size"][-1]),
            float(meta.get("crop_pct") or 1.0),
            mean,
            std,
            RecordShape(None),
            "onnx export",
            has_class_names=bool(meta["label_names"]),
        )
    timm_config = path / "config.json" if path.is_dir() else None
    if timm_config is not None and timm_config.is_file() and not (path / "config.yaml").is_file():
        model = load_model(path)
        pretrained = json.loads(timm_config.read_text()).get("pretrained_cfg") or {}
        return _from_model(model, None, float(pretrained.get("crop_pct", 1.0)), "timm export", device)
    model, recipe = load_trained(path)
    aug = parse_dataclass(AugmentConfig, (recipe or {}).get("augment") or {}, "augment")
    return _from_model(model, recipe, aug.eval_crop_pct, "run", device)


def _from_model(model: VisionModel, recipe: dict | None, crop_pct: float, kind: str, device: torch.device) -> Predictor:
    spec = model.spec
    raw = (recipe or {}).get("data")
    data = parse_dataclass(DataConfig, raw, "data") if raw else DataConfig()  # the defaults' mean/std when the spec has none
    aug = parse_dataclass(AugmentConfig, (recipe or {}).get("augment") or {}, "augment")
    classes = list(spec.classes) or [str(i) for i in range(spec.num_classes)]
    record = RecordShape(data.source_size, data.max_aspect) if recipe else RecordShape(None)
    return Predictor(
        model.to(device).eval(),
        classes,
        spec.input_size or aug.input_size,
        crop_pct,
        spec.mean or data.mean,
        spec.std or data.std,
        record,
        kind,
        recipe,
        has_class_names=bool(spec.classes),
    )


# ---------------------------------------------------------------------------- inputs
@dataclass
class Prediction:
    """One input's top-k (most probable first), or why it could not be read (``error``)."""

    path: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None


def _archive_members(archive: Path) -> Iterator[tuple[str, bytes | str]]:
    """``(archive:member, encoded bytes)`` of every image in a .tar/.tar.gz/.tgz/.zip, in name order."""
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in sorted(n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES):
                    yield f"{archive}:{name}", zf.read(name)
        else:
            with tarfile.open(archive) as tf:
                members = sorted(
                    (m for m in tf.getmembers() if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES), key=lambda m: m.name
                )
                for member in members:
                    yield f"{archive}:{member.name}", tf.extractfile(member).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        yield str(archive), f"the archive cannot be read ({short_reason(err)})"


def expand_inputs(inputs: list[str | Path]) -> Iterator[tuple[str, str | bytes | None]]:
    """``(name, path or encoded bytes)`` of every image: files as given, folders walked
    recursively (image suffixes, sorted), archives member by member. A missing input is
    ``(name, None)`` (reported as a bad input)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                yield str(file), str(file)
        elif path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
            for name, data in _archive_members(path):
                yield (name, data) if isinstance(data, bytes) else (name, None)
        elif path.is_file():
            yield str(path), str(path)
        else:
            yield str(path), None


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _batch_source(decoded: list[tuple[np.ndarray, tuple[int, int, int]]], classes: list[str]) -> ImageSource:
    """Decoded images as one source: records zero-padded to the batch's largest, true sizes beside them
    (what the decode cache gives for variable-sized images)."""
    rows = max(a.shape[0] for a, _ in decoded)
    cols = max(a.shape[1] for a, _ in decoded)
    images = torch.zeros(len(decoded), rows, cols, 3, dtype=torch.uint8)
    for i, (array, _) in enumerate(decoded):
        images[i, : array.shape[0], : array.shape[1]] = torch.from_numpy(np.array(array, copy=True))  # Pillow's arrays are read-only
    sizes = torch.tensor([size for _, size in decoded], dtype=torch.int32)
    return ImageSource(images, torch.zeros(len(decoded), dtype=torch.int64), classes, "predict", "", sizes=sizes)


@torch.no_grad()
def _top_k(predictor: Predictor, source: ImageSource, device: torch.device, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    views = Augmenter(source, predictor.augment_config(), 0, predictor.mean, predictor.std, device, placement="device")
    batch = views.eval_batch(torch.arange(len(source)))
    probs = predictor.module(batch.images).inference().float().softmax(dim=1)
    values, ids = probs.topk(k, dim=1)
    return values.cpu(), ids.cpu()


def _rows(names: list[str], values: torch.Tensor, ids: torch.Tensor, classes: list[str]) -> list[Prediction]:
    return [
        Prediction(name, [classes[i] for i in row_ids], [float(p) for p in row_values])
        for name, row_values, row_ids in zip(names, values.tolist(), ids.tolist())
    ]


def predict_iter(
    model: str | Path | Predictor,
    inputs: list[str | Path],
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "auto",
    split: str = "test",
    show_progress: bool = False,
) -> Iterator[Prediction]:
    """:func:`predict`, one row at a time (in input order, batch by batch)."""
    torch_device = resolve_device(device)
    predictor = model if isinstance(model, Predictor) else open_predictor(model, torch_device)
    k = max(1, min(top_k, predictor.num_classes))
    groups: list[tuple[bool, list]] = []  # runs of plain inputs (batched together) and HF datasets, in input order
    for item in inputs:
        hf = is_hf_folder(Path(item))
        if hf or not groups or groups[-1][0]:
            groups.append((hf, []))
        groups[-1][1].append(item)
    for hf, items in groups:
        if hf:
            yield from _predict_hf(predictor, Path(items[0]), split, k, batch_size, torch_device, show_progress)
        else:
            yield from _predict_files(predictor, items, k, batch_size, torch_device, show_progress)


def _predict_files(
    predictor: Predictor, inputs: list, k: int, batch_size: int, device: torch.device, show_progress: bool
) -> Iterator[Prediction]:
    def decode(item):
        return (None, None, "no such file") if item[1] is None else decode_image(item[1], predictor.record)

    with ThreadPoolExecutor(4) as pool:  # Pillow releases the GIL while decoding
        for batch in progress(_batched(expand_inputs(inputs), batch_size), desc="predicting", enabled=show_progress, unit="batch"):
            results = list(pool.map(decode, batch))
            good = [i for i, (array, _, _) in enumerate(results) if array is not None]
            rows: dict[int, Prediction] = {}
            if good:
                source = _batch_source([results[i][:2] for i in good], predictor.classes)
                values, ids = _top_k(predictor, source, device, k)
                rows = dict(zip(good, _rows([batch[i][0] for i in good], values, ids, predictor.classes)))
            for i, ((name, _), (_, _, error)) in enumerate(zip(batch, results)):
                yield rows[i] if i in rows else Prediction(name, [], [], error)


def _predict_hf(
    predictor: Predictor, root: Path, split: str, k: int, batch_size: int, device: torch.device, show_progress: bool
) -> Iterator[Prediction]:
    """Every row of a Hugging Face dataset's split, decoded through the HF source (rows that cannot be decoded are bad inputs)."""
    from .data import open_source

    recipe_data = dict((predictor.recipe or {}).get("data") or {})
    cfg = parse_dataclass(
        DataConfig,
        {
            "source": "hf",
            "root": str(root),
            "on_corrupt": "skip",
            "source_size": predictor.record.size,
            "max_aspect": predictor.record.max_aspect,
            **{key: recipe_data[key] for key in ("image_column", "label_column", "cache_dir") if recipe_data.get(key) is not None},
        },
        "data",
    )
    source = open_source(cfg, split)
    for name in source.skipped.get("corrupt", []):
        yield Prediction(name, [], [], "cannot be decoded")
    # rows kept, in order: their names are the source's own (``root/split row i``) -- recover the row numbers
    bad = set(source.skipped.get("corrupt", []))
    views = Augmenter(source, predictor.augment_config(), 0, predictor.mean, predictor.std, device)
    rows = [i for i in range(len(source) + len(bad)) if f"{root}/{split} row {i}" not in bad]
    with torch.no_grad():
        for start in progress(range(0, len(source), batch_size), desc="predicting", enabled=show_progress, unit="batch"):
            index = torch.arange(start, min(start + batch_size, len(source)))
            batch = views.eval_batch(index)
            probs = predictor.module(batch.images).inference().float().softmax(dim=1)
            values, ids = probs.topk(k, dim=1)
            names = [f"{root}/{split} row {rows[i]}" for i in index.tolist()]
            yield from _rows(names, values.cpu(), ids.cpu(), predictor.classes)


def predict(
    model: str | Path | Predictor, inputs: list[str | Path], top_k: int = 5, batch_size: int = 64, device: str = "auto", split: str = "test"
) -> list[Prediction]:
    """Top-``top_k`` classes and probabilities of every image in ``inputs`` (image files, folders
    walked recursively, .tar/.tar.gz/.tgz/.zip archives, Hugging Face datasets: a saved
    ``DatasetDict`` or a parquet folder, its ``split``) under a run or an export (see
    :func:`open_predictor`), with the run's evaluation view and inference head. ``top_k`` is
    clamped to the number of classes. An input that cannot be read is a row with ``error`` set
    (and no labels); the others are predicted."""
    return list(predict_iter(model, inputs, top_k, batch_size, device, split))


def write_predictions(rows: Iterator[Prediction], out, format: str, k: int) -> tuple[int, int]:
    """Rows as CSV (``path,label_1,probability_1,...``) or JSON lines on ``out``; bad inputs one
    line each on stderr. Returns (predicted, bad)."""
    import csv
    import sys

    writer = csv.writer(out, lineterminator="\n") if format == "csv" else None
    if writer is not None:
        writer.writerow(["path", *(f"{name}_{i + 1}" for i in range(k) for name in ("label", "probability"))])
    done = bad = 0
    for row in rows:
        if row.error is not None:
            bad += 1
            print(f"vitdistill: predict: {row.path}: {row.error}", file=sys.stderr)
            continue
        done += 1
        if writer is not None:
            writer.writerow([row.path, *(x for label, p in zip(row.labels, row.probabilities) for x in (label, f"{p:.6f}"))])
        else:
            out.write(json.dumps({"path": row.path, "labels": row.labels, "probabilities": row.probabilities}) + "\n")
    return done, bad


__all__ = ["EXIT_SOME_BAD", "OnnxLogits", "Prediction", "Predictor", "open_predictor", "predict", "predict_iter", "write_predictions"]
