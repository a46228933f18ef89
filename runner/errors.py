"""Exit codes and the exceptions that carry them: the one place both are defined.

Every stage raises one of these for a problem the user can act on; the CLI
prints the one-line message (plus any details) and exits with the code.
Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterable, Sequence


class ExitCode(enum.IntEnum):
    """Process exit status of `run-selftests`; scripts (CI, bisect) branch on these."""

    PASS = 0
    TEST_FAILURE = 1
    USAGE = 2
    SPLAT = 3
    TIMEOUT = 4
    BUILD_FAILURE = 5
    PATCH_FAILURE = 6
    INFRASTRUCTURE = 7
    # An exception escaped the runner itself: a bug to report, never a verdict on the kernel.
    RUNNER_BUG = 8
    # Not a verdict: the shell convention for "stopped by SIGINT".
    INTERRUPTED = 130


EXIT_CODE_MEANINGS = {
    ExitCode.PASS: "pass: every selected test passed and the kernel log is clean",
    ExitCode.TEST_FAILURE: "test failure: at least one test failed or errored",
    ExitCode.USAGE: "usage or environment error (bad option, missing tool or file)",
    ExitCode.SPLAT: "kernel splat or crash (oops, WARNING, panic, guest died, no results)",
    ExitCode.TIMEOUT: "timeout: the guest exceeded --timeout or stalled",
    ExitCode.BUILD_FAILURE: "kernel build failure (including a config that did not survive)",
    ExitCode.PATCH_FAILURE: "patch failure: the series could not be applied",
    ExitCode.INFRASTRUCTURE: "infrastructure error (QEMU could not start, the guest could "
                             "not start pytest, out of disk, ...)",
    ExitCode.RUNNER_BUG: "bug in run-selftests: an unexpected exception (traceback in the "
                         "run's runner-traceback.txt)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); the kernel tree was restored",
}


def exit_code_table() -> str:
    """Render the exit codes for --help, so the documentation cannot drift from the enum."""
    return "\n".join(
        f"  {int(code):>3}  {EXIT_CODE_MEANINGS[code]}" for code in ExitCode
    )


class RunnerError(Exception):
    """A failure the user can act on: one line of message, optional detail lines."""

    exit_code = ExitCode.INFRASTRUCTURE

    def __init__(self, message: str, details: Iterable[str] = ()):
        super().__init__(message)
        self.message = message
        self.details: Sequence[str] = tuple(details)


class UsageError(RunnerError):
    """Bad option, missing input file, missing tool, unwritable directory."""

    exit_code = ExitCode.USAGE


class PatchError(RunnerError):
    """A series entry is missing or does not apply; the tree has been restored."""

    exit_code = ExitCode.PATCH_FAILURE


class BuildError(RunnerError):
    """The kernel did not configure or compile."""

    exit_code = ExitCode.BUILD_FAILURE


class ConfigError(BuildError):
    """Requested config symbols did not survive olddefconfig."""


class InfrastructureError(RunnerError):
    """The machinery failed (QEMU, disk, network), not the kernel under test."""

    exit_code = ExitCode.INFRASTRUCTURE


def machine_state_error(error: OSError) -> RunnerError | None:
    """A full disk or a file the user cannot write is the machine's state, not a bug.

    Returns it as a one-line RunnerError saying what to do; None for any other
    OSError, which is a bug.
    """
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return InfrastructureError(f"out of disk space{where}; free space or move the cache "
                                   "with --cache-dir")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UsageError(f"{error.strerror}{where}; fix the permissions or choose other "
                          "--cache-dir/--output directories")
    return None


class Interrupted(BaseException):
    """SIGTERM turned into an exception, so `finally` blocks restore the tree.

    A BaseException like KeyboardInterrupt, so `except Exception` never eats it.
    """
