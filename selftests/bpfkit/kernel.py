"""Which kernel is running: its upstream version and, where readable, its build config.

Feature expectations and known bugs are keyed by upstream release, so a distribution
kernel is identified by the upstream version it packages, not by its `uname -r`:
Debian's 5.10.0-32-amd64 is upstream 5.10.223, which its /proc/version names
("... #1 SMP Debian 5.10.223-1 (2024-08-10)").
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from dataclasses import dataclass

from . import kmsg

# Debian's package version sits after the build number ("#1 SMP PREEMPT_DYNAMIC Debian
# 6.1.176-1 (...)"); the compiler's own "(Debian 12.2.0-14)" comes before it and must
# not be mistaken for the kernel's.
_DEBIAN_VERSION = re.compile(r"#\d+\b.*?\bDebian (\d+\.\d+(?:\.\d+)?)(\S*)")
_RELEASE_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int]:
    """"6.1" -> (6, 1, 0), "6.1.192-3" -> (6, 1, 192); raises ValueError otherwise."""
    match = _RELEASE_VERSION.match(text.strip())
    if match is None:
        raise ValueError(f"not a kernel version: {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def format_version(version: tuple[int, int, int]) -> str:
    """(6, 1, 192) -> "6.1.192"."""
    return ".".join(str(part) for part in version)


@dataclass(frozen=True)
class KernelIdentity:
    """The running kernel: uname release, upstream version, and Debian's package version if any."""

    release: str
    version: tuple[int, int, int]
    debian_version: str | None = None

    @property
    def branch(self) -> tuple[int, int]:
        """The stable branch, e.g. (6, 1)."""
        return self.version[:2]

    def describe(self) -> str:
        """e.g. "5.10.223 (Debian 5.10.223-1, 5.10.0-32-amd64)" or "6.1.192"."""
        extra = []
        if self.debian_version:
            extra.append(f"Debian {self.debian_version}")
        if format_version(self.version) != self.release:
            extra.append(self.release)
        suffix = f" ({', '.join(extra)})" if extra else ""
        return format_version(self.version) + suffix


def identify(release: str, proc_version: str) -> KernelIdentity:
    """The identity from `uname -r` and the text of /proc/version."""
    debian = _DEBIAN_VERSION.search(proc_version)
    if debian is not None:
        return KernelIdentity(release, parse_version(debian.group(1)),
                              debian.group(1) + debian.group(2))
    return KernelIdentity(release, parse_version(release))


@functools.cache
def running() -> KernelIdentity:
    """The identity of the kernel this process runs on."""
    try:
        with open("/proc/version") as f:
            proc_version = f.read()
    except OSError:
        proc_version = ""
    return identify(os.uname().release, proc_version)


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_FOO=y lines into {"CONFIG_FOO": "y"}; "# CONFIG_FOO is not set" into "n"."""
    config = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            config[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[2:-len(" is not set")]] = "n"
    return config


@functools.cache
def config() -> dict[str, str] | None:
    """The running kernel's build config (/proc/config.gz, /boot/config-RELEASE), None if unreadable."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return parse_config(f.read())
    except OSError:
        pass
    try:
        with open(f"/boot/config-{os.uname().release}") as f:
            return parse_config(f.read())
    except OSError:
        return None


_HEAP_INIT = re.compile(r"mem auto-init:.*\bheap alloc:(on|off)")
_CMDLINE_INIT = re.compile(r"(?:^|\s)init_on_alloc=(\S+)")


def parse_heap_init_on_alloc(cmdline: str, boot_log: str) -> bool | None:
    """Whether allocations are zeroed (init_on_alloc): the command line wins, then the boot log."""
    match = _CMDLINE_INIT.search(cmdline)
    if match is not None:
        return match.group(1).lower() in ("1", "y", "yes", "on", "true")
    match = _HEAP_INIT.search(boot_log)
    if match is not None:
        return match.group(1) == "on"
    return None


@functools.cache
def heap_init_on_alloc() -> bool | None:
    """init_on_alloc of the running kernel; None when neither /proc/cmdline nor the log tell."""
    try:
        with open("/proc/cmdline") as f:
            cmdline = f.read()
    except OSError:
        cmdline = ""
    try:
        with kmsg.KernelLog(from_start=True) as log:
            boot_log = log.read_new()
    except OSError:  # not root: no kernel log to read
        boot_log = ""
    return parse_heap_init_on_alloc(cmdline, boot_log)
