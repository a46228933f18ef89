"""An exclusive flock that says what it waits for: runs sharing a tree or a directory queue up.

flock dies with its process, so a killed run never leaves anything locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def exclusive(lock_file: Path, waiting: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on lock_file for the block; log `waiting` once if another holds it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
