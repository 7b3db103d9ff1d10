"""Progress bars (tqdm) that stay quiet when asked to and never break a non-interactive log."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """Bars on an interactive terminal; ``VITDISTILL_PROGRESS=1``/``0`` forces them on/off.

    Redirected logs get the per-epoch lines only (a bar in a file is a flood of carriage returns).
    """
    forced = os.environ.get("VITDISTILL_PROGRESS")
    if forced is not None:
        return forced != "0"
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True, **kwargs) -> Iterable[T]:
    """``tqdm(items)`` on stderr, or ``items`` unchanged when progress is off."""
    if not (enabled and progress_enabled()):
        return items
    return tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


class _Silent:
    """The parts of a tqdm bar the engine uses, doing nothing but printing lines."""

    total = 0

    def refresh(self) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def set_description_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(line: str) -> None:
        print(line, flush=True)


def progress_bar(total: int, initial: int = 0, desc: str = "", enabled: bool = True, unit: str = "step"):
    """A manual bar (``update``, ``set_postfix_str``, ``write``); silent when progress is off."""
    if not (enabled and progress_enabled()):
        return _Silent()
    bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, unit=unit, leave=False)
    bar.write = lambda line: tqdm.write(line, file=sys.stdout)
    return bar
