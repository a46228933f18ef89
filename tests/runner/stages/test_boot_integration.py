"""One real boot: Debian's 6.1 kernel under QEMU (TCG here, KVM where it works) runs a tiny
selection and the runner brings back the right verdict.

Slow (about a minute under TCG), so it is marked `boot`, skipped where QEMU
or virtme-ng is missing, and started by conftest.py right after collection so
it boots while the other tests run.  The cache comes from $SK_STORAGE_SELFTESTS_CACHE_DIR
(default ~/.cache/sk-storage-selftests) so CI reuses the downloaded kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import TESTS

from runner.errors import ExitCode
from runner.preflight import BOOT_TOOLS, DISTRO_KERNEL_TOOLS, masked_in_guest, missing

GUEST_SUITE = TESTS / "fixtures" / "runner" / "guest-suite"
ABSENT = missing(BOOT_TOOLS + DISTRO_KERNEL_TOOLS)
# A checkout (or venv) under /var/tmp, /var/cache, ...: virtme-ng's guest init hides it,
# run-selftests refuses it up front (tests/runner/test_preflight.py), so no guest can
# run this checkout's files.
HIDDEN = masked_in_guest(GUEST_SUITE) or masked_in_guest(Path(sys.executable))

# The one boot, started by conftest.py as soon as collection selected the test.
_BACKGROUND: dict = {}


def start_in_background() -> None:
    """Start the real boot now (once); the test waits for it."""
    if ABSENT or HIDDEN or _BACKGROUND:
        return
    work = Path(tempfile.mkdtemp(prefix="boot-integration-"))
    # A file, not a pipe nobody reads while tests run; stop_background() closes it.
    log = open(work / "runner.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.commands.cli", "--distro-kernel", "6.1", "--suite",
         str(GUEST_SUITE), "-k", "root or release or skipped or deliberate",
         # One vCPU: the rest of the project's tests keep a core meanwhile.
         "--cpus", "1", "--timeout", "600", "--output", str(work / "run")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _BACKGROUND.update(proc=proc, work=work, log=log)


def stop_background() -> None:
    """Kill a boot the session no longer waits for, and remove its files."""
    proc = _BACKGROUND.get("proc")
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _BACKGROUND["log"].close()
    if not os.environ.get("KEEP_BOOT_INTEGRATION"):
        shutil.rmtree(_BACKGROUND["work"], ignore_errors=True)
    _BACKGROUND.clear()


@pytest.mark.boot
@pytest.mark.skipif(bool(ABSENT), reason=f"needs {', '.join(r.name for r in ABSENT)}")
@pytest.mark.skipif(bool(HIDDEN), reason=f"[environment] this checkout or its venv lies under "
                    f"{HIDDEN}, which virtme-ng's guest init hides from the guest")
def test_debian_61_boots_runs_the_selection_and_reports_a_failure():
    # Selected some way conftest did not see (a plugin, a direct call): start it now.
    start_in_background()
    proc, work = _BACKGROUND["proc"], _BACKGROUND["work"]
    proc.wait(timeout=900)
    out = work / "run"
    _BACKGROUND["log"].flush()
    log = (work / "runner.log").read_text()
    # The selection holds one deliberately failing test: the verdict must say so.
    assert proc.returncode == ExitCode.TEST_FAILURE, log
    assert ("VERDICT: TEST FAILURE - 1 test(s) failed: test_deliberate_failure "
            "[2 passed, 1 failed, 1 skipped (uncategorized 1)] (exit 1)") in log
    assert "timings: fetch " in log and ", guest " in log

    summary = json.loads((out / "summary.json").read_text())
    outcomes = {t["name"].split("::")[-1]: t["outcome"] for t in summary["tests"]}
    assert outcomes == {
        "test_runs_as_root_in_the_guest": "passed",
        "test_kernel_release_matches_proc": "passed",
        "test_skipped_with_a_reason": "skipped",
        "test_deliberate_failure": "failed",
    }
    assert summary["exit_code"] == ExitCode.TEST_FAILURE
    assert summary["pytest_exit"] == 1
    assert summary["splats"] == []
    assert summary["kernel"]["release"].startswith("6.1.")
    assert summary["kernel"]["release"].endswith("-amd64")
    assert summary["accel"]["used"] in ("kvm", "tcg")
    assert summary["accel"]["reason"]
    assert summary["boot"]["status"] == "exited"
    assert summary["timings"]["guest"] > 0 and summary["timings"]["total"] >= summary[
        "timings"]["guest"]
    assert summary["reproducer"].split(" && ")[1].startswith("run-selftests --distro-kernel 6.1")
    for artifact in ("console.log", "junit.xml", "summary.json", "pytest-exitcode"):
        assert (out / artifact).stat().st_size > 0, artifact
    console = (out / "console.log").read_text(errors="replace")
    assert "Linux version 6.1." in console
    assert "test_deliberate_failure FAILED" in console
    # No colour, whatever TERM the project's tests run under.
    assert "\x1b[" not in console
