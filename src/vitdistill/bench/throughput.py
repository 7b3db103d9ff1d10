"""Images/s of the training step with each data path, measured in one run on one model.

    (a) bare      the student's step on random tensors already on the device (the ceiling)
    (b) pipeline  vitdistill's data path (decoded-once images, seeded batched augmentation)
    (c) teacher   (b) plus an online teacher and hard distillation
    (d) loader    the conventional path: torchvision ImageFolder decoding JPEGs each epoch,
                  timm ``create_transform`` (RandAugment, erasing) in DataLoader workers, timm
                  ``Mixup`` on the device; with and without the online teacher
    (e) store     (b) plus the teacher's top-10 read from a teacher store (written first, by the
                  same teacher, for the epochs the measurement spans)

Every variant runs the engine's own ``Trainer.train_step`` (bf16 autocast on CUDA, AdamW), so
only the data path differs. Teachers and students have random weights: speed does not depend
on them. Two regimes: DeiT-Ti/4 at 32x32 with a CIFAR ResNet-18 teacher, and DeiT-Ti/16 at
224x224 with a RegNetY-160 teacher.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import ModelConfig, RunConfig
from ..data import train_batches
from ..device import DistEnv, describe_machine, resolve_device
from ..models import build_model, export_model
from .synthetic import synthetic_imagefolder
from .timm_patches import patch_timm_posterize


@dataclass
class Regime:
    name: str
    input_size: int
    student: dict
    teacher: str
    teacher_small_stem: bool
    augment: dict
    source_size: int | None = None
    batch_size: int = 256
    synthetic_sizes: tuple[int, int] = (320, 500)  # image sides of the synthetic stand-in data


FULL_AUGMENT = {"rand_augment": "rand-m9-mstd0.5-inc1", "erase_prob": 0.25, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "hflip": 0.5}

REGIMES = {
    "cifar32": Regime(
        name="cifar32",
        input_size=32,
        student={"name": "deit_tiny_distilled_patch16_224", "img_size": 32, "patch_size": 4},
        teacher="resnet18",
        teacher_small_stem=True,
        augment={"crop": "pad", "pad": 4, **FULL_AUGMENT},
        batch_size=1024,
        synthetic_sizes=(32, 32),
    ),
    "imagenet224": Regime(
        name="imagenet224",
        input_size=224,
        student={"name": "deit_tiny_distilled_patch16_224"},
        teacher="regnety_160",
        teacher_small_stem=False,
        augment={"crop": "rrc", **FULL_AUGMENT},
        source_size=256,
        batch_size=256,
    ),
}


def make_config(
    regime: Regime,
    data_root: str,
    cache: str,
    teacher_file: Path | None,
    batch_size: int,
    compile_model: str,
    device: str,
    store: dict | None = None,
) -> RunConfig:
    """The benchmark's run; ``compile_model`` is "model", "augment", "both" or ""."""
    from ..validate import config_from_dict  # late, as the runner below: it imports the objective and the engine

    objective = [{"term": "ce", "weight": 0.5, "head": "cls", "smoothing": 0.1}]
    if teacher_file is not None:
        objective.append({"term": "kd_hard", "weight": 0.5})  # the distillation head when there is one
    raw = {
        "name": f"bench-{regime.name}",
        "data": {"source": "imagefolder", "root": data_root, "cache_dir": cache, "source_size": regime.source_size, "eval_split": "train"},
        "augment": {"input_size": regime.input_size, "compile": compile_model in ("augment", "both"), **regime.augment},
        "model": regime.student,
        "objective": objective,
        "optim": {"epochs": 1, "batch_size": batch_size, "warmup_epochs": 0},
        "engine": {"device": device, "compile": compile_model in ("model", "both"), "progress": False, "tensorboard": False},
    }
    if teacher_file is not None:
        raw["teacher"] = {"checkpoint": str(teacher_file)}
    if store is not None:
        raw["store"] = store
    return config_from_dict(raw)


def random_teacher(regime: Regime, num_classes: int, cache: Path) -> Path:
    path = cache / f"random-{regime.teacher}-{num_classes}.safetensors"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        model = build_model(ModelConfig(name=regime.teacher, small_input_stem=regime.teacher_small_stem), num_classes)
        export_model(model, path)
    return path


