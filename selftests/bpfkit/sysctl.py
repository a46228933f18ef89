"""Read and temporarily change sysctls, always putting the old value back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def _path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def read(name: str) -> str:
    """Current value of a sysctl such as "net.core.optmem_max", stripped."""
    with open(_path(name)) as f:
        return f.read().strip()


def write(name: str, value: str | int) -> None:
    """Set a sysctl (needs root)."""
    with open(_path(name), "w") as f:
        f.write(str(value))


@contextlib.contextmanager
def temporarily(name: str, value: str | int) -> Iterator[str]:
    """Set a sysctl for the block and restore the previous value even if the block fails.

    Yields the previous value.
    """
    previous = read(name)
    write(name, value)
    try:
        yield previous
    finally:
        write(name, previous)


@contextlib.contextmanager
def at_least(name: str, minimum: int) -> Iterator[int]:
    """Raise an integer sysctl to `minimum` for the block if it is lower; restore it after.

    Yields the value in effect during the block.
    """
    current = int(read(name))
    if current >= minimum:
        yield current
        return
    with temporarily(name, minimum):
        yield minimum
