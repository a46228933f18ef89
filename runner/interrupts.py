"""Signals: SIGTERM unwinds like Ctrl-C, and tree restoration cannot be cut short.

Restoring the user's kernel tree runs in `finally` blocks; a CI job cancelled
with SIGTERM must run them too, and a second Ctrl-C must not interrupt a
restore halfway.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from runner.errors import Interrupted

_DEFERRED = {signal.SIGINT, signal.SIGTERM}


def _raise_interrupted(signum, frame):
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


def install_sigterm_handler() -> None:
    """Make SIGTERM (CI cancellation, `kill`) unwind the stack like Ctrl-C does."""
    signal.signal(signal.SIGTERM, _raise_interrupted)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends; they are delivered right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
