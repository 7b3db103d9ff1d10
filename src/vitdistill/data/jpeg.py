"""JPEG records: every image resized once exactly as for raw records (:class:`.decoded.RecordShape`),
stored as a JPEG, and decoded per batch into the same zero-padded uint8 records with true sizes,
so views, replay, stores and label maps never know how the pixels were stored.

On disk, one folder per split (in the cache folder, keyed like the raw array)::

    records.json          format, record shape, JPEG quality, count, shard count
    index.npy             [N, 3] int64: shard, byte offset, byte length of image i
    sizes.npy             [N, 3] int32: true (height, width, transposed), as for raw records
    skipped.json          the images left out (data.on_corrupt: skip)
    00000.jpgs ...        shards: the JPEGs of CHUNK consecutive images, back to back

Shards are bounded (``CHUNK`` images of at most a few hundred KB each), read through memory maps
(random access by index, nothing loaded up front), and a later object-store source can fetch them
one by one. The folder is built as ``<name>.partial``: each shard is written atomically, then its
own small index (``00000.idx.npy``) marks it finished, so a build killed at any moment (even
``kill -9``) resumes with the shards it had finished; the finished folder is renamed into place.

Decoding (:class:`JpegRecords`): on the CPU with Pillow (libjpeg-turbo, which releases the GIL)
in a thread pool; on CUDA with one batched nvJPEG call per step (``torchvision.io.decode_jpeg`` on
a list, torch >= 2.5; its deprecation notice is silenced: the call is the same from torchvision
0.20 to 0.29 and TorchCodec's GPU decoder needs a newer torch than our floor). The decoder
(library, version, device) is part of the split's fingerprint: pixels decoded by another library
may differ in the last bit, and a store made from one must not be replayed with the other.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, write_text_atomic
from ..errors import UserError
from ..progress import progress
from .decoded import RecordShape, _Inline, open_image, record_digest, resize_image

FORMAT = "vitdistill-jpeg-records/1"
CHUNK = 1024  # images per shard (and per resumable unit of the build): a few hundred MB at most
DEFAULT_QUALITY = 90  # FFCV's default


def _encode(args: tuple[str | bytes, RecordShape, int]) -> tuple[bytes | None, tuple[int, int, int] | None, str | None, int]:
    """One image resized like a raw record (unpadded) and encoded as JPEG at ``quality``, its
    true size, or None and what went wrong (every exception: see ``decoded._decode``), and the
    digest of the raw record it was made from (``decoded.record_digest``: the same as raw
    records keep, so a store pins the images' contents whichever way they are stored)."""
    path, shape, quality = args
    from PIL import Image

    try:
        with open_image(path) as img:
            array, true = resize_image(img, shape)
        record = array
        if shape.size is not None:  # the zero-padded record raw records store
            record = np.zeros((*shape.record, 3), dtype=np.uint8)
            record[: array.shape[0], : array.shape[1]] = array
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), true, None, record_digest(record, true)
    except Exception as err:  # noqa: BLE001 - Pillow's many exception types for damaged files
        return None, None, f"{type(err).__name__}: {err}", 0


