"""Runs on the SSH target (as root), never on the host: unpack, run pytest, collect the kernel log.

runner.targets.remote copies this file next to a bundle (the suite, plus pytest when the
target lacks it) and starts it with one command, so a run costs a single remote
shell.  Standard library only, Python 3.9+: it runs with whatever python3 the
target has.

The host's only way to stop a run is closing our stdin (ending the SSH channel
does the same), so a watchdog thread kills pytest's process group when stdin
reaches EOF; a deadline from the host is a backstop should that never come.
The kernel log is read from /dev/kmsg by position: the descriptor is opened
and moved to the end before pytest starts, so everything read afterwards was
logged during the run, even if the marker record itself was overwritten.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback

BUNDLE = "bundle.tar.gz"
STATUS = "status.json"
KERNEL_LOG = "kernel.log"
SITE_ZIP = "site-packages.zip"
# What the host pulls back; everything else in the work directory is removed here.
RESULT_FILES = ("junit.xml", STATUS, KERNEL_LOG)

_RECORD_BUFFER = 16384
_LOG_KERN = 0
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
# Exit status when the driver itself could not run pytest (pytest uses 0-5).
DRIVER_FAILED = 255
KILL_GRACE_SECONDS = 5.0


def unpack(bundle: str, workdir: str) -> list:
    """Extract the bundle into workdir, refusing members that would land outside it."""
    top = set()
    root = os.path.realpath(workdir)
    with tarfile.open(bundle, "r:gz") as archive:
        members = archive.getmembers()
        for member in members:
            target = os.path.realpath(os.path.join(root, member.name))
            if not (member.isfile() or member.isdir()) or not target.startswith(root + os.sep):
                raise ValueError(f"refusing bundle member {member.name!r}")
            top.add(member.name.split("/", 1)[0])
        if hasattr(tarfile, "data_filter"):  # 3.12+ (and backports) warn without a filter
            archive.extractall(root, members=members, filter="data")
        else:
            archive.extractall(root, members=members)
    return sorted(top)


def format_record(record: bytes) -> str | None:
    """One /dev/kmsg record as dmesg-style lines; None for records user space wrote."""
    header, _, body = record.partition(b";")
    fields = header.split(b",")
    if len(fields) < 3:
        return None
    prival, usec = int(fields[0]), int(fields[2])
    if prival >> 3 != _LOG_KERN:
        return None
    message = body.split(b"\n", 1)[0]
    text = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), message).decode("utf-8", "replace")
    stamp = f"[{usec // 1000000:5d}.{usec % 1000000:06d}] "
    return "\n".join(stamp + line for line in text.split("\n"))


class KernelLogSince:
    """The kernel's records from the moment of construction on (kernel facility only)."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.lost = 0

    def mark(self, text: str) -> None:
        """A line in the target's own dmesg, so a human can find where the run began."""
        os.write(self.fd, f"<5>{text}\n".encode())

    def read(self) -> str:
        """Everything logged since construction, as dmesg-style text; counts lost records."""
        lines, next_seq = [], None
        while True:
            try:
                record = os.read(self.fd, _RECORD_BUFFER)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno == errno.EPIPE:
                    # Overwritten before we read it; the gap in sequence numbers
                    # counts the loss from here on.
                    if next_seq is None:
                        self.lost += 1
                    continue
                raise
            if not record:
                break
            sequence = int(record.split(b",", 2)[1])
            if next_seq is not None and sequence > next_seq:
                self.lost += sequence - next_seq
            next_seq = sequence + 1
            text = format_record(record)
            if text is not None:
                lines.append(text)
        return "\n".join(lines) + ("\n" if lines else "")


def _kill_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(KILL_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def run_pytest(workdir: str, pytest_args: list, pythonpath: str | None,
               deadline: float) -> tuple:
    """pytest in its own process group; (exit status, why it was stopped or None)."""
    # The suite needs pytest alone.  Plugins installed on the target (hypothesis,
    # benchmark, ...) would only cost start-up time (seconds on a slow target),
    # could change collection or leave files behind, and a pushed pytest must not
    # pick up plugins built for another one.
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    process = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=workdir,
                               env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    stopped = []

    def watch_stdin() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if process.poll() is None:
            stopped.append("the host ended the run")
            _kill_group(process)

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        status = process.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stopped.append("the driver's deadline passed")
        _kill_group(process)
        status = process.wait()
    return status, (stopped[0] if stopped else None)


def finish(workdir: str, unpacked: list) -> None:
    """Leave only the result files, owned by the login user when sudo ran us."""
    for name in unpacked + [BUNDLE, os.path.basename(__file__)]:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if uid and gid:
        for name in RESULT_FILES:
            path = os.path.join(workdir, name)
            if os.path.exists(path):
                os.chown(path, int(uid), int(gid))


def main(argv: list | None = None) -> int:
    """Unpack, mark the log, run pytest, collect the log, leave only results; pytest's status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--marker", required=True)
    parser.add_argument("--deadline", type=float, required=True, metavar="SECONDS")
    parser.add_argument("--pushed-pytest", action="store_true")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    workdir = os.path.realpath(args.workdir)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    deadline = time.monotonic() + args.deadline
    status: dict = {"pytest_exit": None, "release": os.uname().release, "kernel_log_error": None,
                    "kernel_log_lost": 0, "stopped": None, "driver_error": None}
    unpacked: list = []
    exit_status = DRIVER_FAILED
    try:
        unpacked = unpack(os.path.join(workdir, BUNDLE), workdir)
        kernel_log = None
        try:
            kernel_log = KernelLogSince()
            kernel_log.mark(f"sk-storage-selftests: run {args.marker} starts")
        except OSError as error:
            status["kernel_log_error"] = f"/dev/kmsg: {error.strerror}"
        pythonpath = os.path.join(workdir, SITE_ZIP) if args.pushed_pytest else None
        sys.stdout.flush()
        exit_status, status["stopped"] = run_pytest(workdir, pytest_args, pythonpath, deadline)
        status["pytest_exit"] = exit_status
        if kernel_log is not None:
            with open(os.path.join(workdir, KERNEL_LOG), "w") as out:
                out.write(kernel_log.read())
            status["kernel_log_lost"] = kernel_log.lost
    # Whatever breaks, the host must learn it from status.json, with the trace in the log.
    except Exception as error:  # noqa: BLE001
        status["driver_error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc(file=sys.stdout)
        exit_status = DRIVER_FAILED
    finally:
        # Written whole and renamed into place, so whoever sees status.json
        # (the host, a test watching the directory) reads all of it.
        partial = os.path.join(workdir, STATUS + ".partial")
        with open(partial, "w") as out:
            json.dump(status, out)
        os.replace(partial, os.path.join(workdir, STATUS))
        finish(workdir, unpacked)
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
