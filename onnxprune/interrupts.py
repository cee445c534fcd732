"""SIGINT, SIGTERM and SIGHUP stop a run the same way: an `Interrupted` exception unwinds the
pipeline, so every `finally` removes its temporary files and partial outputs, and the CLI exits
with 128 + the signal's number after one line on stderr."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (a KeyboardInterrupt, so `except Exception` lets it pass)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    """What the handler knows: whether a signal already fired, and whether raising is deferred."""

    def __init__(self) -> None:
        self.fired: int | None = None
        self.deferred = 0
        self.pending: int | None = None


_STATE = _State()


def _handler(signum: int, frame) -> None:
    if _STATE.fired is not None:  # cleanup after the first signal is under way: let it finish
        return
    if _STATE.deferred:
        _STATE.pending = _STATE.pending or signum
        return
    _STATE.fired = signum
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Inside, each handled signal raises `Interrupted` once; later signals are ignored while
    the run cleans up. The previous handlers come back afterwards. Outside the main thread
    (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    _STATE.fired, _STATE.pending, _STATE.deferred = None, None, 0
    for s in HANDLED:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STATE.fired, _STATE.pending, _STATE.deferred = None, None, 0


@contextmanager
def deferred() -> Iterator[None]:
    """A block that a handled signal does not cut in two (renaming a model and its weights into
    place): a signal that arrives inside raises `Interrupted` when the block ends."""
    _STATE.deferred += 1
    try:
        yield
    finally:
        _STATE.deferred -= 1
        if not _STATE.deferred and _STATE.pending is not None and _STATE.fired is None:
            signum, _STATE.pending = _STATE.pending, None
            _STATE.fired = signum
            raise Interrupted(signum)


def interrupted_signal(exc: KeyboardInterrupt) -> Interrupted:
    """The `Interrupted` for any KeyboardInterrupt (a plain one is SIGINT's)."""
    return exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
