"""kmemleak reports as data: which leaked objects were allocated through BPF local storage.

`--debug-kernel` reads /sys/kernel/debug/kmemleak after the suite.  Only a
leak whose allocation backtrace passes through the code under test (sk, task,
inode or cgroup local storage: bpf_local_storage_*, bpf_sk_storage_*,
bpf_selem_*, ...) fails the run; anything else is a leak somewhere else in
the kernel (boot-time noise, a driver) and is reported without failing it.

Parses the debugfs format of 6.1 ("  backtrace:" and "    [<hash>] sym+off/len")
and of later kernels ("  backtrace (crc 1a2b3c4d):"), syzbot's symbolized
frames ("sym+off/len file.c:12", "sym file.h:42 [inline]"), and the same
lines in dmesg with printk stamps (kmemleak.verbose=1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# The start of every report in the file, with or without the "kmemleak: "
# and printk prefixes of its dmesg form.
_OBJECT = re.compile(r"unreferenced object (0x[0-9a-fA-F]+) \(size (\d+)\):")
_COMM = re.compile(r'^comm "(.*)", pid (-?\d+)')
_FRAME = re.compile(r"^\[<([0-9a-fA-Fx]+)>\]\s+(\S+)")
_PREFIX = re.compile(r"^(?:\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])?\s*)?(?:kmemleak:\s*)?")

# Function names of BPF local storage: the shared code (bpf_local_storage_*,
# bpf_selem_*) and its users (sk storage including the fd ops, clone, diag and
# iterator; task, inode and cgroup storage).  Not the older cgroup storage
# (bpf_cgroup_storage_*, cgroup_storage_*, bpf_get_local_storage): other code.
LOCAL_STORAGE_FUNCTION = re.compile(
    r"^_*(?:bpf_local_storage|bpf_selem|selem_|bpf_sk_storage|bpf_fd_sk_storage|"
    r"bpf_iter_\w*sk_storage|bpf_task_storage|bpf_pid_task_storage|task_storage|"
    r"bpf_inode_storage|bpf_fd_inode_storage|inode_storage|bpf_cgrp_storage|sk_storage)"
)


@dataclass(frozen=True)
class Leak:
    """One unreferenced object: where it is, who allocated it, and the allocation backtrace."""

    address: str
    size: int
    comm: str | None
    pid: int | None
    frames: tuple[str, ...]
    text: str

    @property
    def functions(self) -> list[str]:
        """The function of each backtrace frame ("bpf_selem_alloc" of "bpf_selem_alloc+0x5a/0x1c0")."""
        return [frame.split("+", 1)[0] for frame in self.frames]

    def local_storage_frames(self) -> list[str]:
        """The frames that are BPF local storage code (empty: the leak is not ours)."""
        return [frame for frame, function in zip(self.frames, self.functions)
                if LOCAL_STORAGE_FUNCTION.match(function)]

    @property
    def from_local_storage(self) -> bool:
        return bool(self.local_storage_frames())

    def headline(self) -> str:
        """One line: size, allocating task and the first frames below the allocator."""
        who = f' by "{self.comm}" pid {self.pid}' if self.comm is not None else ""
        chain = " <- ".join(self.functions[:4]) or "no backtrace"
        return f"{self.size} bytes at {self.address}{who}: {chain}"


def _strip(line: str) -> str:
    return _PREFIX.sub("", line.replace("\r", "").strip(), count=1)


def parse_report(text: str) -> list[Leak]:
    """Every object of a kmemleak report, in order; lines outside an object are ignored."""
    leaks: list[Leak] = []
    current: dict | None = None

    def finish() -> None:
        if current is not None:
            leaks.append(Leak(current["address"], current["size"], current["comm"],
                              current["pid"], tuple(current["frames"]),
                              "\n".join(current["lines"])))

    for raw in text.splitlines():
        line = _strip(raw)
        start = _OBJECT.search(line)
        if start:
            finish()
            current = {"address": start.group(1), "size": int(start.group(2)), "comm": None,
                       "pid": None, "frames": [], "lines": [raw.rstrip()]}
            continue
        if current is None:
            continue
        comm = _COMM.match(line)
        frame = _FRAME.match(line)
        if comm:
            current["comm"], current["pid"] = comm.group(1), int(comm.group(2))
        elif frame:
            current["frames"].append(frame.group(2))
        elif not (line.startswith(("hex dump", "backtrace")) or _is_hex_dump(line)):
            # Something else (a prompt, a dmesg line): the object is over.
            finish()
            current = None
            continue
        current["lines"].append(raw.rstrip())
    finish()
    return leaks


_HEX_DUMP_LINE = re.compile(r"^(?:[0-9a-f]{2} ){1,16}")


def _is_hex_dump(line: str) -> bool:
    return bool(_HEX_DUMP_LINE.match(line))


def split_leaks(leaks: Sequence[Leak]) -> tuple[list[Leak], list[Leak]]:
    """(leaks through BPF local storage, every other leak)."""
    ours = [leak for leak in leaks if leak.from_local_storage]
    return ours, [leak for leak in leaks if not leak.from_local_storage]
