"""A host that refuses program loads to root: the suite's verdict is stated skips, not failures.

The refusal is simulated with a seccomp filter (tests/selftests/seccomp_refuse_prog_load.py) that
makes every bpf(BPF_PROG_LOAD) fail with EPERM, as lockdown or an LSM does on some hosts.
Map tests must still run and pass; every test that needs a program must skip with an
[environment] reason naming the refusal, including tests that expect a load to fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from runner.stages import results

SECCOMP = Path(__file__).resolve().parent / "seccomp_refuse_prog_load.py"


@pytest.mark.skipif(os.geteuid() != 0, reason="[not root] the suite needs root to reach bpf(2)")
def test_refused_program_loads_are_environment_skips(tmp_path):
    junit = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, str(SECCOMP), sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         "-q", "-m", "not stress", f"--junitxml={junit}", "selftests"],
        cwd=REPO, capture_output=True, text=True, check=False)
    if run.returncode == 77:
        pytest.skip(f"[environment] {run.stderr.strip()}")
    tests = results.parse_junit(junit)
    failed = [t.name for t in tests if t.outcome in ("failed", "error")]
    assert failed == [], run.stdout[-3000:]
    skipped = [t for t in tests if t.outcome == "skipped"]
    refused = [t for t in skipped if "refused" in t.message and "EPERM" in t.message]
    assert all(t.message.startswith("[environment] ") for t in refused)
    # Every program test is among them, the verifier-rejection tests included...
    names = {t.name.split("::")[-1].split("[")[0] for t in refused}
    assert {"test_verifier_rejects_non_socket_sk_argument",
            "test_storage_get_with_socket_loads"} <= names, sorted(names)
    # ...and the map tests still ran.
    passed = {t.name.split("::")[-1] for t in tests if t.outcome == "passed"}
    assert "test_clone_flag_is_accepted" in passed
    assert len(passed) > 100
