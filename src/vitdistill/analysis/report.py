"""``report.md``: the key numbers of one or two models in a table, and the figures."""

from __future__ import annotations

from pathlib import Path

CAPTIONS = {
    "patch_similarity": "Patch token similarity per block: mean pairwise cosine of the patch tokens (1 = all patches alike, over-smoothing).",
    "attention_std": "Attention spread per block: standard deviation of each query's attention row (0 = uniform attention).",
    "attention_distance": "Mean attention distance per head (dots) and its head mean (line), in input pixels.",
    "head_similarity": "Head similarity per block: mean cosine between the attention maps of different heads (1 = redundant heads).",
    "attention_maps": "Mean attention maps per block (rows: queries, columns: keys; prefix tokens first).",
    "cls_dist_cosine": "Cosine similarity of the class and distillation tokens per block.",
    "landscape_1d": "Loss and top-1 along a filter-normalised random direction (Li et al. 2018).",
    "landscape_2d": "Loss on the plane of two filter-normalised random directions (x: alpha, y: beta).",
}


def _fmt(value, digits: int = 3, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def key_numbers(result: dict) -> dict[str, str]:
    """The table rows of one model: name -> formatted value."""
    layers = result.get("layers") or {}
    heads = result.get("heads") or {}

    def last(key):
        return (layers.get(key) or [None])[-1]

    return {
        "model": result["model"],
        "top-1 on the analysed images (%)": _fmt(result.get("top1"), 2),
        "cross-entropy": _fmt(result.get("loss"), 4),
        "patch cosine similarity, last block": _fmt(last("patch_cosine")),
        "mean attention distance, last block (px)": _fmt(last("attention_distance_mean"), 2),
        "head similarity, last block": _fmt(last("head_similarity")),
        "class/distillation token cosine, last block": _fmt(last("cls_dist_cosine")),
        "class/distillation logit cosine": _fmt(heads.get("logit_cosine")),
        "class/distillation head weight cosine": _fmt(heads.get("weight_cosine")),
    }


def write_report(analysis: dict, output: Path) -> Path:
    """Write ``output/report.md`` for ``analysis`` (the dict of ``analysis.json``)."""
    models = analysis["models"]
    labels = [m["label"] for m in models]
    rows = [key_numbers(m) for m in models]
    lines = [
        f"# Analysis: {' vs '.join(labels)}",
        "",
        (
            f"{analysis['images']} images of {analysis['data']}; landscape on {analysis['landscape_images']} of them "
            f"(directions seeded with {analysis['seed']}). All numbers are in `analysis.json`."
        ),
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for key in rows[0]:
        lines.append(f"| {key} | " + " | ".join(row[key] for row in rows) + " |")
    for m in models:
        if m.get("note"):
            lines += ["", f"*{m['label']}: {m['note']}.*"]
    for name, file in analysis["figures"].items():
        lines += ["", f"## {name.replace('_', ' ').capitalize()}", "", CAPTIONS.get(name, ""), "", f"![{name}]({file})"]
    path = Path(output) / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
