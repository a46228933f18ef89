"""mypy over runner/ and selftests/bpfkit/, as configured in pyproject.toml, so CI enforces it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# The checkout's own mypy cache (git ignores it), as a developer's mypy runs use it: a
# warm run takes about half a second, a cold one 5-15 s.
CACHE = ROOT / ".mypy_cache"


def mypy(*args: str, cache: Path = CACHE) -> subprocess.CompletedProcess:
    """mypy with the project's configuration."""
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: install the dev extra (pip install -e '.[dev]')")
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args],
                          capture_output=True, text=True, cwd=ROOT, check=False)


def test_runner_and_bpfkit_type_check():
    proc = mypy()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


def test_the_configuration_catches_a_type_error(tmp_path):
    # The same configuration on a file with a real error must fail, naming it.
    bad = tmp_path / "bad.py"
    bad.write_text("from runner.stages.results import VerdictLabel\n"
                   "label: VerdictLabel = 'pass'\n")
    proc = mypy(str(bad))
    assert proc.returncode == 1
    assert "bad.py:2: error: Incompatible types in assignment" in proc.stdout
