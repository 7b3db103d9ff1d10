"""``vitdistill bench gpu``: every headline figure from one command that stops on time by itself.

GPU time comes in short loans (about 15 minutes, one command at most 10), so the evidence is one
prepared command with a total time budget. Stages run in order, each given a share of what is
left of the budget (a stage that ends early leaves its time to the next), and each is written to
the JSON report as soon as it ends: a crash or a time-out keeps the finished stages, and running
the command again skips them.

1. ``throughput``: images/s of the data paths (a)-(e) at 32x32 for DeiT-Ti/4 with a ResNet-18
   teacher, compiled (``vitdistill bench throughput``), at most 60 s;
2. ``teacher``: the CNN teacher on CIFAR-10 (``cnn_teacher_cifar10``), time-budgeted;
3. ``distilled``: DeiT-Ti/4, hard distillation through the distillation token, time-budgeted;
4. ``baseline``: the same student without a teacher, the same budget as 3;
5. ``store`` and ``token_label`` (whatever time is left, short runs): a student from a teacher
   store written by ``vitdistill cache``, and token labeling from ``vitdistill labelmaps``;
6. optional (``--stages ... feature``): feature distillation then fine-tuning, against the same
   fine-tuning from random init;
7. optional (``--stages ... decode``): raw vs JPEG records of photographs made on the spot,
   batched nvJPEG decode img/s and DeiT-Ti/16 training img/s at 224 from each.

The training stages run eager by default (``--compile`` to change it): compiling a training step
and the views costs a minute or more, a large part of a two-minute stage; the throughput stage
measures what compiling buys (``--throughput-compile``, default both).

Before the stages it prints the torch/timm versions, and after the teacher it counts the
host-device synchronisations of a few training steps (``torch.cuda.set_sync_debug_mode``; on the
CPU, copies to the ``meta`` stand-in device). ``--smoke`` runs the same stages at toy scale on the
CPU (digits, tiny models): the CI checks the report and that each budgeted stage ends on time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..atomic import write_text_atomic

REPORT_FORMAT = "vitdistill-bench-gpu/1"
TOLERANCE = 0.15  # a budgeted stage should end within 15% of its budget


@dataclass
class Stage:
    name: str
    title: str
    share: float  # of the budget left when the stage starts (relative to the later stages' shares)
    run: Callable[[Bench, float], dict]
    max_s: float | None = None  # a cap on the stage's budget
    needs: tuple[str, ...] = ()  # stages whose results it uses
    optional: bool = False  # runs only when named in --stages


@dataclass
class Bench:
    """One ``bench gpu`` invocation: where its runs go and what it has measured so far."""

    data: str | None  # CIFAR-10 ImageFolder or archive (ignored with smoke)
    output: Path
    budget_s: float
    smoke: bool
    device: str
    compile: str  # the training stages: "", "augment", "model" or "both"
    throughput_compile: str = "both"  # the throughput stage
    seed: int = 0
    report: dict = field(default_factory=dict)
    json_path: Path | None = None
    started: float = field(default_factory=time.perf_counter)

    # ------------------------------------------------------------------ bookkeeping
    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        """The report, written atomically after every stage."""
        assert self.json_path is not None
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.json_path, json.dumps(self.report, indent=2))

    def stage_result(self, name: str) -> dict | None:
        result = self.report.get("stages", {}).get(name)
        return result if result and result.get("status") == "done" else None

    # ------------------------------------------------------------------ recipes per scale
    def common(self, name: str) -> list[str]:
        cache = self.output / "cache"
        data = [] if self.smoke else [f"data.root={self.data}"]
        return [f"output={self.output / name}", f"data.cache_dir={cache}", f"seed={self.seed}", f"engine.device={self.device}", *data]

    def compile_overrides(self) -> list[str]:
        return [
            f"augment.compile={str(self.compile in ('augment', 'both')).lower()}",
            f"engine.compile={str(self.compile in ('model', 'both')).lower()}",
        ]

    def teacher_export(self) -> Path:
        return self.output / "teacher" / "model.safetensors"


# -------------------------------------------------------------------------- recipes
def teacher_recipe(bench: Bench) -> tuple[str, list[str]]:
    if bench.smoke:
        return "demo_teacher", ["model.name=vitdistill_convnet_tiny", "data.train_limit=512", "data.eval_limit=128", "optim.epochs=1000"]
    return "cnn_teacher_cifar10", ["optim.epochs=1000"]  # the budget decides; epochs is only an upper bound


SMOKE_STUDENT = ["model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "data.train_limit=512", "data.eval_limit=128", "optim.epochs=1000"]


def student_recipe(bench: Bench, distilled: bool) -> tuple[str, list[str]]:
    if bench.smoke:
        name = "demo_student_distilled" if distilled else "demo_student"
        return name, [*SMOKE_STUDENT, *([f"teacher.checkpoint={bench.teacher_export()}"] if distilled else [])]
    name = "deit_tiny_distilled_cifar10" if distilled else "deit_tiny_cifar10"
    return name, ["optim.epochs=1000", *bench.compile_overrides(), *([f"teacher.checkpoint={bench.teacher_export()}"] if distilled else [])]


# -------------------------------------------------------------------------- stages
def run_training(bench: Bench, name: str, recipe: str, overrides: list[str], budget_s: float) -> dict:
    """Train ``recipe`` under a time budget; the stage's figures from the run's summary."""
    from ..runner import train
    from ..validate import load_recipe

    out = bench.output / name
    shutil.rmtree(out, ignore_errors=True)  # an interrupted stage starts again
    budget_s = float(max(1, round(budget_s)))  # whole seconds: the budget reported is the one the run was given
    overrides = [*bench.common(name), *overrides, f"optim.budget={budget_s:.0f}s"]
    result = train(load_recipe(recipe, overrides))
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    budget = summary.get("budget") or {}
    return {
        "recipe": recipe,
        "command": f"vitdistill train {recipe} " + " ".join(overrides),
        "top1_last": final.get("eval_top1"),
        "top1_cls_last": final.get("eval_top1_cls"),
        "top1_dist_last": final.get("eval_top1_dist"),
        "epochs": summary["epochs"],
        "steps_planned": budget.get("total_steps"),
        "steps_done": budget.get("steps_done"),
        "train_img_per_s": summary["train_img_per_s"],
        "parameters": result.parameters,
        "budget_s": budget_s,
        "run_s": summary["wall_time_s"],
        "planned_end_s": budget.get("planned_end_s"),
        "cut_short": budget.get("cut_short"),
        "on_time": abs(summary["wall_time_s"] - budget_s) <= TOLERANCE * budget_s,
    }


def stage_throughput(bench: Bench, budget_s: float) -> dict:
    from .throughput import REGIMES, format_result, run_regime

    cache = bench.output / "cache" / "throughput"
    if bench.smoke:  # synthetic 32x32 JPEGs, the demo's tiny CNN as the teacher
        tiny = {**REGIMES["cifar32"].student, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
        regime = replace(REGIMES["cifar32"], student=tiny, teacher="vitdistill_convnet_tiny", teacher_small_stem=False)
        result = run_regime(regime, None, cache, 8, 1, 1, 2, "", bench.device, synthetic_images=32)  # seconds: no deadline needed
    else:
        result = run_regime(
            REGIMES["cifar32"],
            bench.data,
            cache,
            1024,
            max(1, min(15, (os.cpu_count() or 2) - 1)),
            10,
            40,
            bench.throughput_compile,
            bench.device,
            deadline=time.perf_counter() + budget_s,
        )
    print(format_result(result), flush=True)
    compiled = f" --compile {bench.throughput_compile}" if bench.throughput_compile and not bench.smoke else ""
    return {
        "result": result,
        "command": f"vitdistill bench throughput --regimes cifar32 --data-cifar32 {bench.data}{compiled}"
        if not bench.smoke
        else "vitdistill bench throughput --regimes cifar32 --teacher vitdistill_convnet_tiny --batch-size 8 --steps 2 (tiny student; smoke)",
    }


def stage_teacher(bench: Bench, budget_s: float) -> dict:
    recipe, overrides = teacher_recipe(bench)
    return run_training(bench, "teacher", recipe, overrides, budget_s)


def stage_distilled(bench: Bench, budget_s: float) -> dict:
    recipe, overrides = student_recipe(bench, distilled=True)
    result = run_training(bench, "distilled", recipe, overrides, budget_s)
    bench.report["student_budget_s"] = result["budget_s"]  # the baseline gets the same
    return result


def stage_baseline(bench: Bench, budget_s: float) -> dict:
    recipe, overrides = student_recipe(bench, distilled=False)
    # exactly the distilled student's budget, even when the stages before ran a little over: equal budgets are the comparison
    return run_training(bench, "baseline", recipe, overrides, bench.report.get("student_budget_s", budget_s))


def stage_store(bench: Bench, budget_s: float) -> dict:
    """A short run: cache the teacher's top-10 for a few epochs of views, train a student from it."""
    from ..store import write_store
    from ..validate import load_recipe

    began = time.perf_counter()
    recipe, overrides = student_recipe(bench, distilled=True)
    epochs = 2 if bench.smoke else 10
    store = bench.output / "store"
    shutil.rmtree(store, ignore_errors=True)
    cache_overrides = [*bench.common("unused"), *overrides, f"store.path={store}", "store.k=10", f"store.epochs={epochs}"]
    write_store(load_recipe(recipe, cache_overrides))
    cache_s = time.perf_counter() - began
    student = [o for o in overrides if not o.startswith("optim.epochs")] + [f"teacher.store={store}", f"optim.epochs={epochs}"]
    result = run_training(bench, "store_student", recipe, student, max(5.0, budget_s - cache_s))
    result.update(cache_s=cache_s, store_epochs=epochs, cache_command=f"vitdistill cache {recipe} " + " ".join(cache_overrides), short=True)
    return result


