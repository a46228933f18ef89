"""Files replaced whole or not at all: no reader, and no run killed mid-write, sees half of one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_text(path: Path, text: str) -> Path:
    """Write text to path through a temporary file beside it and an atomic rename.

    The temporary file is this process's own, so two runs writing the same file
    (a cache memo) cannot interleave; it is removed again if the write fails.
    """
    return write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> Path:
    """write_text for bytes."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
