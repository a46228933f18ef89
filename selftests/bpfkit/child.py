"""Run a function in a forked child under a deadline, optionally without privileges.

Two things need a separate process: calls that could hang the kernel-side path they test
(a hang must fail one test, not wedge the suite), and calls made as an unprivileged user
(dropping privileges is one-way, so the test process itself must keep them). The child
reports its result back through a pipe as JSON, so only plain values cross.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
from typing import Any, Callable

NOBODY_UID = 65534
NOBODY_GID = 65534


# How long a killed child may take to exit before it is declared stuck in the kernel.
REAP_GRACE = 2.0


class ChildTimeout(Exception):
    """The child did not finish before its deadline (it has been killed)."""


class ChildStuckInKernel(ChildTimeout):
    """SIGKILL did not end the child: a CPU of this kernel is wedged (e.g. spinning with IRQs off)."""


class ChildFailed(Exception):
    """The child raised; the message carries its traceback."""


def drop_privileges(uid: int = NOBODY_UID, gid: int = NOBODY_GID) -> None:
    """Become uid/gid with no supplementary groups; the uid change clears every capability."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _child_main(write_fd: int, fn: Callable[[], Any], unprivileged: bool) -> None:
    try:
        if unprivileged:
            drop_privileges()
        payload = {"ok": True, "value": fn()}
    except BaseException:  # noqa: BLE001 - everything must reach the parent as a report
        payload = {"ok": False, "error": traceback.format_exc()}
    data = json.dumps(payload).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(write_fd, view):]


def _reaped(pid: int, grace: float) -> bool:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return True
        time.sleep(0.01)
    return False


class RunningChild:
    """A forked child computing fn(); `result()` collects its answer under a deadline."""

    def __init__(self, fn: Callable[[], Any], unprivileged: bool = False) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                _child_main(write_fd, fn, unprivileged)
            finally:
                os._exit(0)
        os.close(write_fd)
        self.pid = pid
        self._read_fd = read_fd

    def result(self, timeout: float) -> Any:
        """fn()'s JSON-able return value; ChildTimeout (child killed) past the deadline."""
        pid, read_fd = self.pid, self._read_fd
        chunks = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChildTimeout(f"child {pid} still running after {timeout:g} s")
                ready, _, _ = select.select([read_fd], [], [], remaining)
                if ready:
                    chunk = os.read(read_fd, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except ChildTimeout as timeout_error:
            os.kill(pid, signal.SIGKILL)
            if not _reaped(pid, REAP_GRACE):
                # A child spinning in the kernel with interrupts off cannot die; say so
                # rather than block the suite on it.
                raise ChildStuckInKernel(
                    f"{timeout_error}; SIGKILL did not end it (stuck in kernel)"
                ) from None
            raise
        else:
            os.waitpid(pid, 0)
        finally:
            os.close(read_fd)
        if not chunks:
            raise ChildFailed(f"child {pid} exited without reporting a result")
        payload = json.loads(b"".join(chunks))
        if not payload["ok"]:
            raise ChildFailed("child raised:\n" + payload["error"])
        return payload["value"]


def run_in_child(fn: Callable[[], Any], timeout: float, unprivileged: bool = False) -> Any:
    """fn() in a forked child; returns its JSON-able result, ChildTimeout past the deadline."""
    return RunningChild(fn, unprivileged).result(timeout)