def stage_token_label(bench: Bench, budget_s: float) -> dict:
    """A short run: the teacher's label maps, then DeiT-Ti/4 with token labeling and MixToken."""
    from ..labelmaps import write_label_maps
    from ..validate import load_recipe

    began = time.perf_counter()
    maps = bench.output / "labelmaps"
    shutil.rmtree(maps, ignore_errors=True)
    if bench.smoke:
        recipe = "demo_student_distilled"
        overrides = [
            *SMOKE_STUDENT,
            "model.token_head=true",
            "augment.cutmix_alpha=0.0",
            "objective=[{term: token_label, mixtoken: true, smoothing: 0.1}]",
        ]
    else:
        recipe, overrides = "deit_tiny_token_label_cifar10", ["optim.epochs=1000", *bench.compile_overrides()]
    maps_overrides = [*bench.common("unused"), *overrides, f"teacher.checkpoint={bench.teacher_export()}", f"labelmaps.path={maps}"]
    write_label_maps(load_recipe(recipe, maps_overrides))
    maps_s = time.perf_counter() - began
    student = [*overrides, f"teacher.checkpoint={bench.teacher_export()}", f"teacher.label_maps={maps}"]
    result = run_training(bench, "token_label", recipe, student, max(5.0, budget_s - maps_s))
    result.update(labelmaps_s=maps_s, labelmaps_command=f"vitdistill labelmaps {recipe} " + " ".join(maps_overrides), short=True)
    return result


