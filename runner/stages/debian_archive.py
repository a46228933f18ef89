"""Fetch .debs from Debian's archive through a private apt configuration in the cache.

The host's apt setup is neither needed nor touched: every suite gets its own
sources.list, lists and archive cache under <cache>/apt/<name>, so this works
as an ordinary user, on any suite (bullseye ... sid) whatever the host runs,
and apt itself verifies each .deb against the suite's signed index.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runner.cache import Cache
from runner.errors import InfrastructureError, UsageError

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# Index files older than this are refreshed; a failed refresh falls back to
# the old ones so a cached kernel still boots offline.
LISTS_MAX_AGE_S = 24 * 3600


@dataclass(frozen=True)
class AptChannel:
    """A named set of sources.list lines with its own apt state directory."""

    name: str
    sources: tuple[str, ...]


def suite_channel(suite: str, with_security: bool = False) -> AptChannel:
    """The channel for one Debian suite (plus its security suite when asked)."""
    keyring = f"[signed-by={DEBIAN_KEYRING}]"
    lines = [f"deb {keyring} {MIRROR} {suite} main"]
    name = suite
    if with_security:
        lines.append(f"deb {keyring} {SECURITY_MIRROR} {suite}-security main")
        name = f"{suite}+security"
    return AptChannel(name, tuple(lines))


def apt_options(cache: Cache, channel: AptChannel) -> list[str]:
    """-o options that point apt at the channel's private state instead of /etc and /var."""
    base = cache.apt / channel.name
    return [
        "-o", f"Dir::Etc::SourceList={base / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State={base / 'state'}",
        "-o", f"Dir::State::status={base / 'state' / 'status'}",
        "-o", f"Dir::Cache={base / 'cache'}",
        # As root apt drops to the _apt user, which cannot write a private cache
        # under $HOME; as an ordinary user apt does not sandbox at all.
        "-o", "APT::Sandbox::User=root",
    ]


def _prepare_state(cache: Cache, channel: AptChannel) -> Path:
    base = cache.apt / channel.name
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    status = base / "state" / "status"
    if not status.exists():
        # An empty dpkg status: nothing counts as installed, so the candidate is
        # always the archive's newest version whatever the host has installed.
        status.write_text("")
    sources = base / "sources.list"
    text = "\n".join(channel.sources) + "\n"
    if not sources.exists() or sources.read_text() != text:
        sources.write_text(text)
    return base


class SuiteNotPublished(UsageError):
    """The archive no longer carries a suite (it moved to archive.debian.org or was renamed)."""

    def __init__(self, suite: str):
        super().__init__(f"Debian {suite} is no longer published on {MIRROR}")
        self.suite = suite


# apt's words for a suite whose Release file is gone (404), old and new apt alike.
_NO_RELEASE = re.compile(r"The repository '(\S+) (\S+) Release' (?:does not|no longer) "
                         r"ha(?:ve|s) a Release file")


def unpublished_suite(channel: AptChannel, apt_output: str) -> str | None:
    """The channel's main suite when apt-get update says its Release file is gone."""
    main = channel.sources[0].split("]", 1)[-1].split()
    mirror, suite = main[0], main[1]
    for match in _NO_RELEASE.finditer(apt_output):
        if match.group(1).rstrip("/") == mirror.rstrip("/") and match.group(2) == suite:
            return suite
    return None


def _run_apt(args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", LANG="C")
    return subprocess.run(
        list(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, check=False,
    )


def _lists_age(base: Path) -> float | None:
    lists = list((base / "state" / "lists").glob("*_Packages*"))
    if not lists:
        return None
    return time.time() - max(p.stat().st_mtime for p in lists)


def refresh_lists(
    cache: Cache, channel: AptChannel, log: Callable[[str], None] = print,
    max_age: float = LISTS_MAX_AGE_S,
) -> None:
    """Run a private `apt-get update` when the channel's index is missing or stale."""
    if not DEBIAN_KEYRING.exists():
        raise UsageError(
            f"{DEBIAN_KEYRING} is missing, so Debian's archive cannot be verified; "
            "install it with: sudo apt-get install debian-archive-keyring"
        )
    base = _prepare_state(cache, channel)
    age = _lists_age(base)
    if age is not None and age < max_age:
        return
    log(f"apt: refreshing the package index of {channel.name}")
    proc = _run_apt(["apt-get", *apt_options(cache, channel), "update"])
    failed = proc.returncode != 0 or re.search(r"^(E:|W: Failed)", proc.stdout, re.MULTILINE)
    gone = unpublished_suite(channel, proc.stdout) if failed else None
    if gone:
        # Not the network: an old index would only postpone the failure to the download.
        raise SuiteNotPublished(gone)
    if failed:
        if age is not None:
            log(f"apt: refresh of {channel.name} failed, using the index from "
                f"{age / 3600:.0f} h ago")
            return
        last = [line for line in proc.stdout.splitlines() if line.strip()][-3:]
        raise InfrastructureError(
            f"apt-get update for Debian {channel.name} failed; check the network "
            "connection to deb.debian.org",
            details=last,
        )


def package_field(cache: Cache, channel: AptChannel, package: str, field: str) -> str | None:
    """One control field (Version, Depends, ...) of the candidate version, None if unknown."""
    proc = _run_apt(
        ["apt-cache", *apt_options(cache, channel), "show", "--no-all-versions", package]
    )
    if proc.returncode != 0:
        return None
    match = re.search(rf"^{re.escape(field)}: (.*)$", proc.stdout, re.MULTILINE)
    return match.group(1).strip() if match else None


def download(cache: Cache, channel: AptChannel, package: str, dest: Path) -> Path:
    """`apt-get download` the candidate .deb of a package into dest; return its path."""
    version = package_field(cache, channel, package, "Version")
    if version is None:
        raise UsageError(f"Debian {channel.name} has no package {package}")
    dest.mkdir(parents=True, exist_ok=True)
    # apt names the file with the epoch colon escaped as %3a.
    arch = package_field(cache, channel, package, "Architecture") or "amd64"
    expected = dest / f"{package}_{version.replace(':', '%3a')}_{arch}.deb"
    if expected.exists():
        return expected
    # Download beside the destination and rename, so an interrupted download
    # never leaves a truncated .deb under the name a later run would trust.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        proc = _run_apt(
            ["apt-get", *apt_options(cache, channel), "download", package], cwd=Path(tmp)
        )
        fetched = Path(tmp) / expected.name
        if proc.returncode != 0 or not fetched.exists():
            last = [line for line in proc.stdout.splitlines() if line.strip()][-3:]
            raise InfrastructureError(
                f"apt-get download {package} from Debian {channel.name} failed; check the "
                "network connection to deb.debian.org",
                details=last,
            )
        os.replace(fetched, expected)
    return expected
