"""Raw vs JPEG records on real photographs, measured (``benchmarks/decode_cache.py`` on the CPU,
the ``decode`` stage of ``vitdistill bench gpu`` on a GPU).

The photographs are distinct ImageNet-sized crops, scales and flips of scikit-learn's two sample
photos (shipped in its package: nothing is downloaded), saved as JPEG at quality 90 like
ImageNet's originals -- not synthetic noise or flat colours, whose JPEG sizes are nothing like a
photo's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

IMAGENET = {"ImageNet-1k": 1_281_167, "ImageNet-21k": 14_197_122}  # training images


def photo_folder(root: Path, count: int, seed: int = 0, classes: int = 10) -> Path:
    """``root/train/c<k>/<i>.jpg``: ``count`` distinct ImageNet-sized photographs (sides about
    300-500 px, a quarter portrait), made once (``root/done`` marks a finished folder)."""
    root = Path(root)
    if (root / "done").is_file():
        return root
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640x427 each
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % 2]
        long, short = int(rng.integers(400, 501)), int(rng.integers(300, 376))
        w, h = (long, short) if rng.random() < 0.75 else (short, long)
        scale = rng.uniform(0.35, 1.0)  # a crop of 35-100% of the photo's extent, resized to (w, h)
        cw, ch = max(32, int(photo.width * scale)), max(32, int(photo.height * scale))
        if w < h:  # portrait: a narrower crop, so the content is not squashed
            cw = min(photo.width, int(ch * w / h))
        x, y = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def batched_decode_rate(records, device: torch.device, batch: int = 256, count: int | None = None) -> float:
    """Images/s of the records' decoder (batched nvJPEG on CUDA, Pillow threads on the CPU) into
    padded records on ``device``, bytes already fetched from the memory map (after a warm-up batch)."""
    count = min(count or len(records), len(records))
    batches = [torch.arange(s, min(s + batch, count)) for s in range(0, count, batch)]
    if records.decoder_device != "cuda":  # Pillow threads decode in gather itself
        records.gather(batches[0], pin=False)
        began = time.perf_counter()
        for index in batches:
            records.gather(index, pin=False)
        return count / (time.perf_counter() - began)
    fetched = [records.gather(index, pin=False) for index in batches]
    fetched[0].to(device)  # warm-up: decoder handles, allocator
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    for item in fetched:
        item.to(device)
    torch.cuda.synchronize(device)
    return count / (time.perf_counter() - began)


def train_rate(
    source,
    device: torch.device,
    steps: int,
    batch: int,
    model_name: str = "deit_tiny_patch16_224",
    workers: int = 4,
    placement: str = "auto",
) -> float:
    """Training img/s of ``model_name`` at 224 (AdamW, mixup + cutmix views made on ``device``
    from ``source``'s records), after one warm-up step. ``placement: host`` reads raw records the
    way ImageNet-sized ones are read (memory-mapped, gathered ahead by threads)."""
    import timm

    from ..augment import Augmenter
    from ..config import AugmentConfig

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = AugmentConfig(input_size=224, crop="rrc", mixup_alpha=0.8, cutmix_alpha=1.0)
    views = Augmenter(source, cfg, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), device, placement, workers)
    order = torch.randperm(len(source))
    index = [order[torch.arange(i * batch, (i + 1) * batch) % len(source)] for i in range(steps + 1)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    began = None
    for i, views_batch in enumerate(views.train_batches(index, 0)):
        if i == 1:
            sync()
            began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(views_batch.images), views_batch.label_targets(10))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return steps * batch / (time.perf_counter() - began)