def stage_feature(bench: Bench, budget_s: float) -> dict:
    """Optional (``--stages ... feature``): feature distillation from the CNN teacher
    (``fd_pretrain_*``, label-free), then fine-tuning (``fd_finetune_*``) against the same
    fine-tuning from random init; pretraining gets 40% of the time, each fine-tuning 30%."""
    scale = "digits" if bench.smoke else "cifar10"
    limits = ["data.train_limit=512", "data.eval_limit=128"] if bench.smoke else []
    common = ["optim.epochs=1000", *limits, *bench.compile_overrides()]
    pretrain = run_training(
        bench, "fd_pretrain", f"fd_pretrain_{scale}", [*common, f"teacher.checkpoint={bench.teacher_export()}"], 0.4 * budget_s
    )
    finetune = run_training(
        bench,
        "fd_finetune",
        f"fd_finetune_{scale}",
        [*common, f"model.init={bench.output / 'fd_pretrain' / 'model.safetensors'}"],
        0.3 * budget_s,
    )
    baseline = run_training(
        bench, "fd_baseline", f"fd_finetune_{scale}", [*common, "model.init=null", "optim.layer_decay=null"], 0.3 * budget_s
    )
    return {
        **finetune,
        "budget_s": budget_s,
        "baseline_top1_last": baseline["top1_last"],
        "pretrain": pretrain,
        "baseline": baseline,
        "command": f"{pretrain['command']} ; {finetune['command']} ; {baseline['command']}",
    }


