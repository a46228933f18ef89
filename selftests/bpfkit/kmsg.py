"""Read what the kernel logs from now on, through /dev/kmsg.

The guard opens a KernelLog before a test and scans `read_new()` after it: only
records logged in between come back, whatever the ring buffer held before.
Records come back as dmesg-style text, one "[   12.345678] message" line per
line of a record, so the same splat catalogue reads them and console logs.
"""

from __future__ import annotations

import errno
import os
import re

# One record per read(); the kernel fails a read into a buffer too small for
# the record with EINVAL, and records (message plus dictionary) stay well
# under this.
_RECORD_BUFFER = 16384

# Facility 0 (LOG_KERN) can only come from the kernel itself: devkmsg_write()
# turns a user-space record claiming it into LOG_USER.
_LOG_KERN = 0

# /dev/kmsg escapes non-printable bytes and backslash as \xHH; a multi-line
# record (lockdep's chains) reaches us with its newlines as \x0a.
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _unescape(message: bytes) -> str:
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), message).decode(
        "utf-8", "replace")


def format_record(record: bytes, kernel_only: bool = True) -> str | None:
    """Turn one raw /dev/kmsg record into dmesg-style lines (None when filtered out)."""
    header, _, body = record.partition(b";")
    fields = header.split(b",")
    if len(fields) < 3:
        raise ValueError(f"malformed /dev/kmsg record: {record[:80]!r}")
    prival, timestamp_us = int(fields[0]), int(fields[2])
    if kernel_only and prival >> 3 != _LOG_KERN:
        return None
    # The message is the first line; lines after it that start with a space
    # are the record's dictionary (SUBSYSTEM=..., DEVICE=...), not log text.
    message = body.split(b"\n", 1)[0]
    stamp = f"[{timestamp_us // 1000000:5d}.{timestamp_us % 1000000:06d}] "
    return "\n".join(stamp + line for line in _unescape(message).split("\n"))


def _sequence(record: bytes) -> int:
    return int(record.split(b",", 2)[1])


class KernelLog:
    """The kernel log from the moment it is opened: `read_new()` returns what was logged since."""

    def __init__(self, path: str = "/dev/kmsg", kernel_only: bool = True,
                 from_start: bool = False) -> None:
        """Open the log at its end (or at its oldest record); OSError when unreadable (not root)."""
        self._kernel_only = kernel_only
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not from_start:
            try:
                os.lseek(self._fd, 0, os.SEEK_END)
            except OSError:
                os.close(self._fd)
                self._fd = None
                raise
        self._next_seq: int | None = None
        # Records the ring buffer overwrote before we read them: a splat may
        # have been among them, so a guard should not call such a log clean.
        self.lost = 0

    def read_new(self) -> str:
        """Text of the records logged since the last call (or since opening)."""
        if self._fd is None:
            raise ValueError("read_new() on a closed KernelLog")
        lines: list[str] = []
        while True:
            try:
                record = os.read(self._fd, _RECORD_BUFFER)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno == errno.EPIPE:
                    # Overwritten before we got to it; the next read resumes at
                    # the oldest record still held.  The sequence gap counts the
                    # loss, except before the first record, where there is none.
                    if self._next_seq is None:
                        self.lost += 1
                    continue
                raise
            if not record:
                break
            sequence = _sequence(record)
            if self._next_seq is not None and sequence > self._next_seq:
                self.lost += sequence - self._next_seq
            self._next_seq = sequence + 1
            text = format_record(record, self._kernel_only)
            if text is not None:
                lines.append(text)
        return "\n".join(lines) + ("\n" if lines else "")

    def close(self) -> None:
        """Release the descriptor; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> KernelLog:  # noqa: PYI034 - stdlib only, no typing.Self on 3.9
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
