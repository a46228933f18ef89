"""Missing tools and paths the guest cannot see are found before any work starts.

A new user should learn in one message everything to install, not discover
one missing tool twenty minutes into a build, and a checkout the guest
cannot see should be refused at once, not reported as a kernel crash later.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runner.errors import UsageError

# Tools like depmod live in sbin, which an ordinary user's PATH often lacks.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    """Locate a command: beside the running Python (its venv), then PATH, then sbin dirs."""
    venv_bin = os.path.dirname(sys.executable)
    candidate = os.path.join(venv_bin, name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


@dataclass(frozen=True)
class Requirement:
    """Something the run needs: a command, or a file (a header); and what provides it."""

    name: str
    command: str | None = None
    files: Sequence[str] = ()
    apt: str | None = None
    pip: str | None = None


BUILD_TOOLS = (
    Requirement("make", command="make", apt="make"),
    Requirement("gcc", command="gcc", apt="gcc"),
    Requirement("flex", command="flex", apt="flex"),
    Requirement("bison", command="bison", apt="bison"),
    Requirement("bc", command="bc", apt="bc"),
    Requirement("pahole", command="pahole", apt="dwarves"),
    Requirement("libelf headers", files=("/usr/include/libelf.h", "/usr/include/gelf.h"),
                apt="libelf-dev"),
    Requirement("libssl headers", files=("/usr/include/openssl/opensslv.h",), apt="libssl-dev"),
    Requirement("virtme-configkernel", command="virtme-configkernel", pip="virtme-ng"),
)
PLAIN_TREE_TOOLS = (Requirement("patch", command="patch", apt="patch"),)
GIT_TOOLS = (Requirement("git", command="git", apt="git"),)
DEBIAN_ARCHIVE_TOOLS = (
    Requirement("apt-get", command="apt-get", apt="apt"),
    Requirement("dpkg-deb", command="dpkg-deb", apt="dpkg"),
    Requirement("Debian archive keyring",
                files=("/usr/share/keyrings/debian-archive-keyring.gpg",),
                apt="debian-archive-keyring"),
)
DISTRO_KERNEL_TOOLS = DEBIAN_ARCHIVE_TOOLS + (
    Requirement("depmod", command="depmod", apt="kmod"),
)
BOOT_TOOLS = (
    Requirement("qemu-system-x86_64", command="qemu-system-x86_64", apt="qemu-system-x86"),
    Requirement("vng", command="vng", pip="virtme-ng"),
    Requirement("virtme-run", command="virtme-run", pip="virtme-ng"),
    # virtme-ng builds an initramfs with busybox when the kernel needs modules early.
    Requirement("busybox", command="busybox", apt="busybox-static"),
)


def missing(
    requirements: Iterable[Requirement],
    which: Callable[[str], str | None] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> list[Requirement]:
    """The requirements not satisfied on this machine, in order, without duplicates."""
    which = which or find_tool
    result: list[Requirement] = []
    for req in requirements:
        if req in result:
            continue
        if req.command is not None and which(req.command) is None or req.files and not any(exists(f) for f in req.files):
            result.append(req)
    return result


def install_hint(absent: Sequence[Requirement], is_root: bool) -> str:
    """The command(s) that install everything absent: apt-get for system, pip for Python."""
    apt = sorted({r.apt for r in absent if r.apt})
    pip = sorted({r.pip for r in absent if r.pip})
    commands = []
    if apt:
        commands.append(("" if is_root else "sudo ") + "apt-get install " + " ".join(apt))
    if pip:
        commands.append("pip install " + " ".join(pip))
    return " && ".join(commands)


def check(requirements: Iterable[Requirement]) -> None:
    """Raise one UsageError naming every missing requirement and how to install them all."""
    absent = missing(requirements)
    if absent:
        names = ", ".join(r.name for r in absent)
        hint = install_hint(absent, is_root=os.geteuid() == 0)
        raise UsageError(f"missing: {names}; install with: {hint}")


# Directories virtme-ng's guest init mounts a fresh tmpfs over, hiding the
# host's content there from the guest: virtme-ng 1.42,
# virtme/guest/virtme-init (mount_sys_filesystems() for /var/..., /dev/shm;
# mount_kernel_filesystems() for /run), and the same list in the Rust
# virtme-ng-init used on native architectures.  /tmp is not among them.
GUEST_MASKED_DIRS = (
    "/var/log", "/var/tmp", "/var/spool/rsyslog", "/var/lib/portables", "/var/lib/machines",
    "/var/lib/private", "/var/cache", "/var/lib/apt", "/var/lib/snapd/cookie",
    "/var/lib/sudo", "/run", "/dev/shm",
)


def masked_in_guest(path: Path) -> str | None:
    """The masked directory `path` lies under (as given or with symlinks resolved), else None."""
    absolute = Path(os.path.abspath(path))
    for candidate in dict.fromkeys((absolute, Path(os.path.realpath(absolute)))):
        for masked in GUEST_MASKED_DIRS:
            if candidate == Path(masked) or Path(masked) in candidate.parents:
                return masked
    return None


@dataclass(frozen=True)
class GuestPath:
    """A host path the guest must see, what it is, and what to do when it is hidden."""

    what: str
    path: Path
    hint: str


def check_guest_visible(paths: Iterable[GuestPath]) -> None:
    """Raise a one-line UsageError for the first path the guest would not see."""
    for entry in paths:
        masked = masked_in_guest(entry.path)
        if masked:
            raise UsageError(
                f"{entry.what} {entry.path} is under {masked}, which virtme-ng's guest "
                f"covers with an empty tmpfs, so the guest would not see it; {entry.hint}")
