"""vitdistill: train small, fast vision transformers from teachers.

Python API::

    from vitdistill import load_recipe, train, evaluate_checkpoint, predict
    cfg = load_recipe("deit_tiny_distilled_cifar10", ["optim.epochs=10"])
    result = train(cfg)
    print(evaluate_checkpoint(result.output))
    for row in predict(result.output, ["photos/"], top_k=3):   # also a timm or ONNX export
        print(row.path, row.labels, row.probabilities)
"""

try:
    from .config import RunConfig, list_recipes
    from .errors import ConfigError, UserError
    from .inference import Prediction, predict
    from .runner import RunResult, evaluate_checkpoint, train
    from .validate import load_recipe
except KeyboardInterrupt:  # Ctrl-C during the (seconds-long: torch, timm) imports: one line, not a traceback
    import sys

    print("vitdistill: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Prediction",
    "RunConfig",
    "RunResult",
    "UserError",
    "evaluate_checkpoint",
    "list_recipes",
    "load_recipe",
    "predict",
    "train",
]
