"""The ``vitdistill`` command line: ``train``, ``eval``, ``predict``, ``demo``, ``export``, ``compare``, ``recipes``, ``config``..."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import RecipeWarning, UserError

EPILOG = """examples:
  vitdistill demo
  vitdistill train cnn_teacher_cifar10 data.root=../shared/datasets/cifar10-jpg.tar.gz
  vitdistill train deit_tiny_distilled_cifar10 optim.epochs=300 optim.lr=1e-3
  vitdistill train my_recipe.yaml --resume
  vitdistill train my_recipe.yaml --resume auto      (a job's first start and every requeue)
  vitdistill eval runs/deit_tiny_distilled_cifar10 --json eval.json
  vitdistill export runs/deit_tiny_distilled_cifar10 --format onnx
  vitdistill predict runs/deit_tiny_distilled_cifar10 photos/ --top-k 3 --output predictions.csv
  vitdistill compare runs/deit_tiny_cifar10 runs/deit_tiny_distilled_cifar10 --plot compare.png
"""


def _split_overrides(values: list[str]) -> list[str]:
    for value in values:
        if "=" not in value:
            raise UserError(f"unexpected argument {value!r}: overrides look like key=value (e.g. optim.lr=5e-4)")
    return values


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
        print(f"vitdistill: wrote {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from .runner import train
    from .validate import load_recipe

    overrides = _split_overrides(args.overrides) + ([f"optim.budget={args.budget}"] if args.budget else [])
    cfg = load_recipe(args.recipe, overrides)
    train(cfg, resume={None: False, "": True}.get(args.resume, args.resume))


def cmd_eval(args: argparse.Namespace) -> None:
    from .formatting import format_table
    from .runner import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, args.data, args.split, _split_overrides(args.overrides), args.batch_size, args.device, args.ignore_class_names
    )
    print(f"{result['model']} on {result['data']} ({result['images']:,} images)")
    rows = [[k, f"{v:.2f}"] for k, v in result.items() if k.startswith(("top1", "top5"))]
    print(format_table(["metric (%)", "value"], rows))
    print(f"loss (cross-entropy of the inference head): {result['loss']:.4f}")
    _write_json(args.json, result)


def cmd_predict(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .inference import EXIT_SOME_BAD, open_predictor, predict_iter, write_predictions

    if args.top_k < 1:
        raise UserError("predict: --top-k must be at least 1")
    predictor = open_predictor(args.model, resolve_device(args.device))
    k = min(args.top_k, predictor.num_classes)
    rows = predict_iter(predictor, args.images, k, args.batch_size, args.device, args.split, show_progress=True)
    if args.output:
        from .atomic import atomic_path

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(args.output)) as tmp, open(tmp, "w", newline="") as out:
            done, bad = write_predictions(rows, out, args.format, k)
    else:
        done, bad = write_predictions(rows, sys.stdout, args.format, k)
    where = f" -> {args.output}" if args.output else ""
    print(
        f"vitdistill: predicted {done:,} images with the {predictor.kind}{where}" + (f"; {bad:,} could not be read" if bad else ""),
        file=sys.stderr,
    )
    return EXIT_SOME_BAD if bad else 0


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    result = run_demo(args.output, (f"seed={args.seed}",))
    _write_json(args.json, result)


def cmd_cache(args: argparse.Namespace) -> None:
    from .store import write_store
    from .validate import load_recipe

    write_store(load_recipe(args.recipe, _split_overrides(args.overrides)))


def cmd_labelmaps(args: argparse.Namespace) -> None:
    from .labelmaps import write_label_maps
    from .validate import load_recipe

    write_label_maps(load_recipe(args.recipe, _split_overrides(args.overrides)))


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import describe_store, verify_store

    report = verify_store(args.store, args.samples, args.epochs, args.teacher, args.device, args.tolerance, args.min_agreement)
    print(describe_store(Path(args.store)))
    print(
        f"checked epochs {report['epochs_checked']}, {report['samples_per_epoch']} samples each: "
        f"top-1 agreement {100 * report['top1_agreement']:.2f}%, largest probability error {report['max_prob_error']:.2e} "
        f"(tolerance {report['tolerance']:.0e})"
    )
    if report["checksum_failures"]:
        print(f"checksum failures: {', '.join(report['checksum_failures'])}")
    for key, what in (("changed_samples", "images changed since the store was written"), ("disagreeing", "top-1 disagrees")):
        if report[key]:
            more = f", ... ({len(report[key]):,} in all)" if len(report[key]) > 5 else ""
            print(f"{what}: {', '.join(report[key][:5])}{more}")
    if report["changed_samples"]:
        print("rerun `vitdistill cache` with the store's recipe to rewrite the store")
    print("OK" if report["ok"] else "MISMATCH")
    _write_json(args.json, report)
    return 0 if report["ok"] else 1


def cmd_bench_throughput(args: argparse.Namespace) -> None:
    from .bench.throughput import run

    data = {"cifar32": args.data_cifar32, "imagenet224": args.data_imagenet224}
    overrides = {"student": args.student, "teacher": args.teacher, "synthetic_images": args.synthetic_images}
    run(
        args.regimes,
        data,
        Path(args.cache),
        args.batch_size,
        args.workers,
        args.warmup,
        args.steps,
        args.compile,
        args.device,
        args.json,
        **overrides,
    )


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from .bench.gpu import run_bench_gpu
    from .config.parsing import parse_duration

    report = run_bench_gpu(
        args.data,
        parse_duration(args.budget, "--budget"),
        args.output,
        args.json,
        args.smoke,
        args.device,
        args.compile,
        args.seed,
        args.stages,
        args.throughput_compile,
    )
    failed = [name for name, stage in report["stages"].items() if stage.get("status") == "failed"]
    if failed:
        print(f"vitdistill: bench gpu: stages failed: {', '.join(failed)} (details in the JSON report)", file=sys.stderr)
    return 1 if failed else 0


def cmd_analyze(args: argparse.Namespace) -> None:
    from .analysis import analyze

    result = analyze(
        args.checkpoint,
        args.output,
        data=args.data,
        split=args.split,
        overrides=_split_overrides(args.overrides),
        compare=args.compare,
        images=args.images,
        landscape_images=args.landscape_images,
        landscape_steps=args.landscape_steps,
        landscape_grid=args.landscape_grid,
        landscape_span=args.landscape_span,
        device=args.device,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    for model in result["models"]:
        last = model["layers"]["patch_cosine"][-1] if model.get("layers") else None
        extra = f", last-layer patch cosine similarity {last:.3f}" if last is not None else ""
        print(f"{model['label']}: top-1 {model['top1']:.2f}% on {result['images']} images{extra}")
        if model.get("note"):  # e.g. why a model that is not a ViT has no token or attention figures
            print(f"{model['label']}: {model['note']}")
    print(f"vitdistill: report in {Path(args.output) / 'report.md'}")
    _write_json(args.json, result)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_run, onnx_max_abs_diff

    out = export_run(args.run, args.format, args.ema, args.output)
    print(f"vitdistill: wrote {out}")
    if args.format == "timm":
        print(f"  load it: timm.create_model('local-dir:{out}', pretrained=True)  (see README: Using the student)")
    else:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return
        import torch

        from .export import open_export_source

        model = open_export_source(args.run, args.ema).model
        size = model.spec.input_size or 224
        diff = onnx_max_abs_diff(out, model, torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)))
        print(f"  ONNX Runtime vs PyTorch on 4 random images: max |difference| {diff:.2e}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .analysis.curves import compare_runs, format_comparison, plot_comparison, read_metrics

    rows = compare_runs(args.runs)
    print(format_comparison(rows))
    if args.plot:
        names = [row["name"] for row in rows]
        labels = [row["name"] if names.count(row["name"]) == 1 else row["run"] for row in rows]
        plot_comparison({label: read_metrics(row["run"]) for label, row in zip(labels, rows)}, args.plot)
        print(f"vitdistill: wrote {args.plot}")
    _write_json(args.json, {"runs": rows})


def cmd_recipes(args: argparse.Namespace) -> None:
    from .config import list_recipes, read_recipe

    for name in list_recipes():
        model = (read_recipe(name).get("model") or {}).get("name", "")
        print(f"{name:32s} {model}")


def cmd_config(args: argparse.Namespace) -> None:
    from .config import dump_config
    from .validate import load_recipe

    print(dump_config(load_recipe(args.recipe, _split_overrides(args.overrides))), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitdistill",
        description="Train small vision transformers from teachers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (teacher or student) from a recipe")
    p.add_argument("recipe", help="packaged recipe name (see `vitdistill recipes`) or a .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=5e-4 data.root=/data/imagenet")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="auto",
        help="continue from <output>/checkpoint.pt (an error when there is none); --resume auto: continue when it exists, start otherwise",
    )
    p.add_argument("--budget", metavar="TIME", help="train as many steps as fit in TIME (e.g. 8m, 90s, 1h30m; = optim.budget)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 of a trained model")
    p.add_argument("checkpoint", help="run folder, model.safetensors, checkpoint.pt, timm export folder or model.onnx")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides (e.g. data.eval_limit=1000)")
    p.add_argument(
        "--data", help="digits, cifar10, cifar100, an ImageFolder folder/archive or a Hugging Face dataset folder (default: the run's data)"
    )
    p.add_argument("--split", help="split to evaluate (default: the run's eval split)")
    p.add_argument(
        "--ignore-class-names", action="store_true", help="evaluate even when the data's class names differ from the model's (by position)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="top-k classes of your own images under a run, a timm export or an ONNX export (CSV or JSON lines)",
        epilog="exit status: 0 when every image was predicted, 3 when some could not be read (one line each on stderr; "
        "the others are predicted), 2 on an error",
    )
    p.add_argument("model", metavar="RUN_OR_EXPORT", help="run folder, model.safetensors, checkpoint.pt, timm export folder or model.onnx")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGES",
        help="image files, folders (walked recursively), .tar/.tar.gz/.zip archives, "
        "or a Hugging Face dataset (saved DatasetDict or parquet folder; see --split)",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5, at most the number of classes)")
    p.add_argument(
        "--format", choices=["csv", "jsonl"], default="csv", help="csv: path,label_1,probability_1,...; jsonl: one JSON object a line"
    )
    p.add_argument("--output", metavar="FILE", help="write here (default: standard output)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--split", default="test", help="split of a Hugging Face dataset input (default test)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("demo", help="offline demo on the digits shipped with scikit-learn (CPU, < 3 min)")
    p.add_argument("--output", default="runs/demo", help="folder for the three runs (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("cache", help="write a teacher store: the teacher's top-k on every epoch's exact views")
    p.add_argument("recipe", help="a recipe with teacher.checkpoint (or name + weights) and store.path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. store.k=10 store.epochs=300")
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("labelmaps", help="write dense teacher label maps (token labeling): top-k per location of every image")
    p.add_argument("recipe", help="a recipe with teacher.checkpoint (or name + weights) and labelmaps.path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. labelmaps.k=5")
    p.set_defaults(fn=cmd_labelmaps)

    p = sub.add_parser("verify", help="recompute a sample of a teacher store's records; exit 1 on mismatch")
    p.add_argument("store", help="the store folder")
    p.add_argument("--samples", type=int, default=256, help="records recomputed per epoch")
    p.add_argument("--epochs", type=int, nargs="+", help="epochs to check (default: all complete)")
    p.add_argument("--teacher", help="the teacher export, if it moved since the store was written")
    p.add_argument("--tolerance", type=float, help="largest probability error accepted (default 2e-3 fp32, 5e-2 bf16)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="smallest top-1 agreement accepted")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("analyze", help="diagnostics of a trained ViT: token similarity, attention, loss landscape; plots + report")
    p.add_argument("checkpoint", help="run folder, model.safetensors or checkpoint.pt")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides")
    p.add_argument("--compare", metavar="OTHER", help="a second model, drawn on the same axes")
    p.add_argument("--output", default="runs/analysis", help="folder for analysis.json, the PNGs and report.md")
    p.add_argument("--data", help="digits, cifar10, cifar100, or an ImageFolder folder/archive (default: the run's data)")
    p.add_argument("--split", help="split to analyse (default: the run's eval split)")
    p.add_argument("--images", type=int, default=256, help="images for the token/attention statistics")
    p.add_argument("--landscape-images", type=int, default=256, help="images for the loss landscape (0: skip it)")
    p.add_argument("--landscape-steps", type=int, default=21, help="points of the 1-D landscape")
    p.add_argument("--landscape-grid", type=int, default=11, help="points per axis of the 2-D landscape (0: skip it)")
    p.add_argument("--landscape-span", type=float, default=1.0, help="directions are scaled over [-span, span]")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("bench", help="benchmarks (throughput)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = bench.add_parser("throughput", help="images/s: bare step vs vitdistill's data path vs a CPU DataLoader, one run")
    p.add_argument("--regimes", nargs="+", default=["cifar32", "imagenet224"], choices=["cifar32", "imagenet224"])
    p.add_argument("--data-cifar32", help="CIFAR-10 ImageFolder or archive (default: synthetic 32x32 JPEGs)")
    p.add_argument("--data-imagenet224", help="ImageFolder of full-size images (default: synthetic JPEGs, 320-500 px)")
    p.add_argument("--synthetic-images", type=int, default=2000, help="size of the synthetic stand-in datasets")
    p.add_argument("--batch-size", type=int, help="default: 1024 at 32x32, 256 at 224x224")
    p.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)), help="DataLoader workers of (d)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--compile", choices=["", "model", "augment", "both"], default="", help="torch.compile the student, the views, or both")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default=".cache/bench", help="decoded images, synthetic data, random teachers")
    p.add_argument("--student", help="replace the regime's student (timm name)")
    p.add_argument("--teacher", help="replace the regime's teacher (timm name)")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(fn=cmd_bench_throughput)

    p = sub.add_parser("export", help="the student of a run for timm (hub folder) or ONNX Runtime")
    p.add_argument("run", help="run folder (or a model.safetensors written by vitdistill)")
    p.add_argument("--format", choices=["timm", "onnx"], default="timm", help="timm: config.json + model.safetensors; onnx: model.onnx")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (model_ema.safetensors)")
    p.add_argument("--output", help="folder to write (default <run>/export/<format>[-ema])")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("compare", help="several runs side by side: top-1, parameters, time, speed; curves on shared axes")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--plot", metavar="PNG", help="draw their curves (loss, top-1, lr per epoch) on shared axes")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.set_defaults(fn=cmd_compare)

    p = bench.add_parser("gpu", help="every headline figure in one command that stops on time: throughput, teacher, students (budgeted)")
    p.add_argument("--data", help="CIFAR-10 ImageFolder folder or archive (not needed with --smoke or --stages decode)")
    p.add_argument("--budget", default="9m", help="total time, e.g. 9m (default), 540s")
    p.add_argument("--output", default="runs/bench-gpu", help="folder for the runs and the report")
    p.add_argument("--json", help="the report (default <output>/gpu.json; a Markdown table is written beside it)")
    p.add_argument("--smoke", action="store_true", help="the same stages at toy scale on the CPU (digits, tiny models)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compile",
        choices=["", "augment", "model", "both"],
        default="",
        help="torch.compile the views and/or the students of the training stages (default: eager; compiling costs part of a short budget)",
    )
    p.add_argument(
        "--throughput-compile", choices=["", "augment", "model", "both"], default="both", help="compile setting of the throughput stage"
    )
    p.add_argument("--stages", nargs="+", help="run only these stages (default: all but the optional 'feature' and 'decode')")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_bench_gpu)

    p = sub.add_parser("recipes", help="list the packaged recipes")
    p.set_defaults(fn=cmd_recipes)

    p = sub.add_parser("config", help="print a recipe after overrides and validation")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_config)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our recipe warnings as one line; everything else as Python prints it."""
    if issubclass(category, RecipeWarning):
        print(f"vitdistill: warning: {message}", file=sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    try:
        return _main(argv)
    except BrokenPipeError:
        # `vitdistill recipes | head -5`: the reader left; say nothing (as `ls | head` does).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (argparse alone stops at the first).
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if getattr(args, "resume", None) not in (None, "", "auto"):  # `--resume key=value`: an override after a bare --resume
        if "=" not in args.resume:
            parser.error(f"--resume takes nothing or 'auto', got {args.resume!r}")
        args.overrides, args.resume = [*args.overrides, args.resume], ""
    if extra:
        args.overrides = [*args.overrides, *extra]
    from .signals import Preempted, handle_signals, pending

    try:
        with handle_signals():
            code = args.fn(args)
    except UserError as err:
        print(f"vitdistill: error: {err}", file=sys.stderr)
        return 2
    except Exception:
        # Under torchrun a signal reaches every process; one blocked in a collective learns of it as
        # the collective's failure when another process has stopped first.
        if pending() is None:
            raise
        return report_preempted(Preempted(pending(), None, "while waiting for the other processes"), argv)
    except Preempted as stop:
        return report_preempted(stop, argv)
    except KeyboardInterrupt:
        print("vitdistill: interrupted", file=sys.stderr)
        return 130
    return code or 0


def report_preempted(stop, argv: list[str] | None) -> int:
    """The one line of a stopped command (from the first process only, under torchrun); its exit code."""
    if os.environ.get("RANK", "0") == "0":
        print(f"vitdistill: {preempted_line(stop, argv if argv is not None else sys.argv[1:])}", file=sys.stderr, flush=True)
    return stop.exit_code


def preempted_line(stop, argv: list[str]) -> str:
    """Which signal stopped the command, where its checkpoint is, and the command that continues."""
    if stop.checkpoint is None and stop.where is not None:
        return f"stopped by {stop.name} {stop.where}; run the same command again to continue (exit {stop.exit_code})"
    if stop.checkpoint is None:
        return f"stopped by {stop.name} before anything was saved; run the same command again to start over (exit {stop.exit_code})"
    import shlex

    words = list(argv)
    if words[:1] == ["train"]:  # train continues with --resume auto; cache and labelmaps continue by themselves
        if "--resume" in words:
            i = words.index("--resume")
            del words[i : i + (2 if i + 1 < len(words) and words[i + 1] == "auto" else 1)]
        words = [w for w in words if not w.startswith("--resume=")] + ["--resume", "auto"]
    command = shlex.join(["vitdistill", *words])
    return f"stopped by {stop.name} {stop.where}; checkpoint {stop.checkpoint}; continue with: {command} (exit {stop.exit_code})"


if __name__ == "__main__":
    sys.exit(main())
