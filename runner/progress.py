"""A status line for long steps (unpacking, building): live on a terminal, sparse in CI logs.

A 20-minute build must show that it is alive without flooding a CI log
with thousands of lines; at the end, one line says where the time went.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

# summary.json's "timings" keys in pipeline order; sub-times name their stage.
STAGE_ORDER = ("source", "fetch", "patches", "config", "build", "guest")
SUB_TIMES = {"kernel_banner": ("guest", "kernel banner at")}


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


def format_timings(timings: Mapping[str, float]) -> str:
    """One line from summary.json's timings: each stage, its share of the total, the rest."""
    total = timings.get("total")
    stages = [k for k in STAGE_ORDER if k in timings]
    stages += sorted(k for k in timings if k not in STAGE_ORDER and k not in SUB_TIMES
                     and k != "total")
    parts = []
    for stage in stages:
        part = f"{stage} {timings[stage]:.1f} s"
        notes = [f"{label} {timings[sub]:.1f} s" for sub, (parent, label) in SUB_TIMES.items()
                 if parent == stage and sub in timings]
        if notes:
            part += f" ({', '.join(notes)})"
        parts.append(part)
    if total is not None:
        # Runner overhead between stages (preflight, judging, artifacts).
        other = total - sum(timings[k] for k in stages)
        if other >= 0.05:
            parts.append(f"other {other:.1f} s")
        parts.append(f"total {total:.1f} s")
    return "timings: " + (", ".join(parts) if parts else "none recorded")