def stage_decode(bench: Bench, budget_s: float) -> dict:
    """Optional (``--stages ... decode``): raw vs JPEG records of photographs made on the spot
    (:mod:`.photos`): bytes per image, build rate, the batched decode img/s (nvJPEG on CUDA) and
    DeiT-Ti/16 training img/s at 224 from each (the issue's targets: at least 15,000 img/s at
    256 px, training from JPEG within 10% of raw)."""
    from ..config import DataConfig
    from ..data import open_source
    from ..device import resolve_device
    from .photos import IMAGENET, batched_decode_rate, photo_folder, train_rate

    began = time.perf_counter()
    count, steps, batch = (48, 2, 4) if bench.smoke else (4096, 30, 256)
    size = 64 if bench.smoke else 256
    device = resolve_device(bench.device)
    root = photo_folder(bench.output / "cache" / f"photos-{count}", count)
    made_s = time.perf_counter() - began
    result: dict = {"images": count, "source_size": size, "photos_s": made_s, "budget_s": budget_s}
    sources = {}
    for kind in ("raw", "jpeg"):
        cache = bench.output / "cache" / f"records-{kind}"
        shutil.rmtree(cache, ignore_errors=True)
        cfg = DataConfig(
            root=str(root), cache_dir=str(cache), source_size=size, records=kind, decoder="cuda" if device.type == "cuda" else "cpu"
        )
        t = time.perf_counter()
        sources[kind] = open_source(cfg, "train")
        built = time.perf_counter() - t
        on_disk = sum(p.stat().st_size for p in (cache / "decoded").rglob("*") if p.is_file())
        result[kind] = {"bytes_per_image": on_disk / count, "build_images_per_s": count / built}
    result["jpeg"]["decoder"] = sources["jpeg"].images.decoder()
    result["jpeg"]["decode_images_per_s"] = batched_decode_rate(sources["jpeg"].images, device, batch=batch)
    for kind in ("raw", "jpeg"):
        result[kind]["train_images_per_s"] = train_rate(sources[kind], device, steps, batch, "deit_tiny_patch16_224")
    result["jpeg_over_raw_bytes"] = result["jpeg"]["bytes_per_image"] / result["raw"]["bytes_per_image"]
    result["train_jpeg_over_raw"] = result["jpeg"]["train_images_per_s"] / result["raw"]["train_images_per_s"]
    result["extrapolated_gb"] = {name: {k: n * result[k]["bytes_per_image"] / 1e9 for k in ("raw", "jpeg")} for name, n in IMAGENET.items()}
    result["wall_time_s"] = time.perf_counter() - began
    result["command"] = "vitdistill bench gpu --stages decode"
    print(
        f"decode: JPEG {result['jpeg']['bytes_per_image']:,.0f} B/image ({result['jpeg_over_raw_bytes']:.2f} of raw), "
        f"decode {result['jpeg']['decode_images_per_s']:,.0f} img/s, train {result['jpeg']['train_images_per_s']:,.0f} vs "
        f"{result['raw']['train_images_per_s']:,.0f} img/s from raw",
        flush=True,
    )
    return result


STAGES = (
    Stage("throughput", "data paths (a)-(e), DeiT-Ti/4 + ResNet-18 at 32x32", 0.12, stage_throughput, max_s=60.0),
    Stage("teacher", "CNN teacher (ResNet-18, small-image stem)", 0.20, stage_teacher),
    Stage("distilled", "DeiT-Ti/4, hard distillation (distillation token)", 0.25, stage_distilled, needs=("teacher",)),
    Stage("baseline", "DeiT-Ti/4, no teacher (same budget)", 0.25, stage_baseline),
    Stage("store", "DeiT-Ti/4 from a teacher store (short)", 0.09, stage_store, needs=("teacher",)),
    Stage("token_label", "DeiT-Ti/4 with token labeling (short)", 0.09, stage_token_label, needs=("teacher",)),
    Stage(
        "feature",
        "ViT-Ti/4 (shared rel. pos. bias): feature distillation, then fine-tuning, vs fine-tuning alone",
        0.30,
        stage_feature,
        needs=("teacher",),
        optional=True,
    ),
    Stage(
        "decode",
        "raw vs JPEG records of photographs: batched nvJPEG decode, DeiT-Ti/16 training at 224 from each",
        0.15,
        stage_decode,
        max_s=240.0,
        optional=True,
    ),
)


