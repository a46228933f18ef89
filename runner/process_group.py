"""Stopping a child's whole process group: signal, wait until it is gone, escalate.

A guest (vng, virtme-run, QEMU), a bisect step or a build leaves grandchildren
that outlive the direct child; only the group reaches them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from typing import Callable

from runner.errors import Interrupted


def exists(pgid: int) -> bool:
    """True while the group has any member, zombies included."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(pgid: int) -> bool:
    """True while any member of the group exists and is not a zombie; reaps our own child."""
    if not exists(pgid):
        return False
    # Reap our direct child if it already exited.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    # Orphans (QEMU under virtme-run, the stand-in's grandchildren) are reaped
    # by PID 1, which in containers can take a second or more: a group of
    # zombies is already dead and must not cost the kill its grace period.
    return any(state != "Z" for state in _member_states(pgid))


def _member_states(pgid: int) -> list[str]:
    """The process states (R, S, Z, ...) of the group's members, from /proc."""
    states = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parens.
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            states.append(fields[0].decode())
    return states


def stop(pgid: int, steps: Sequence[tuple[signal.Signals, float]], gone: Callable[[], bool],
         poll: float = 0.1, on_interrupt: Callable[[], None] | None = None) -> bool:
    """Send each (signal, seconds) step to the group until gone() says it ended; True once it has.

    gone() is the caller's: whether zombies or a surviving grandchild still
    count differs between a guest and a bisect step.  With on_interrupt, Ctrl-C
    while waiting calls it and moves on to the next signal instead of
    abandoning a half-stopped group.
    """
    for sig, seconds in steps:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if gone():
                    return True
                time.sleep(poll)
        except (KeyboardInterrupt, Interrupted):
            if on_interrupt is None:
                raise
            on_interrupt()
        if gone():
            return True
    return False