def timed(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s of ``step`` over ``steps`` batches after ``warmup`` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += step(next(it))
    sync(device)
    return images / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_vitdistill(trainer, warmup: int, steps: int) -> float:
    """The engine's own data path: epoch after epoch of seeded views (with prefetching when the
    images are host-resident)."""
    device = trainer.env.device
    views = trainer.train_views

    def batches():
        epoch = 0
        while True:
            yield from views.train_batches(train_batches(len(views.source), trainer.cfg.optim.batch_size, views.rng, epoch), epoch)
            epoch += 1

    def step(batch):
        trainer.train_step(batch)
        return len(batch)

    return timed(step, batches(), warmup, steps, device)


def measure_bare(trainer, warmup: int, steps: int) -> float:
    """The student's step on one random batch reused: no data path at all."""
    device = trainer.env.device
    real = next(trainer.train_views.train_batches([torch.arange(trainer.cfg.optim.batch_size)], 0))
    real.images = torch.randn_like(real.images)

    def step(batch):
        trainer.train_step(batch)
        return len(batch)

    return timed(step, iter(lambda: real, None), warmup, steps, device)


def measure_cpu_loader(trainer, split_dir: Path, regime: Regime, workers: int, warmup: int, steps: int) -> float:
    """timm's conventional path: JPEG decode + transforms in DataLoader workers, Mixup on device."""
    from timm.data import Mixup, create_transform

    patch_timm_posterize()
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from ..augment import ViewBatch

    cfg, device = trainer.cfg, trainer.env.device
    transform = create_transform(
        regime.input_size,
        is_training=True,
        auto_augment=regime.augment.get("rand_augment"),
        re_prob=regime.augment.get("erase_prob", 0.0),
        re_mode="pixel",
        interpolation="bicubic",
        mean=cfg.data.mean,
        std=cfg.data.std,
    )
    dataset = ImageFolder(str(split_dir), transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=len(dataset.classes))

    def batches():
        while True:
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                images, _ = mixup(images, labels)
                n = labels.shape[0]
                # Same objective cost as the other variants (timm's soft targets are not used).
                yield ViewBatch(
                    images=images,
                    labels=labels,
                    index=torch.arange(n, device=device),
                    epoch=0,
                    boxes=torch.zeros(n, 4, device=device),
                    flips=torch.zeros(n, dtype=torch.bool, device=device),
                    partner=torch.arange(n, device=device),
                    partner_labels=labels,
                    partner_boxes=torch.zeros(n, 4, device=device),
                    partner_flips=torch.zeros(n, dtype=torch.bool, device=device),
                    lam=torch.ones(n, device=device),
                    mix_boxes=torch.zeros(n, 4, device=device),
                )

    def step(batch):
        trainer.train_step(batch)
        return len(batch)

    return timed(step, batches(), warmup, steps, device)


def run_regime(
    regime: Regime,
    data_root: str | None,
    cache: Path,
    batch_size: int | None,
    workers: int,
    warmup: int,
    steps: int,
    compile_model: str,
    device: str,
    student: str | None = None,
    teacher: str | None = None,
    synthetic_images: int = 2000,
    deadline: float | None = None,
) -> dict:
    """Every variant of one regime; a variant that fails reports its error, and variants that
    would start after ``deadline`` (``time.perf_counter()``) are skipped."""
    from ..data.imagefolder import resolve_split_dir, unpack_archive
    from ..runner import build_trainer  # late: the runner imports most of the package

    if student:
        regime = replace(regime, student={**regime.student, "name": student})
    if teacher:
        regime = replace(regime, teacher=teacher)
    if data_root is None:
        folder = cache / f"synthetic-{regime.name}-{synthetic_images}"
        data_root = str(synthetic_imagefolder(folder, synthetic_images, sizes=regime.synthetic_sizes))
    batch_size = batch_size or regime.batch_size
    env = DistEnv(rank=0, world=1, device=resolve_device(device))
    root = Path(data_root)
    split_dir = resolve_split_dir(unpack_archive(root, cache) if root.is_file() else root, "train")
    results: dict = {
        "regime": regime.name,
        "batch_size": batch_size,
        "input_size": regime.input_size,
        "student": regime.student["name"],
        "teacher": regime.teacher,
        "compile": compile_model,
        "loader_workers": workers,
        "steps": steps,
        "errors": {},
        "tracebacks": {},
    }

    def guarded(key: str, measure) -> None:
        """One variant: its images/s, or its error (one failing variant never loses the others)."""
        if deadline is not None and time.perf_counter() > deadline:
            results[key] = None
            results["errors"][key] = "skipped: the time for this benchmark was spent"
            return
        try:
            results[key] = measure()
        except Exception as err:  # noqa: BLE001 - reported in the results, the other variants go on
            results[key] = None
            results["errors"][key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            # the whole story goes into the JSON: inductor's SubprocException carries the failing
            # compile worker's own traceback in its message, past the first line shown above
            results["tracebacks"][key] = f"{traceback.format_exc()}\n{err}"
            print(f"vitdistill: bench {regime.name}: {key} failed: {results['errors'][key]}", flush=True)

    plain = build_trainer(make_config(regime, data_root, str(cache), None, batch_size, compile_model, device), env, cache / "unused")
    guarded("a_bare_img_s", lambda: measure_bare(plain, warmup, steps))
    guarded("b_pipeline_img_s", lambda: measure_vitdistill(plain, warmup, steps))
    guarded("d_loader_img_s", lambda: measure_cpu_loader(plain, split_dir, regime, workers, warmup, steps))
    teacher_file = random_teacher(regime, plain.train_views.source.num_classes, cache)
    plain = None  # free it before the next trainer
    taught = build_trainer(
        make_config(regime, data_root, str(cache), teacher_file, batch_size, compile_model, device), env, cache / "unused"
    )
    guarded("c_pipeline_teacher_img_s", lambda: measure_vitdistill(taught, warmup, steps))
    guarded("d_loader_teacher_img_s", lambda: measure_cpu_loader(taught, split_dir, regime, workers, warmup, steps))
    taught = None
    guarded(
        "e_pipeline_store_img_s",
        lambda: measure_store(regime, data_root, cache, teacher_file, batch_size, compile_model, device, env, warmup, steps),
    )
    results["c_over_a"] = ratio(results["c_pipeline_teacher_img_s"], results["a_bare_img_s"])
    results["c_over_d_teacher"] = ratio(results["c_pipeline_teacher_img_s"], results["d_loader_teacher_img_s"])
    results["b_over_e"] = ratio(results["b_pipeline_img_s"], results["e_pipeline_store_img_s"])  # epoch-time ratio store / no teacher
    return results


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure_store(
    regime: Regime,
    data_root: str,
    cache: Path,
    teacher_file: Path,
    batch_size: int,
    compile_model: str,
    device: str,
    env: DistEnv,
    warmup: int,
    steps: int,
) -> float:
    """Write a k=10 store of the views the measurement will use, then time training from it."""
    from ..runner import build_trainer
    from ..store import write_store

    plain = build_trainer(make_config(regime, data_root, str(cache), None, batch_size, compile_model, device), env, cache / "unused")
    epochs = -(-(warmup + steps) // (len(plain.train_views.source) // batch_size))
    del plain
    # the store pins the views it was made for, augment.compile included: one store per setting
    store = {"path": str(cache / f"store-{regime.name}-{batch_size}-{compile_model or 'eager'}"), "k": 10, "epochs": epochs}
    cfg = make_config(regime, data_root, str(cache), teacher_file, batch_size, compile_model, device, store)
    write_store(cfg)
    cfg.teacher.store = store["path"]
    cfg.optim.epochs = epochs
    return measure_vitdistill(build_trainer(cfg, env, cache / "unused"), warmup, steps)


def run(
    regimes: list[str],
    data: dict[str, str | None],
    cache: Path,
    batch_size: int | None,
    workers: int,
    warmup: int,
    steps: int,
    compile_model: str,
    device: str,
    json_path: str | None = None,
    **model_overrides,
) -> dict:
    report = {"machine": describe_machine(device), "results": []}
    for name in regimes:
        regime = REGIMES[name]
        result = run_regime(regime, data.get(name), cache, batch_size, workers, warmup, steps, compile_model, device, **model_overrides)
        report["results"].append(result)
        print(format_result(result), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def format_result(r: dict) -> str:
    lines = [
        f"{r['regime']}: {r['student']} @ {r['input_size']}, teacher {r['teacher']}, batch {r['batch_size']}, compile {r['compile'] or 'off'}"
    ]
    for key, label in VARIANTS:
        value = r.get(key)
        shown = f"{value:12,.0f} img/s" if value is not None else f"failed: {r.get('errors', {}).get(key, 'not run')}"
        lines.append(f"  {label:36s} {shown}")
    num = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
    lines.append(
        f"  (c)/(a) = {num(r['c_over_a'])}   (c)/(d with teacher) = {num(r['c_over_d_teacher'])}   epoch time store/no teacher = {num(r['b_over_e'])}"
    )
    return "\n".join(lines)


VARIANTS = (
    ("a_bare_img_s", "(a) bare model step"),
    ("b_pipeline_img_s", "(b) vitdistill pipeline"),
    ("c_pipeline_teacher_img_s", "(c) vitdistill pipeline + teacher"),
    ("d_loader_img_s", "(d) CPU loader"),
    ("d_loader_teacher_img_s", "(d) CPU loader + teacher"),
    ("e_pipeline_store_img_s", "(e) vitdistill pipeline + store"),
)
