"""cgroup v2 for attaching cgroup_skb programs: find or mount the hierarchy, make a child, join it.

A program attached to a private child cgroup only sees the traffic of processes the test
moved there, so the suite never observes or disturbs the rest of the system's sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

MOUNTS = "/proc/self/mounts"


def find_cgroup2_mount(mounts_path: str = MOUNTS) -> str | None:
    """Mount point of an existing cgroup2 hierarchy, or None."""
    with open(mounts_path) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                # /proc/mounts escapes spaces and friends as octal.
                return fields[1].encode().decode("unicode_escape")
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def _mount_cgroup2(target: str) -> None:
    if _libc.mount(b"cgroup2", target.encode(), b"cgroup2", ctypes.c_ulong(0), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount cgroup2 on {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot unmount {target}: {os.strerror(err)}")


@contextlib.contextmanager
def cgroup2_root() -> Iterator[str]:
    """The cgroup2 mount point; when there is none, one mounted for the block and removed after."""
    existing = find_cgroup2_mount()
    if existing is not None:
        yield existing
        return
    target = tempfile.mkdtemp(prefix="bpfkit-cgroup2-")
    try:
        _mount_cgroup2(target)
        try:
            yield target
        finally:
            _umount(target)
    finally:
        os.rmdir(target)


def cgroup_of_process(root: str, pid: str = "self") -> str:
    """Directory of the cgroup2 group a process belongs to (the "0::" line of /proc/PID/cgroup)."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(root, line[3:].strip().lstrip("/"))
    raise LookupError(f"process {pid} is in no cgroup v2 group")


def move_process(cgroup_dir: str, pid: int = 0) -> None:
    """Move a whole process (0: the caller, all its threads) into the cgroup."""
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(pid))


@dataclass(frozen=True)
class Cgroup:
    """A cgroup2 directory under the hierarchy mounted at `root`; `open()` gives the attach fd."""

    root: str
    path: str

    def open(self) -> int:
        """A new O_RDONLY directory fd on the cgroup; the caller closes it."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)


def _rmdir_when_empty(path: str, timeout: float = 5.0) -> None:
    # A cgroup stays busy briefly after its last process left while the kernel drains it.
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def temporary_cgroup(prefix: str = "bpfkit") -> Iterator[Cgroup]:
    """A fresh child cgroup under the cgroup2 root, removed after the block."""
    with cgroup2_root() as root:
        path = tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root)
        try:
            yield Cgroup(root, path)
        finally:
            _rmdir_when_empty(path)


@contextlib.contextmanager
def joined(cgroup: Cgroup) -> Iterator[None]:
    """Run the block with the current process inside `cgroup`, then move it back where it was."""
    original = cgroup_of_process(cgroup.root)
    move_process(cgroup.path)
    try:
        yield
    finally:
        move_process(original)
