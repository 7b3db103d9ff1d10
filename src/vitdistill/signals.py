"""Preemption: SIGTERM (what SLURM and Kubernetes send before killing a job), SIGUSR1 (SLURM's
``--signal=USR1@120``) and SIGINT (Ctrl-C) end a run cleanly.

Outside training (reading data, decoding, ``cache``, ``labelmaps``) a signal raises
:class:`Preempted` at once, so every ``finally`` runs: temporary files are removed and worker
pools shut down. Inside the training loop (:func:`deferred`) the signal is only recorded; the loop
finishes its step, writes a checkpoint and then raises :class:`Preempted` naming it. A second
signal while one is pending raises at once (a user pressing Ctrl-C twice means it).

The process exits with ``128 + signal number`` (130 SIGINT, 138 SIGUSR1, 143 SIGTERM), the code a
shell reports for a process the signal killed, so schedulers count the job as preempted.

A bottom module: nothing of vitdistill.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


class Preempted(KeyboardInterrupt):
    """The run was stopped by ``signum``; ``checkpoint`` is where it was saved (None: nothing was
    saved), ``where`` says at which position (e.g. ``epoch 2, step 17/40``)."""

    def __init__(self, signum: int, checkpoint: Path | None = None, where: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint, self.where = signum, checkpoint, where

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    owner: int | None = None  # the pid that installed the handlers (forked workers ignore signals)
    deferring = 0
    pending: int | None = None


def _handler(signum, frame) -> None:
    if os.getpid() != _State.owner:
        return  # a forked worker (decoding pool): its parent shuts it down
    if _State.deferring and _State.pending is None:
        _State.pending = signum
        return
    _State.pending = signum  # remembered: a collective this stop breaks in another process is explained by it
    raise Preempted(signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Inside the block, :data:`SIGNALS` raise :class:`Preempted` (or are deferred, see
    :func:`deferred`); the previous handlers are restored on leaving. Does nothing outside the
    main thread (Python delivers signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    owner = _State.owner
    _State.owner, _State.pending = os.getpid(), None
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        _State.owner = owner


@contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a first signal is only recorded (:func:`pending`); the loop stops at its
    next step boundary."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1


def pending() -> int | None:
    """The signal received (while deferring: not yet acted on), if any."""
    return _State.pending


def clear() -> None:
    _State.pending = None


def request(signum: int) -> None:
    """Record ``signum`` as if it had arrived (tests; another process's signal agreed on)."""
    _State.pending = signum