# -------------------------------------------------------------------------- checks
def count_synchronisations(bench: Bench, steps: int = 5) -> dict:
    """Synchronising calls in ``steps`` training steps of the distilled student (views, online
    teacher, update), after three warm-up steps; eager, so compilation does not count."""
    from ..data import train_batches
    from ..device import DistEnv, resolve_device
    from ..runner import build_trainer
    from ..validate import load_recipe
    from .transfers import HostDeviceCopies

    recipe, overrides = student_recipe(bench, distilled=True)
    overrides = [o for o in overrides if not o.startswith(("augment.compile", "engine.compile"))]
    cfg = load_recipe(recipe, [*bench.common("sync_check"), *overrides])
    device = resolve_device(bench.device)
    env = DistEnv(0, 1, device if device.type == "cuda" else torch.device("meta"))
    trainer = build_trainer(cfg, env, bench.output / "sync_check")
    views = trainer.train_views
    batches = views.train_batches(train_batches(len(views.source), cfg.optim.batch_size, views.rng, 0), 0)
    for _ in range(3):
        trainer.train_step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    trainer.train_step(next(batches))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        messages = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        return {
            "method": "torch.cuda.set_sync_debug_mode('warn')",
            "steps": steps,
            "synchronising_calls": len(messages),
            "examples": sorted(set(messages))[:5],
        }
    with HostDeviceCopies() as mode:
        for _ in range(steps):
            trainer.train_step(next(batches))
    calls = mode.to_device + mode.to_host
    return {
        "method": "host<->meta copies (CPU stand-in)",
        "steps": steps,
        "synchronising_calls": len(calls),
        "examples": sorted(set(calls))[:5],
    }


# -------------------------------------------------------------------------- the command
def run_bench_gpu(
    data: str | None,
    budget_s: float,
    output: str | Path = "runs/bench-gpu",
    json_path: str | Path | None = None,
    smoke: bool = False,
    device: str = "auto",
    compile: str = "",
    seed: int = 0,
    stages: list[str] | None = None,
    throughput_compile: str = "both",
) -> dict:
    """Run the stages (see the module docstring) within ``budget_s`` seconds; returns the report."""
    from ..device import describe_machine
    from ..errors import UserError

    output = Path(output)
    if not smoke and not data and not (stages and set(stages) <= {"decode"}):  # the decode stage makes its own photographs
        raise UserError("bench gpu: --data is required (the CIFAR-10 ImageFolder or archive), or use --smoke")
    if not smoke and data and not Path(data).exists():  # before any stage spends the budget on it
        raise UserError(f"bench gpu: --data {data} does not exist")
    if smoke:
        device = "cpu" if device == "auto" else device
        compile = throughput_compile = ""
    bench = Bench(
        data,
        output,
        budget_s,
        smoke,
        device,
        compile,
        throughput_compile,
        seed,
        json_path=Path(json_path) if json_path else output / "gpu.json",
    )
    previous = json.loads(bench.json_path.read_text()) if bench.json_path.is_file() else {}
    same_plan = previous.get("format") == REPORT_FORMAT and previous.get("smoke") == smoke and previous.get("data") == data
    bench.report = previous if same_plan else {}
    machine = describe_machine(device)
    print(
        f"vitdistill bench gpu: {machine['device']}, torch {machine['torch']}, timm {machine['timm']}, CUDA {machine['cuda']}; "
        f"budget {budget_s:.0f}s{' (smoke: toy scale on the CPU)' if smoke else ''}",
        flush=True,
    )
    bench.report.update(
        format=REPORT_FORMAT,
        machine=machine,
        budget_s=budget_s,
        smoke=smoke,
        data=data,
        compile=compile,
        throughput_compile=throughput_compile,
    )
    bench.report.setdefault("stages", {})
    bench.save()
    chosen = [s for s in STAGES if (stages is None and not s.optional) or (stages is not None and s.name in stages)]
    for i, stage in enumerate(chosen):
        if bench.stage_result(stage.name):
            print(f"vitdistill bench gpu: {stage.name}: done in an earlier run, kept", flush=True)
            continue
        missing = [n for n in stage.needs if not bench.stage_result(n)]
        later = sum(s.share for s in chosen[i:] if not bench.stage_result(s.name))
        share = bench.remaining() * stage.share / later if later else 0.0
        share = min(share, stage.max_s) if stage.max_s else share
        if missing or share < 3.0:
            why = f"needs {', '.join(missing)}" if missing else "no time left"
            bench.report["stages"][stage.name] = {"status": "skipped", "title": stage.title, "reason": why}
            print(f"vitdistill bench gpu: {stage.name}: skipped ({why})", flush=True)
            bench.save()
            continue
        print(f"\nvitdistill bench gpu: {stage.name} ({stage.title}), {share:.0f}s", flush=True)
        began = time.perf_counter()
        try:
            result = {"status": "done", **stage.run(bench, share)}
        except Exception as err:  # noqa: BLE001 - a failed stage is reported; the others still run
            result = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
            print(f"vitdistill bench gpu: {stage.name} failed: {type(err).__name__}: {err}", flush=True)
        result.update(title=stage.title, wall_s=time.perf_counter() - began, budget_s=result.get("budget_s", share))
        bench.report["stages"][stage.name] = result
        bench.save()
        if stage.name == "teacher" and result["status"] == "done" and "sync_check" not in bench.report:
            try:
                bench.report["sync_check"] = count_synchronisations(bench)
            except Exception as err:  # noqa: BLE001 - a check, not a stage: report and go on
                bench.report["sync_check"] = {"error": f"{type(err).__name__}: {err}"}
            bench.save()
    bench.report["total_s"] = time.perf_counter() - bench.started
    bench.save()
    print("\n" + markdown_table(bench.report), flush=True)
    (bench.json_path.with_suffix(".md")).write_text(markdown_table(bench.report) + "\n")
    return bench.report


