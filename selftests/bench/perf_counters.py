"""Hardware counters around the benchmark's measured phase, through perf_event_open(2).

The README explains the commit's 0.43 ratio (sk storage vs a hash map) by cache
misses on the chain socket -> storage -> cache slot -> element.  Counting cache
misses and cycles per packet for both variants backs that with a measurement
where the machine allows it.  The counters follow this process (the sender:
cgroup egress programs run in its context) in user and kernel mode, so they
need root or perf_event_paranoid <= 1; a VM without a virtual PMU (QEMU TCG,
many cloud guests) has no hardware events at all.  Each event that cannot be
opened is reported with its errno, never replaced by a guess; task-clock, a
software event, is always asked for too, so the mechanism itself is checked.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
# (name, type, config)
EVENTS = (
    ("cycles", PERF_TYPE_HARDWARE, 0),
    ("instructions", PERF_TYPE_HARDWARE, 1),
    ("cache_references", PERF_TYPE_HARDWARE, 2),
    ("cache_misses", PERF_TYPE_HARDWARE, 3),
    ("task_clock_ns", PERF_TYPE_SOFTWARE, 1),
)
ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5; older kernels take it while the tail is zero
FLAG_DISABLED = 1 << 0
FLAG_INHERIT = 1 << 1
FLAG_EXCLUDE_HV = 1 << 6
IOC_ENABLE, IOC_DISABLE, IOC_RESET = 0x2400, 0x2401, 0x2403
SYSCALL_NUMBERS = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331, "riscv64": 241}

_libc = ctypes.CDLL(None, use_errno=True)


def _attr(event_type: int, config: int) -> bytes:
    """struct perf_event_attr: counting (no sampling), disabled until enabled, children too."""
    head = struct.pack("=IIQQQQQ", event_type, ATTR_SIZE, config, 0, 0, 0,
                       FLAG_DISABLED | FLAG_INHERIT | FLAG_EXCLUDE_HV)
    return head + bytes(ATTR_SIZE - len(head))


def open_event(event_type: int, config: int) -> int:
    """perf_event_open for this process on any CPU; OSError with the kernel's errno."""
    number = SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"perf_event_open's number on {platform.machine()} is unknown")
    attr = ctypes.create_string_buffer(_attr(event_type, config), ATTR_SIZE)
    fd = _libc.syscall(number, attr, 0, -1, -1, 0)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


@dataclass
class Counts:
    """Counts of the events that opened; why each of the others did not."""

    values: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


@contextmanager
def counting() -> Iterator[Counts]:
    """Count EVENTS over the block; the result is filled in when the block ends."""
    counts = Counts()
    fds: dict[str, int] = {}
    for name, event_type, config in EVENTS:
        try:
            fds[name] = open_event(event_type, config)
        except OSError as err:
            why = f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror}"
            if err.errno in (errno.EACCES, errno.EPERM):
                why += " (kernel-mode counts need root or kernel.perf_event_paranoid <= 1)"
            counts.unavailable[name] = why
    try:
        for fd in fds.values():
            fcntl.ioctl(fd, IOC_RESET, 0)
            fcntl.ioctl(fd, IOC_ENABLE, 0)
        yield counts
        for fd in fds.values():
            fcntl.ioctl(fd, IOC_DISABLE, 0)
        for name, fd in fds.items():
            counts.values[name] = struct.unpack("=Q", os.read(fd, 8))[0]
    finally:
        for fd in fds.values():
            os.close(fd)