def encode_sample(paths: Sequence[str | bytes], shape: RecordShape, quality: int, count: int = 32) -> float:
    """Mean JPEG bytes of up to ``count`` evenly spaced images (what the disk check estimates
    from); 0 when none of them decodes."""
    step = max(1, len(paths) // count)
    sizes = [len(data) for data, _, _, _ in map(_encode, [(paths[i], shape, quality) for i in range(0, len(paths), step)][:count]) if data]
    return float(np.mean(sizes)) if sizes else 0.0


def _shard(folder: Path, chunk: int) -> Path:
    return folder / f"{chunk:05d}.jpgs"


def _shard_index(folder: Path, chunk: int) -> Path:
    return folder / f"{chunk:05d}.idx.npy"


def partial_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


def partial_bytes(folder: Path) -> int:
    """Bytes of finished shards an interrupted build left (they are kept, not written again)."""
    partial = partial_folder(folder)
    return sum(p.stat().st_size for p in partial.glob("*.jpgs")) if partial.is_dir() else 0


def build_jpeg_records(
    paths: Sequence[str | bytes],
    shape: RecordShape,
    folder: Path,
    desc: str,
    on_corrupt: str = "error",
    names: Sequence[str] | None = None,
    quality: int = DEFAULT_QUALITY,
) -> list[int]:
    """Encode ``paths`` (files or encoded images; any sequence that slices) into JPEG records at
    ``folder``, ``CHUNK`` images per shard, in parallel worker processes, resuming the finished
    shards of an interrupted build. Corrupt images are an error naming them or left out (their
    positions returned, their names recorded), as for raw records."""
    names = paths if names is None else names
    partial = partial_folder(folder)
    partial.mkdir(parents=True, exist_ok=True)
    chunks = -(-len(paths) // CHUNK)
    todo = [c for c in range(chunks) if not _shard_index(partial, c).is_file()]
    workers = max(1, min(len(os.sched_getaffinity(0)), 16))
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(paths) > 256 else _Inline()
    chunksize = max(1, CHUNK // (workers * 8))
    tag = str(os.getpid())  # two processes may build one split at once: their shards are the same bytes
    done_images = len(paths) - sum(min(CHUNK, len(paths) - c * CHUNK) for c in todo)
    try:
        bar = progress(range(len(todo)), total=len(todo), desc=f"{desc} ({done_images:,} images kept from before)" if done_images else desc)
        for c in (todo[i] for i in bar):
            first = c * CHUNK
            jobs = [(p, shape, quality) for p in paths[first : first + CHUNK]]
            table = np.zeros((len(jobs), 6), dtype=np.int64)  # offset, length (-1: left out), height, width, transposed, digest
            with atomic_path(_shard(partial, c), tag) as tmp, open(tmp, "wb") as out:
                offset = 0
                for j, (data, true, error, digest) in enumerate(pool.map(_encode, jobs, chunksize=chunksize)):
                    if error is not None:
                        if on_corrupt == "error":
                            raise UserError(
                                f"data: cannot decode {names[first + j]} ({error}); "
                                "replace or delete it, or set data.on_corrupt=skip to leave it out"
                            )
                        table[j] = (0, -1, 0, 0, 0, 0)
                        continue
                    out.write(data)
                    table[j] = (offset, len(data), *true, digest)
                    offset += len(data)
            with atomic_path(_shard_index(partial, c), tag + ".npy") as tmp:
                np.save(tmp, table)
    finally:
        if isinstance(pool, ProcessPoolExecutor):
            pool.shutdown(wait=True, cancel_futures=True)
    return _finish(partial, folder, chunks, shape, quality, names)


def _finish(partial: Path, folder: Path, chunks: int, shape: RecordShape, quality: int, names: Sequence) -> list[int]:
    """Join the shard indexes into one, write the description, and put the folder in place."""
    tables = [np.load(_shard_index(partial, c)) for c in range(chunks)]
    shard = np.concatenate([np.full(len(t), c, dtype=np.int64) for c, t in enumerate(tables)])
    table = np.concatenate(tables)
    kept = table[:, 1] >= 0
    bad = np.flatnonzero(~kept).tolist()
    if not kept.any():
        raise UserError(f"data: none of the {len(table):,} images could be decoded (e.g. {names[bad[0]]})")
    sizes = table[kept, 2:5].astype(np.int32)
    if shape.size is None:  # images stored as they are: all one size (as raw records require)
        first = tuple(sizes[0, :2])
        odd = np.flatnonzero((sizes[:, 0] != first[0]) | (sizes[:, 1] != first[1]))
        if odd.size:
            name = names[np.flatnonzero(kept)[odd[0]]]
            raise UserError(
                f"data: images have different sizes ({name} is {sizes[odd[0], 1]}x{sizes[odd[0], 0]}, "
                f"the first is {first[1]}x{first[0]}); set data.source_size to decode them with their short side at that size"
            )
        record = [int(first[0]), int(first[1])]
    else:
        record = list(shape.record)
    np.save(partial / "index.npy", np.stack([shard[kept], table[kept, 0], table[kept, 1]], axis=1))
    np.save(partial / "sizes.npy", sizes)
    np.save(partial / "contents.npy", table[kept, 5])
    (partial / "skipped.json").write_text(json.dumps({"corrupt": [str(names[i]) for i in bad]}))
    for c in range(chunks):
        _shard_index(partial, c).unlink()
    for stray in partial.glob("*.tmp*"):  # a temporary left by a killed build
        stray.unlink()
    meta = {
        "format": FORMAT,
        "record": record,
        "quality": quality,
        "count": int(kept.sum()),
        "shards": chunks,
        "variable_size": shape.size is not None,
    }
    write_text_atomic(partial / "records.json", json.dumps(meta, indent=1))
    try:
        os.replace(partial, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process finished first: theirs is kept
    return bad


def read_contents(folder: Path) -> np.ndarray:
    """The digest of every kept image's raw record (what ``decoded.read_contents`` gives for raw records)."""
    return np.load(folder / "contents.npy")


def read_skipped(folder: Path) -> list[str]:
    return json.loads((folder / "skipped.json").read_text()).get("corrupt", [])


def records_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.jpgs"))


def pillow_decoder() -> dict:
    from PIL import __version__, features

    return {"library": "pillow", "version": f"{__version__} (libjpeg-turbo {features.version('jpg')})", "device": "cpu"}


def nvjpeg_decoder() -> dict:
    import torchvision

    return {
        "library": "torchvision.io.decode_jpeg (nvJPEG)",
        "version": f"{torchvision.__version__} (CUDA {torch.version.cuda})",
        "device": "cuda",
    }


def decode_jpeg_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` of a list of encoded images on ``device``: one batched
    nvJPEG call on CUDA. Its deprecation notice (torchvision 0.29) is ours to act on, not the
    user's: it is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Dd]eprecat.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*[Dd]eprecat.*", category=UserWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class JpegRecords:
    """JPEG records of one split, read like the ``[N, H, W, 3]`` uint8 tensor of raw records:
    ``records[index]`` is the decoded zero-padded records (on the decoder's device),
    :meth:`gather` what the prefetch threads call ahead of a step."""

    dtype = torch.uint8
    device = torch.device("cpu")  # where indices are read (the pixels come out on the decoder's device)

    def __init__(self, folder: Path, decoder: str = "cpu", threads: int | None = None):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "records.json").read_text())
        if meta.get("format") != FORMAT:
            raise UserError(f"{self.folder}: unsupported records format {meta.get('format')!r} (this vitdistill reads {FORMAT})")
        self.record = tuple(meta["record"])
        self.quality = int(meta["quality"])
        self.index = np.load(self.folder / "index.npy")
        self.true_sizes = np.load(self.folder / "sizes.npy")
        self.variable_size = bool(meta.get("variable_size", True))
        self.shards = int(meta["shards"])
        self.decoder_device = decoder
        self.threads = threads or max(1, min(len(os.sched_getaffinity(0)), 16))
        self._maps: dict[int, np.memmap] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self):  # memory maps and threads are reopened where the records go
        return {**self.__dict__, "_maps": {}, "_pool": None}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.index), *self.record, 3)

    def __len__(self) -> int:
        return len(self.index)

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def decoder(self) -> dict:
        """Who turns the JPEGs into pixels (the split's fingerprint carries it)."""
        found = nvjpeg_decoder() if self.decoder_device == "cuda" else pillow_decoder()
        return {"records": "jpeg", "quality": self.quality, **found}

    def encoded(self, i: int) -> memoryview:
        """The JPEG bytes of image ``i`` (a view into the memory-mapped shard)."""
        shard, offset, length = (int(v) for v in self.index[i])
        if shard not in self._maps:
            self._maps[shard] = np.memmap(_shard(self.folder, shard), dtype=np.uint8, mode="r")
        return memoryview(self._maps[shard])[offset : offset + length]

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vitdistill-jpeg")
        return self._pool

    def decode_cpu(self, index: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """Records ``index`` decoded on the CPU in threads (Pillow releases the GIL while it
        decodes), into one zero-padded ``[B, H, W, 3]`` buffer (pinned when ``pin``)."""
        idx = [int(i) for i in index.reshape(-1).tolist()]
        out = torch.zeros((len(idx), *self.record, 3), dtype=torch.uint8, pin_memory=pin)
        target = out.numpy()

        def one(j: int) -> None:
            with open_image(bytes(self.encoded(idx[j]))) as img:
                pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # we wrote RGB: no copy
            target[j, : pixels.shape[0], : pixels.shape[1]] = pixels

        list(self._threads().map(one, range(len(idx))))
        return out

    def decode_gpu(self, data: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Encoded images decoded in one batched call on ``device`` into zero-padded records."""
        out = torch.zeros((len(data), *self.record, 3), dtype=torch.uint8, device=device)
        for j, pixels in enumerate(decode_jpeg_batch(data, device)):  # [3, h, w] each
            out[j, : pixels.shape[1], : pixels.shape[2]] = pixels.permute(1, 2, 0)
        return out

    def _cuda(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def __getitem__(self, index) -> torch.Tensor:
        index = torch.as_tensor(index).cpu()
        if self.decoder_device == "cuda":
            return self.decode_gpu(self._bytes(index), self._cuda())
        return self.decode_cpu(index)

    def _bytes(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [torch.frombuffer(bytearray(self.encoded(int(i))), dtype=torch.uint8) for i in index.reshape(-1).tolist()]

    def gather(self, index: torch.Tensor, pin: bool) -> torch.Tensor | EncodedBatch:
        """What a prefetch thread prepares for a step: the decoded records (CPU decoder), or the
        encoded bytes the main thread hands to the GPU decoder in one call (:class:`EncodedBatch`)."""
        if self.decoder_device == "cuda":
            return EncodedBatch(self, self._bytes(index.cpu()))
        return self.decode_cpu(index.cpu(), pin)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        """Every record decoded onto ``device`` (``data.placement: device``: small splits)."""
        device = torch.device(device)
        parts = [self[torch.arange(s, min(s + 1024, len(self)))].to(device) for s in range(0, len(self), 1024)]
        return torch.cat(parts)


class EncodedBatch:
    """A step's JPEG bytes, fetched ahead by a prefetch thread; ``.to(device)`` decodes them there."""

    def __init__(self, records: JpegRecords, data: list[torch.Tensor]):
        self.records, self.data = records, data

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        """Decoded on ``device`` when it is a GPU; for views made on the CPU (``data.augment_device:
        cpu``), on the GPU the fingerprint names, then copied (the same pixels either way).
        Without any GPU (tests), the same call runs on the CPU."""
        device = torch.device(device)
        if device.type == "cuda" or not torch.cuda.is_available():
            return self.records.decode_gpu(self.data, device)
        return self.records.decode_gpu(self.data, self.records._cuda()).to(device, non_blocking=non_blocking)
