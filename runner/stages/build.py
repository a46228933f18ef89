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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner import process_group
from runner.cache import Cache
from runner.errors import BuildError, InfrastructureError
from runner.progress import StatusLine, format_elapsed
from runner.stages.patches import Series

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

    @property
    def built_state(self) -> Path:
        """What the last successful make saw and left (see unchanged_since_last_build)."""
        return self.root / "built-state.json"


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
    # make was not run: nothing it reads had changed since it last succeeded.
    skipped: bool = False


# --- skipping a no-op make ---------------------------------------------------------------
#
# A make that has nothing to do still costs 8-30 s on a 2-core machine (it
# re-reads thousands of .cmd files and re-runs its generators).  Instead,
# the state of everything make reads is recorded after each successful
# build and compared before the next: every file of the source tree and of
# the O= tree by path, size and mtime (what make itself goes by, and any
# edit changes the mtime; a changed size or a moved-back mtime is caught too,
# which make would miss), the make command line, the environment variables
# Kbuild reads, and the toolchain binaries.  Anything different runs make.

# Environment Kbuild and its tools read (PATH: which compiler is found).
_KBUILD_ENV = re.compile(
    r"^(?:ARCH|SRCARCH|CROSS_COMPILE|LLVM|LLVM_IAS|CC|HOSTCC|HOSTCXX|LD|AS|AR|NM|OBJCOPY|"
    r"OBJDUMP|STRIP|PAHOLE|KCONFIG_\w+|KBUILD_\w+|KCFLAGS|KCPPFLAGS|KAFLAGS|KRUSTFLAGS|"
    r"LOCALVERSION|SOURCE_DATE_EPOCH|CCACHE_\w+|PATH|O|V|W|C|M|KERNELRELEASE)$"
)
# The host tools a kernel build runs; an upgrade of any of them rebuilds.
_TOOLCHAIN = ("make", "gcc", "cc", "ld", "as", "objcopy", "nm", "ar", "pahole", "ccache",
              "perl", "bison", "flex", "openssl")
# Not Kbuild's: virtme-ng stages the modules it boots with in the O= tree.
_NOT_BUILD_OUTPUT = frozenset({".virtme_mods"})


def _tree_state(digest, root: Path, skip_top: frozenset[str]) -> int:
    """Feed path, type, size and mtime of every file under root into digest; the file count.

    Directories themselves are left out: applying and removing a series
    touches their mtimes without changing anything make reads.
    """
    count = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for entry in entries:
            if directory == root and entry.name in skip_top:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
                continue
            st = entry.stat(follow_symlinks=False)
            target = os.readlink(entry.path) if entry.is_symlink() else ""
            digest.update(f"{os.path.relpath(entry.path, root)}\0{st.st_mode:o}\0{st.st_size}\0"
                          f"{st.st_mtime_ns}\0{target}\n".encode("utf-8", "surrogateescape"))
            count += 1
    return count


def _git_state(source: Path) -> str:
    """HEAD and index of a git tree: setlocalversion puts them in the kernel release."""
    git = source / ".git"
    if git.is_file():  # a worktree: "gitdir: <path>"
        text = git.read_text(errors="replace").strip()
        git = (source / text.removeprefix("gitdir:").strip()).resolve()
    parts = []
    for name in ("HEAD", "index", "packed-refs"):
        path = git / name
        with contextlib.suppress(OSError):
            st = path.stat()
            parts.append(f"{name} {st.st_size} {st.st_mtime_ns}")
    head = git / "HEAD"
    with contextlib.suppress(OSError):
        ref = head.read_text(errors="replace").strip()
        parts.append(ref)
        if ref.startswith("ref: "):
            parts.append((git / ref[5:]).read_text(errors="replace").strip())
    return "\n".join(parts)


def input_state(source: Path, command: Sequence[str], env: Mapping[str, str]) -> tuple[str, int]:
    """Digest of what make reads besides its own output: the source tree, command, environment,
    toolchain; with the number of source files looked at."""
    digest = hashlib.sha256()
    # -jN changes how, not what, make builds.
    digest.update(json.dumps([a for a in command if not a.startswith("-j")]).encode())
    digest.update(json.dumps(sorted((k, v) for k, v in env.items()
                                    if _KBUILD_ENV.match(k))).encode())
    for tool in _TOOLCHAIN:
        found = shutil.which(tool, path=env.get("PATH"))
        if found:
            real = os.path.realpath(found)
            st = os.stat(real)
            digest.update(f"{tool} {real} {st.st_size} {st.st_mtime_ns}\n".encode())
    digest.update(_git_state(source).encode("utf-8", "surrogateescape"))
    count = _tree_state(digest, source, frozenset({".git"}))
    return digest.hexdigest(), count


def output_state(obj: Path) -> str:
    """Digest of the O= tree as make left it (a deleted or touched object means make runs)."""
    digest = hashlib.sha256()
    _tree_state(digest, obj, _NOT_BUILD_OUTPUT)
    return digest.hexdigest()


def unchanged_since_last_build(build_dir: BuildDir, inputs: str) -> bool:
    """True when the last make succeeded with these inputs and its output is untouched since."""
    try:
        recorded = json.loads(build_dir.built_state.read_text())
    except (OSError, ValueError):
        return False
    return (recorded.get("inputs") == inputs and build_dir.image.exists()
            and recorded.get("output") == output_state(build_dir.obj))


def _record_build(build_dir: BuildDir, inputs: str) -> None:
    tmp = build_dir.built_state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inputs": inputs, "output": output_state(build_dir.obj)}) + "\n")
    tmp.replace(build_dir.built_state)


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
    # Taken before make starts: an edit made while make runs must not count as built.
    inputs, files = input_state(source, command, env)
    if unchanged_since_last_build(build_dir, inputs):
        seconds = time.monotonic() - started
        note = (f"build: nothing changed since the last build ({files} source files "
                f"checked in {seconds:.1f} s); make skipped")
        # The run's build.log must describe this run, not the make of an earlier one.
        build_dir.build_log.write_text(f"$ {printable}\n{note}\n")
        status.finish(note)
        return BuildResult(build_dir.image, seconds, 0, printable, skipped=True)
    # A make that fails or is interrupted must never leave a "built" record.
    with contextlib.suppress(FileNotFoundError):
        build_dir.built_state.unlink()
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
    _record_build(build_dir, inputs)
    return BuildResult(build_dir.image, seconds, steps, printable)


def _stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM make's whole group (make cleans up half-written objects), SIGKILL if it lingers."""
    process_group.stop(proc.pid, ((signal.SIGTERM, 10), (signal.SIGKILL, 10)),
                       lambda: proc.poll() is not None)
    # Compilers of the group may outlive make itself by a moment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def build_targets(needs_modules: bool) -> list[str]:
    """bzImage always; modules only when the config builds some."""
    return ["bzImage", "modules"] if needs_modules else ["bzImage"]
