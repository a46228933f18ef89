"""One real boot: Debian's 6.1 kernel under QEMU (TCG here, KVM where it works) runs a tiny
selection and the runner brings back the right verdict.

Slow (about a minute under TCG), so it is marked `boot` and skipped where QEMU
or virtme-ng is missing.  The cache comes from $SK_STORAGE_SELFTESTS_CACHE_DIR
(default ~/.cache/sk-storage-selftests) so CI reuses the downloaded kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.errors import ExitCode
from runner.preflight import BOOT_TOOLS, DISTRO_KERNEL_TOOLS, missing

GUEST_SUITE = Path(__file__).parent / "fixtures" / "runner" / "guest-suite"
ABSENT = missing(BOOT_TOOLS + DISTRO_KERNEL_TOOLS)


@pytest.mark.boot
@pytest.mark.skipif(bool(ABSENT), reason=f"needs {', '.join(r.name for r in ABSENT)}")
def test_debian_61_boots_runs_the_selection_and_reports_a_failure(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "--distro-kernel", "6.1", "--suite",
         str(GUEST_SUITE), "-k", "root or release or skipped or deliberate",
         "--timeout", "600", "--output", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    log = proc.stdout + proc.stderr
    # The selection holds one deliberately failing test: the verdict must say so.
    assert proc.returncode == ExitCode.TEST_FAILURE, log
    assert ("VERDICT: TEST FAILURE - 1 test(s) failed: test_deliberate_failure "
            "[2 passed, 1 failed, 1 skipped (uncategorized 1)] (exit 1)") in log

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
