"""Stage 4, the build: an out-of-tree (O=) kernel build in a keyed cache directory.

The key separates source trees, series and fragment sets so two of them never
share (and thrash) one build directory, while edits to a patch or a fragment
stay in the same directory and rebuild incrementally.  ccache, when present,
is shared by every build directory (CCACHE_NOHASHDIR), so a new key still
compiles mostly from cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.cache import Cache
from runner.errors import BuildError, InfrastructureError
from runner.patches import Series
from runner.progress import StatusLine, format_elapsed

BZIMAGE = Path("arch/x86/boot/bzImage")


@dataclass(frozen=True)
class BuildDir:
    """A keyed build directory: the O= tree plus the runner's own state beside it."""

    root: Path
    key: str

    @property
    def obj(self) -> Path:
        """The O= directory make builds in."""
        return self.root / "obj"

    @property
    def config_work(self) -> Path:
        """Where virtme-configkernel generates a candidate .config, so obj/.config only changes when the result does."""
        return self.root / "config-gen"

    @property
    def patched_files_state(self) -> Path:
        """Content hash and built mtime of each patched file (see patches.reuse_built_mtimes)."""
        return self.root / "patched-files.json"

    @property
    def build_log(self) -> Path:
        """Full make output of the last build in this directory."""
        return self.root / "build.log"

    @property
    def config_log(self) -> Path:
        """Output of the last config generation."""
        return self.root / "config.log"

    @property
    def image(self) -> Path:
        """The bzImage a successful build leaves."""
        return self.obj / BZIMAGE


def build_key(
    source: Path, series: Series | None, fragments: Sequence[Path]
) -> tuple[str, dict[str, object]]:
    """Key from the source's realpath, the series' entry list and the fragments' file names.

    Where the series and fragments live is not in the key: a second checkout
    of the project (same source, same series) must find the build directory
    the first one built.  Patch and fragment *contents* are not in it either:
    editing a patch is the edit-and-test loop and must rebuild incrementally
    in place.  A shared directory is only ever a speed question: make, the
    config stamp and the no-op check all judge the actual contents.
    """
    description: dict[str, object] = {
        "source": str(Path(source).resolve()),
        "series_entries": series.listing() if series else None,
        "fragments": sorted(Path(f).name for f in fragments),
    }
    blob = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], description


def build_dir_for(
    cache: Cache, source: Path, series: Series | None, fragments: Sequence[Path]
) -> BuildDir:
    """The build directory for this (source, series, fragments), created with a key.json."""
    key, description = build_key(source, series, fragments)
    name = Path(source).resolve().name
    root = cache.builds / f"{name}-{key}"
    if not root.exists() and not root.is_symlink():
        _adopt_path_keyed_dir(cache, root, _path_key(source, series, fragments), name)
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "key.json"
    if not key_file.exists() or json.loads(key_file.read_text()) != description:
        key_file.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return BuildDir(root, key)


def _path_key(source: Path, series: Series | None, fragments: Sequence[Path]) -> str:
    """The key of earlier versions, which held the series' and fragments' paths."""
    description = {
        "source": str(Path(source).resolve()),
        "series": str(series.file) if series else None,
        "series_entries": series.listing() if series else "",
        "fragments": sorted(str(Path(f).resolve()) for f in fragments),
    }
    blob = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _adopt_path_keyed_dir(cache: Cache, root: Path, old_key: str, name: str) -> None:
    """Point the new key at a build directory made under the old key, instead of rebuilding.

    A symlink, not a rename: Kbuild and objtool record the O= directory's
    real path, and make resolves the link to that same path, so nothing is
    rebuilt.
    """
    old = cache.builds / f"{name}-{old_key}"
    if old.is_dir() and not old.is_symlink():
        root.parent.mkdir(parents=True, exist_ok=True)
        # Another run may have adopted it a moment ago: same link, fine.
        with contextlib.suppress(FileExistsError):
            root.symlink_to(old.name)


