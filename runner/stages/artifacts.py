"""Stage 7, the artifacts: one output directory per run with everything needed to understand it.

console.log, build.log, the final .config, the applied series, junit.xml and
summary.json (kernel, accelerator, timings per stage, verdict, exit code and
a reproducer command line, in the spirit of tuxmake's metadata.json).
Default location: ./runs/<UTC timestamp> under the current directory, with
./runs/latest pointing at the newest run.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from runner.errors import UsageError

CONSOLE_LOG = "console.log"
BUILD_LOG = "build.log"
CONFIG_LOG = "config.log"
KERNEL_CONFIG = "kernel.config"
# The image a built kernel booted from: a copy taken under the tree lock, and what
# `--kernel-image <run>/bzImage` boots again.
BOOTED_IMAGE = "bzImage"
SUMMARY = "summary.json"
SERIES_DIR = "series"
# What the guest writes into the output directory (see boot.guest_test_command).
JUNIT_FILE = "junit.xml"
PYTEST_EXIT_FILE = "pytest-exitcode"
GUEST_RELEASE_FILE = "guest-kernel-release"
# Files a guest or an earlier run may have left: removed before a run reuses
# a directory, so stale results can never be read as this run's.
RUN_OUTPUTS = (JUNIT_FILE, PYTEST_EXIT_FILE, GUEST_RELEASE_FILE, CONSOLE_LOG, BUILD_LOG,
               CONFIG_LOG, KERNEL_CONFIG, SUMMARY)


def default_output_dir(base: Path | None = None,
                       now: datetime.datetime | None = None) -> Path:
    """A fresh ./runs/<UTC timestamp> path (suffixed -2, -3... if taken)."""
    base = Path.cwd() / "runs" if base is None else base
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    candidate = base / stamp
    suffix = 2
    while candidate.exists():
        candidate = base / f"{stamp}-{suffix}"
        suffix += 1
    return candidate


def prepare_output_dir(requested: Path | None) -> Path:
    """Create and verify the output directory; an unwritable one is a one-line usage error."""
    default = requested is None
    out = default_output_dir() if default else Path(requested).expanduser()
    out = out.absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        hint = "pass --output DIR somewhere writable" if default else "choose a writable --output"
        raise UsageError(f"output directory {out} is not writable ({exc.strerror}); {hint}") \
            from None
    for name in RUN_OUTPUTS:
        stale = out / name
        if stale.is_file():
            stale.unlink()
    if (out / SERIES_DIR).is_dir():
        shutil.rmtree(out / SERIES_DIR)
    if default:
        latest = out.parent / "latest"
        try:
            if latest.is_symlink():
                latest.unlink()
            if not latest.exists():
                latest.symlink_to(out.name)
        except OSError:
            pass  # a convenience only
    return out


def save_copy(source: Path, out: Path, name: str) -> Path | None:
    """Copy a file into the output directory under name; None if the source is absent."""
    if not Path(source).is_file():
        return None
    target = out / name
    shutil.copyfile(source, target)
    return target


def save_series(out: Path, series_file: Path | None, entries: Sequence[dict]) -> Path | None:
    """The applied series: the series file, each patch file, and applied.json (methods, commits)."""
    if series_file is None:
        return None
    target = out / SERIES_DIR
    target.mkdir(exist_ok=True)
    shutil.copyfile(series_file, target / "series")
    for entry in entries:
        path = entry.get("path")
        if path:
            destination = target / entry["name"]
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
    (target / "applied.json").write_text(json.dumps(list(entries), indent=2) + "\n")
    return target


def reproducer(argv: Sequence[str], output_dir: Path) -> str:
    """The command line that reruns this run, with --output pointing to a new directory."""
    args = list(argv)
    cleaned = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--output":
            skip = True
            continue
        if arg.startswith("--output="):
            continue
        cleaned.append(arg)
    return shlex.join(["run-selftests", *cleaned, "--output", str(output_dir) + "-rerun"])
