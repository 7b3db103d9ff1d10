"""Plain-text helpers for what the commands print: durations and aligned tables.

A bottom module (no torch, nothing of vitdistill): the engine, the teacher-side writers, the
runner, the benchmarks and the CLI all print through it."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``1h02m03s``, ``2m03s`` or ``3s`` (rounded to the second)."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, a dashed rule under the headers."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
