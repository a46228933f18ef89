"""A status line for long steps (unpacking, building): live on a terminal, sparse in CI logs.

A 20-minute build must show that it is alive without flooding a CI log
with thousands of lines.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_elapsed(seconds: float) -> str:
    """mm:ss (or h:mm:ss), the form every progress line uses."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class StatusLine:
    """Rewrites one line in place on a TTY; elsewhere prints at most every `interval` s."""

    def __init__(self, stream: TextIO | None = None, interval: float = 30.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = 0.5 if self.tty else interval
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        """Show text now if the throttle allows (or force), else drop it."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            padding = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * padding)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, text: str) -> None:
        """Replace the live line with a final one and move on."""
        if self.tty:
            padding = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * padding + "\n")
        else:
            self.stream.write(text + "\n")
        self._width = 0
        self.stream.flush()