def markdown_table(report: dict) -> str:
    """The report as Markdown, ready for benchmarks/RESULTS.md."""
    m = report["machine"]
    lines = [
        f"{m['device']} ({m['device_type']}), torch {m['torch']}, timm {m['timm']}, CUDA {m['cuda']}, Python {m['python']}; "
        f"budget {report['budget_s']:.0f} s, total {report.get('total_s', 0):.0f} s{'; smoke (toy scale)' if report.get('smoke') else ''}",
        "",
        "| stage | wall time | budget | train img/s | top-1 last epoch (single view) | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["stages"].items():
        if r.get("status") != "done":
            lines.append(f"| {name}: {r.get('title', '')} | | | | | {r.get('status')}: {r.get('reason') or r.get('error', '')} |")
            continue
        if name == "throughput":
            t = r["result"]
            rates = ", ".join(f"{k.split('_')[0]} {v:,.0f}" for k, v in t.items() if k.endswith("_img_s") and v is not None)
            ratios = (
                f"(c)/(a) {t['c_over_a']:.2f}, (c)/(d) {t['c_over_d_teacher']:.2f}"
                if t.get("c_over_a") and t.get("c_over_d_teacher")
                else ""
            )
            errors = f"; errors: {t['errors']}" if t.get("errors") else ""
            lines.append(f"| {name}: {r['title']} | {r['wall_s']:.0f} s | {r['budget_s']:.0f} s | {rates} | | {ratios}{errors} |")
            continue
        if name == "decode":
            raw, jpg = r["raw"], r["jpeg"]
            lines.append(
                f"| {name}: {r['title']} | {r['wall_s']:.0f} s | {r['budget_s']:.0f} s | JPEG {jpg['train_images_per_s']:,.0f}, "
                f"raw {raw['train_images_per_s']:,.0f} | | JPEG {jpg['bytes_per_image']:,.0f} B/image ({r['jpeg_over_raw_bytes']:.2f} of raw), "
                f"decode {jpg['decode_images_per_s']:,.0f} img/s ({jpg['decoder']['library']}) |"
            )
            continue
        top1 = f"{r['top1_last']:.2f}" if r.get("top1_last") is not None else ""
        heads = f" (cls {r['top1_cls_last']:.2f}, dist {r['top1_dist_last']:.2f})" if r.get("top1_dist_last") is not None else ""
        if r.get("baseline_top1_last") is not None:
            heads += f" (fine-tuning alone: {r['baseline_top1_last']:.2f})"
        notes = [f"{r['epochs']} epochs", f"{r['parameters'] / 1e6:.2f}M params"]
        if r.get("cut_short"):
            notes.append(f"cut short: {r['steps_done']:,} of {r['steps_planned']:,} steps")
        if r.get("short"):
            notes.append("short run")
        lines.append(
            f"| {name}: {r['title']} | {r['wall_s']:.0f} s | {r['budget_s']:.0f} s | {r['train_img_per_s']:,.0f} | {top1}{heads} | {', '.join(notes)} |"
        )
    sync = report.get("sync_check")
    if sync:
        lines += [
            "",
            f"Synchronising calls in {sync.get('steps', '?')} training steps ({sync.get('method', sync.get('error'))}): {sync.get('synchronising_calls', 'n/a')}",
        ]
    lines += ["", "Commands:", ""]
    for name, r in report["stages"].items():
        for key in ("cache_command", "labelmaps_command", "command"):
            if r.get(key):
                lines.append(f"- {name}: `{r[key]}`")
    return "\n".join(lines)