def make_command(
    source: Path, obj: Path, jobs: int, targets: Sequence[str], ccache: str | None,
    ccache_dir: Path,
) -> tuple[list[str], dict[str, str]]:
    """The make invocation and its extra environment: the one place it is spelled out."""
    command = ["make", "-C", str(source), f"O={obj}", f"-j{jobs}"]
    env: dict[str, str] = {}
    if ccache:
        command.append("CC=ccache gcc")
        # NOHASHDIR: objects compiled in another build directory are still hits.
        env.update(CCACHE_DIR=str(ccache_dir), CCACHE_NOHASHDIR="true")
    command += list(targets)
    return command, env


@dataclass(frozen=True)
class BuildResult:
    """The built kernel image and what the build cost."""

    image: Path
    seconds: float
    steps: int
    command: str


# Kbuild's quiet output: "  CC      net/core/sock.o", "  LD [M]  fs/x.ko", ...
_STEP = re.compile(r"^  ([A-Z][A-Z0-9_]*(?: \[M\])?)\s+(\S+)")
_ERROR = re.compile(r"(\berror\b|undefined reference|\*\*\*|No rule to make target)", re.IGNORECASE)


# gcc quotes the offending source under a diagnostic: "    3 |   code" and "      |   ^~~".
_SOURCE_QUOTE = re.compile(r"^\s*\d*\s\|")


def compiler_errors(log_text: str, limit: int = 20) -> list[str]:
    """The last compiler/linker/make errors of a build log, with gcc's source quote, for display."""
    lines = log_text.splitlines()
    picked: list[str] = []
    for index, line in enumerate(lines):
        if not _ERROR.search(line):
            continue
        picked.append(line.rstrip())
        for follow in lines[index + 1:index + 3]:
            if _SOURCE_QUOTE.match(follow):
                picked.append(follow.rstrip())
    # make's "*** [...] Error 1" cascade repeats the same failure per directory
    # level; keep the real diagnostics when there are any.
    diagnostics = [line for line in picked if "***" not in line]
    chosen = diagnostics or picked
    return chosen[-limit:]


def build_kernel(
    source: Path, build_dir: BuildDir, jobs: int, targets: Sequence[str], cache: Cache,
) -> BuildResult:
    """Run make with a live progress line; the full output goes to build.log."""
    ccache = shutil.which("ccache")
    command, extra_env = make_command(source, build_dir.obj, jobs, targets, ccache, cache.ccache)
    env = dict(os.environ, **extra_env)
    status = StatusLine()
    started = time.monotonic()
    steps = 0
    last_step = ""
    printable = " ".join(command)
    with open(build_dir.build_log, "w", errors="replace") as log:
        log.write(f"$ {printable}\n")
        log.flush()
        # Its own process group, so an interrupted run can stop make and every
        # compiler it started, not just the top make.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, text=True, errors="replace", bufsize=1,
                                start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                match = _STEP.match(line)
                if match:
                    steps += 1
                    last_step = f"{match.group(1)} {match.group(2)}"
                status.update(f"build: {format_elapsed(time.monotonic() - started)} "
                              f"{steps} steps  {last_step}"[:120])
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                _stop_process_group(proc)
    seconds = time.monotonic() - started
    ccache_note = " (ccache)" if ccache else ""
    if returncode != 0:
        status.finish(f"build: failed after {format_elapsed(seconds)}")
        text = build_dir.build_log.read_text(errors="replace")
        if "No space left on device" in text:
            raise InfrastructureError(
                f"the build ran out of disk space in {build_dir.root}; free space or move "
                "the cache with --cache-dir"
            )
        raise BuildError(
            f"kernel build failed (make exit {returncode}); full log: {build_dir.build_log}",
            details=compiler_errors(text),
        )
    status.finish(f"build: done in {format_elapsed(seconds)}, {steps} steps{ccache_note}")
    if not build_dir.image.exists():
        raise BuildError(f"make succeeded but {build_dir.image} is missing; see the build log")
    return BuildResult(build_dir.image, seconds, steps, printable)


def _stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM make's whole group (make cleans up half-written objects), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    # Compilers of the group may outlive make itself by a moment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def build_targets(needs_modules: bool) -> list[str]:
    """bzImage always; modules only when the config builds some."""
    return ["bzImage", "modules"] if needs_modules else ["bzImage"]
