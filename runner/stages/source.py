"""Stage 1, the kernel source: a user's tree, a --base worktree of it, or Debian's 6.1 source.

The default tree is Debian's linux-source-6.1 package, fetched with apt into
the cache and unpacked once; a stamp file records which package version is
there so later runs reuse it without the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, cast

from runner import atomic_file
from runner.cache import Cache
from runner.errors import InfrastructureError, UsageError
from runner.progress import StatusLine, format_elapsed
from runner.stages import debian_archive

DEFAULT_PACKAGE = "linux-source-6.1"
DEFAULT_SUITE = "bookworm"


@dataclass(frozen=True)
class KernelSource:
    """A kernel tree ready to configure: where it is and how it was obtained."""

    path: Path
    is_git: bool
    origin: str
    version: str
    revision: str | None = None


def tree_version(path: Path) -> str:
    """The kernel version a tree's top Makefile declares, e.g. '6.1.192'."""
    fields = {}
    with open(path / "Makefile", encoding="utf-8", errors="replace") as makefile:
        for line in makefile:
            match = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)", line)
            if match:
                fields[match.group(1)] = match.group(2)
            if len(fields) == 4:
                break
    version = ".".join(fields[k] for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL") if fields.get(k))
    return version + fields.get("EXTRAVERSION", "")


def git(path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run git in a tree without paging or prompting; output captured as text."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    return subprocess.run(
        ["git", "-C", str(path), *args], env=env, capture_output=True,
        text=True, check=check,
    )


def is_git_toplevel(path: Path) -> bool:
    """True when path is the top of a git work tree (not merely inside one)."""
    if shutil.which("git") is None:
        return False
    proc = git(path, "rev-parse", "--show-toplevel", check=False)
    return proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == path.resolve()


def open_user_source(path: Path) -> KernelSource:
    """Validate --kernel-src: an existing directory that looks like a kernel tree."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UsageError(f"--kernel-src {path}: no such directory; pass the top of a kernel tree")
    missing = [name for name in ("Makefile", "Kconfig", "arch/x86") if not (path / name).exists()]
    if missing:
        raise UsageError(
            f"--kernel-src {path} is not a kernel tree (no {', '.join(missing)}); "
            "pass the top directory of a Linux source tree"
        )
    real = path.resolve()
    if (real / ".config").exists() or (real / "include" / "config").is_dir():
        # Kbuild refuses O= builds from a tree that was configured in place.
        raise UsageError(
            f"--kernel-src {real} has been configured or built in place; out-of-tree builds "
            "need a clean source tree: run 'make mrproper' there (it keeps your edits)"
        )
    if is_git_toplevel(real):
        head = git(real, "rev-parse", "HEAD", check=False).stdout.strip() or None
        return KernelSource(real, True, f"git tree {real}", tree_version(real), head)
    return KernelSource(real, False, f"tree {real}", tree_version(real))


def checkout_base(source: KernelSource, rev: str, cache: Cache) -> KernelSource:
    """--base REV: a detached worktree of the user's repo at REV, reused across runs.

    Reusing one worktree per (repo, REV) keeps file mtimes, so rebuilds stay
    incremental; the user's own checkout and index are never touched.
    """
    if not source.is_git:
        raise UsageError(f"--base needs a git tree, but {source.path} is not one")
    proc = git(source.path, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if proc.returncode != 0:
        raise UsageError(f"--base {rev}: no such commit in {source.path}; check the revision")
    sha = proc.stdout.strip()
    key = hashlib.sha256(f"{source.path}\0{rev}".encode()).hexdigest()[:12]
    worktree = cache.worktrees / f"{source.path.name}-{key}"
    cache.worktrees.mkdir(parents=True, exist_ok=True)
    git(source.path, "worktree", "prune", check=False)
    if is_git_toplevel(worktree):
        proc = git(worktree, "checkout", "--quiet", "--detach", "--force", sha, check=False)
    else:
        if worktree.exists():
            shutil.rmtree(worktree)
        proc = git(source.path, "worktree", "add", "--quiet", "--detach", "--force",
                   str(worktree), sha, check=False)
    if proc.returncode != 0:
        raise InfrastructureError(
            f"could not check out {rev} into the worktree {worktree}",
            details=proc.stderr.splitlines()[-3:],
        )
    return KernelSource(
        worktree, True, f"{source.path} at {rev} ({sha[:12]}), worktree {worktree}",
        tree_version(worktree), sha,
    )


# --- the default source: Debian's linux-source-6.1 --------------------------------------


def _stamp_path(cache: Cache) -> Path:
    return cache.sources / f"{DEFAULT_PACKAGE}.stamp.json"


def read_stamp(cache: Cache) -> dict | None:
    """The record of which package version is unpacked, or None if there is none."""
    try:
        return json.loads(_stamp_path(cache).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(cache: Cache, record: dict) -> None:
    atomic_file.write_text(_stamp_path(cache), json.dumps(record, indent=2) + "\n")


def upstream_version(debian_version: str) -> str:
    """'6.1.192-2' -> '6.1.192': the part a tree's Makefile can confirm."""
    return debian_version.split(":", 1)[-1].rsplit("-", 1)[0]


def ensure_default_source(cache: Cache, log: Callable[[str], None] = print) -> KernelSource:
    """Debian's linux-source-6.1 unpacked at <cache>/sources/linux-source-6.1 (once)."""
    tree = cache.sources / DEFAULT_PACKAGE
    stamp = read_stamp(cache)
    if stamp and (tree / "Makefile").exists():
        return _default_source(tree, stamp)

    channel = debian_archive.suite_channel(DEFAULT_SUITE, with_security=True)
    try:
        debian_archive.refresh_lists(cache, channel, log=log)
    except debian_archive.SuiteNotPublished as gone:
        raise UsageError(f"the default source needs {DEFAULT_PACKAGE}, but {gone.message}; "
                         "pass --kernel-src DIR with a kernel tree") from None
    version = debian_archive.package_field(cache, channel, DEFAULT_PACKAGE, "Version")
    if version is None:
        raise InfrastructureError(
            f"Debian {DEFAULT_SUITE} lists no {DEFAULT_PACKAGE}; pass --kernel-src DIR instead"
        )
    cache.sources.mkdir(parents=True, exist_ok=True)
    if (tree / "Makefile").exists() and tree_version(tree) == upstream_version(version):
        # A tree unpacked before stamps existed (or by hand from the same .deb):
        # the Makefile confirms the version, so adopt it instead of unpacking again.
        record = {"package": DEFAULT_PACKAGE, "version": version, "adopted": True,
                  "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_stamp(cache, record)
        log(f"source: adopted the existing {tree} as {DEFAULT_PACKAGE} {version}")
        return _default_source(tree, record)

    log(f"source: downloading {DEFAULT_PACKAGE} {version} with apt")
    deb = debian_archive.download(cache, channel, DEFAULT_PACKAGE, cache.downloads)
    started = time.monotonic()
    _unpack_source_deb(deb, tree)
    record = {"package": DEFAULT_PACKAGE, "version": version, "deb": deb.name,
              "deb_sha256": _sha256(deb),
              "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_stamp(cache, record)
    log(f"source: unpacked {DEFAULT_PACKAGE} {version} into {tree} in "
        f"{format_elapsed(time.monotonic() - started)}")
    return _default_source(tree, record)


def _default_source(tree: Path, stamp: dict) -> KernelSource:
    origin = f"Debian {stamp.get('package', DEFAULT_PACKAGE)} {stamp.get('version', '?')}"
    return KernelSource(tree.resolve(), False, origin, tree_version(tree))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _CountingReader:
    """Counts bytes read through it, so unpacking can show a percentage."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


def _unpack_source_deb(deb: Path, tree: Path) -> None:
    """Unpack linux-source-*.deb's inner tarball into tree, atomically via a temp dir."""
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=tree.parent) as tmp:
        tmp_path = Path(tmp)
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "deb")],
                              stderr=subprocess.PIPE, text=True, check=False)
        tarballs = sorted((tmp_path / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
        if proc.returncode != 0 or not tarballs:
            raise InfrastructureError(
                f"{deb} is not a usable linux-source package: {proc.stderr.strip()[-200:]}"
            )
        extract_tarball_with_progress(tarballs[0], tmp_path / "tree")
        os.remove(tarballs[0])
        tops = [p for p in (tmp_path / "tree").iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / "Makefile").exists():
            raise InfrastructureError(f"{tarballs[0].name} does not hold one kernel tree")
        if tree.exists():
            shutil.rmtree(tree)
        os.rename(tops[0], tree)


def extract_tarball_with_progress(tarball: Path, dest: Path) -> int:
    """Extract a (compressed) tarball into dest with a live percentage; return the file count."""
    dest.mkdir(parents=True, exist_ok=True)
    total = tarball.stat().st_size
    status = StatusLine()
    started = time.monotonic()
    count = 0
    # The 'tar' filter refuses absolute paths and links leaving dest, and keeps
    # exec bits (scripts/ needs them); Python versions without filters never
    # had the option.
    filter_kw: dict[str, Any] = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    with open(tarball, "rb") as raw:
        reader = _CountingReader(raw)
        # Stream mode ("r|") only ever calls read(), which the counter provides.
        with tarfile.open(fileobj=cast(BinaryIO, reader), mode="r|*") as archive:
            for member in archive:
                archive.extract(member, dest, **filter_kw)
                count += 1
                if count % 500 == 0:
                    status.update(
                        f"unpacking {tarball.name}: {100 * reader.count // max(total, 1)}% "
                        f"({count} files, {format_elapsed(time.monotonic() - started)})"
                    )
    status.finish(f"unpacked {tarball.name}: {count} files in "
                  f"{format_elapsed(time.monotonic() - started)}")
    return count
