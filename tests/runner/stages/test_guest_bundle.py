"""The guest's import bundle, built and used for real on a small suite on this host."""

from __future__ import annotations

import importlib.util
import marshal
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.stages import guest_bundle

CONFTEST = "import helperlib\n"
TEST = textwrap.dedent("""\
    import os
    import helperlib

    def test_value():
        assert helperlib.VALUE == int(os.environ["EXPECTED_VALUE"])
        loader = type(helperlib.__spec__.loader).__name__
        assert loader == os.environ["EXPECTED_LOADER"], loader
""")


def make_suite(root: Path, value: int = 1) -> Path:
    suite = root / "suite"
    (suite / "helperlib").mkdir(parents=True)
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_value.py").write_text(TEST)
    (suite / "helperlib" / "__init__.py").write_text(f"VALUE = {value}\n")
    return suite


def run_suite(launcher: list[str], suite: Path, value: int, loader: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EXPECTED_VALUE=str(value), EXPECTED_LOADER=loader,
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([*launcher, "pytest", str(suite), "-q", "-p", "no:cacheprovider"],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_bundle_serves_the_suites_library_and_pytest_but_not_rewritten_modules(tmp_path):
    suite = make_suite(tmp_path)
    bundle = guest_bundle.ensure(tmp_path / "cache", sys.executable, suite, log=lambda _: None)
    modules = marshal.loads(bundle.path.read_bytes())["modules"]
    assert {"helperlib", "pytest", "_pytest.main", "json"} <= set(modules)
    # pytest rewrites the asserts of test modules and conftest files as it imports them.
    assert "conftest" not in modules and "test_value" not in modules
    result = run_suite(bundle.launcher(sys.executable), suite, 1, "BundleFinder")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_an_edited_module_rebuilds_the_bundle(tmp_path):
    suite = make_suite(tmp_path)
    cache = tmp_path / "cache"
    first = guest_bundle.ensure(cache, sys.executable, suite, log=lambda _: None)
    assert guest_bundle.ensure(cache, sys.executable, suite, log=print) == first
    library = suite / "helperlib" / "__init__.py"
    library.write_text("VALUE = 2\n")
    # Same size, so only the mtime tells: make sure it moved.
    os.utime(library, ns=(library.stat().st_atime_ns, library.stat().st_mtime_ns + 10**9))
    messages: list[str] = []
    second = guest_bundle.ensure(cache, sys.executable, suite, log=messages.append)
    assert second.path == first.path and messages, "the stale bundle was reused"
    result = run_suite(second.launcher(sys.executable), suite, 2, "BundleFinder")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bundle_for_another_interpreter_is_ignored_with_a_note(tmp_path):
    suite = make_suite(tmp_path)
    bundle = guest_bundle.ensure(tmp_path / "cache", sys.executable, suite, log=lambda _: None)
    content = marshal.loads(bundle.path.read_bytes())
    assert content["magic"] == importlib.util.MAGIC_NUMBER
    content["magic"] = b"\0\0\r\n"
    bundle.path.write_bytes(marshal.dumps(content))
    result = run_suite(bundle.launcher(sys.executable), suite, 1, "SourceFileLoader")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "made for another interpreter; importing from disk" in result.stderr


def test_no_bundle_means_a_plain_start_and_a_note(tmp_path):
    suite = make_suite(tmp_path)
    messages: list[str] = []
    launcher = guest_bundle.launcher_or_plain(tmp_path / "cache", "/bin/false", suite,
                                              messages.append)
    assert launcher == ["/bin/false", "-m"]
    assert len(messages) == 1 and "the guest imports from disk" in messages[0]


@pytest.mark.parametrize("argv", [[], ["bundle", "sites", "pytest"]])
def test_the_bootstrap_refuses_a_malformed_command_line(argv):
    result = subprocess.run([sys.executable, "-S", str(guest_bundle.BOOTSTRAP), *argv],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -S import_bundle.py")
