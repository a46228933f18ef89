"""Bad input as a new user would type it: one line naming the problem, a distinct exit code,
and a kernel tree left exactly as it was.  Runs the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HIDDEN_CHECKOUT, HIDDEN_CHECKOUT_REASON, REPO

from runner.cache import Cache, default_cache_dir
from runner.commands import cli, pipeline
from runner.errors import (
    BuildError,
    ConfigError,
    ExitCode,
    InfrastructureError,
    Interrupted,
    PatchError,
    UsageError,
)
from runner.stages import build
from runner.stages.patches import load_series

# The runner refuses a checkout its guests cannot see before anything these tests check.
pytestmark = pytest.mark.skipif(bool(HIDDEN_CHECKOUT), reason=HIDDEN_CHECKOUT_REASON)



def run_selftests(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.commands.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: ExitCode, *phrases: str):
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("run-selftests")]
    assert len(errors) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def kernel_tree(root: Path) -> Path:
    (root / "arch" / "x86").mkdir(parents=True)
    (root / "Kconfig").write_text("mainmenu \"Linux\"\n")
    (root / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 0\nEXTRAVERSION =\n")
    (root / "net" / "core").mkdir(parents=True)
    (root / "net" / "core" / "bpf_sk_storage.c").write_text(
        "".join(f"line {n}\n" for n in range(1, 30)))
    return root


def tree_state(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.parts}


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path


def common(work: Path) -> list:
    return ["--cache-dir", str(work / "cache"), "--output", str(work / "out")]


def test_missing_source_dir(work):
    proc = run_selftests("--kernel-src", str(work / "linux"), *common(work), cwd=work)
    assert_one_line_error(proc, ExitCode.USAGE, "--kernel-src", "no such directory")


def test_series_naming_a_missing_patch(work):
    tree = kernel_tree(work / "linux")
    (work / "series").write_text("0001-exists.patch\n0002-missing.patch\n")
    (work / "0001-exists.patch").write_text("--- a/x\n+++ b/x\n")
    before = tree_state(tree)
    proc = run_selftests("--kernel-src", str(tree), "--series", str(work / "series"),
                         *common(work), cwd=work)
    assert_one_line_error(proc, ExitCode.PATCH_FAILURE, "series:2", "0002-missing.patch not found")
    assert tree_state(tree) == before
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["exit_code"] == ExitCode.PATCH_FAILURE and summary["verdict"] == "error"


def test_a_patch_that_does_not_apply(work):
    tree = kernel_tree(work / "linux")
    (work / "0001-stale.patch").write_text(
        "--- a/net/core/bpf_sk_storage.c\n+++ b/net/core/bpf_sk_storage.c\n"
        "@@ -10,3 +10,3 @@\n line 10\n-line eleven\n+line 11 patched\n line 12\n")
    (work / "series").write_text("0001-stale.patch\n")
    # A log left in the build directory by an earlier run must not pass for this one's.
    build_dir = build.build_dir_for(Cache(work / "cache"), tree, load_series(work / "series"),
                                    list(pipeline.DEFAULT_FRAGMENTS))
    build_dir.build_log.write_text("an earlier run's build log\n")
    before = tree_state(tree)
    proc = run_selftests("--kernel-src", str(tree), "--series", str(work / "series"),
                         *common(work), cwd=work)
    assert_one_line_error(proc, ExitCode.PATCH_FAILURE, "0001-stale.patch", "does not apply",
                          "restored")
    assert "Hunk #1 FAILED" in proc.stderr  # the detail lines name the hunk
    assert tree_state(tree) == before
    assert not (work / "out" / "build.log").exists()
    assert (work / "out" / "series" / "series").read_text() == "0001-stale.patch\n"


def test_a_kernel_image_that_is_not_a_kernel(work):
    fake = work / "bzImage"
    fake.write_text("#!/bin/sh\n")
    proc = run_selftests("--kernel-image", str(fake), *common(work), cwd=work)
    assert_one_line_error(proc, ExitCode.USAGE, "is not an x86 kernel image")


def test_an_unwritable_output_dir(work):
    (work / "a-file").write_text("")
    proc = run_selftests("--kernel-src", str(kernel_tree(work / "linux")), "--cache-dir",
                         str(work / "cache"), "--output", str(work / "a-file" / "run"), cwd=work)
    assert_one_line_error(proc, ExitCode.USAGE, "output directory", "not writable")


@pytest.mark.parametrize("args", [
    ["--kernel-src", "/nonexistent"],
    ["--kernel-image", "/nonexistent/bzImage"],
    ["--distro-kernel", "6.1", "--series", "s"],
])
def test_a_usage_error_leaves_no_empty_run_directory(work, args):
    proc = run_selftests(*args, "--cache-dir", str(work / "cache"), cwd=work)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert not (work / "runs").exists()


@pytest.mark.parametrize("where, what", [
    ("/var/tmp/sk-run", "--output /var/tmp/sk-run is under /var/tmp"),
    ("/var/cache/sk/run", "--output /var/cache/sk/run is under /var/cache"),
    ("/var/lib/machines/run", "--output /var/lib/machines/run is under /var/lib/machines"),
])
def test_an_output_the_guest_cannot_see_is_refused_before_anything_else(work, where, what):
    # Even before the kernel-src typo: the masked path is what the user must change first.
    proc = run_selftests("--kernel-src", "/nonexistent", "--output", where,
                         "--cache-dir", str(work / "cache"), cwd=work)
    assert_one_line_error(proc, ExitCode.USAGE, what, "empty tmpfs", "elsewhere")
    assert not Path(where).exists()


def test_the_guest_paths_checked_are_suite_interpreter_venv_and_output(work, monkeypatch):
    from runner import preflight

    monkeypatch.chdir(work)
    options = pipeline.RunOptions(suite=Path("/var/tmp/co/selftests"))
    paths = pipeline.guest_paths(options)
    assert [p.what for p in paths] == ["the suite (--suite)", "the Python interpreter",
                                       "the Python environment", "the default output directory"]
    assert paths[1].path == Path(sys.executable) and paths[2].path == Path(sys.prefix)
    assert paths[3].path == work / "runs"
    with pytest.raises(UsageError, match=r"^the suite \(--suite\) /var/tmp/co/selftests is "
                                         r"under /var/tmp, .*; move it"):
        preflight.check_guest_visible(paths)


def test_a_checkout_under_var_tmp_is_refused_in_under_a_second(work):
    """The venv's interpreter under /var/tmp, as after `git clone` there (a symlinked path)."""
    import time

    # The refusal resolves symlinks, so a link from /var/tmp into this checkout's venv
    # is what the guest would miss; nothing is created under /var/tmp itself.
    fake_prefix = Path("/var/tmp/sk-storage-selftests-clone/.venv")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c",
         (f"import sys, runner.commands.cli; sys.prefix = {str(fake_prefix)!r}; "
          "sys.exit(runner.commands.cli.main())"), "--cache-dir", str(work / "cache")],
        cwd=work, capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - started
    assert_one_line_error(proc, ExitCode.USAGE,
                          f"the Python environment {fake_prefix} is under /var/tmp")
    assert elapsed < 5, elapsed  # generous for a loaded machine; measured ~0.4 s idle
    assert not (work / "runs").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_output_dir(work):
    locked = work / "locked"
    locked.mkdir(mode=0o500)
    proc = run_selftests("--kernel-image", "x", "--cache-dir", str(work / "cache"),
                         "--output", str(locked / "run"), cwd=work)
    assert_one_line_error(proc, ExitCode.USAGE, "not writable")


def test_options_that_exclude_each_other(work):
    proc = run_selftests("--distro-kernel", "6.1", "--series", "s", *common(work), cwd=work)
    assert_one_line_error(proc, ExitCode.USAGE, "need a kernel to build")
    proc = run_selftests("--kernel-src", "a", "--kernel-image", "b", *common(work), cwd=work)
    assert_one_line_error(proc, ExitCode.USAGE, "exclude each other")


def test_argparse_errors_are_usage_errors(work):
    proc = run_selftests("--accel", "hvf", cwd=work)
    assert proc.returncode == ExitCode.USAGE and "invalid choice" in proc.stderr
    proc = run_selftests("--distro-kernel", "4.19", cwd=work)
    assert proc.returncode == ExitCode.USAGE


def test_help_documents_every_exit_code(work):
    proc = run_selftests("--help", cwd=work)
    assert proc.returncode == 0
    for code in ExitCode:
        assert f"  {int(code):>3}  " in proc.stdout


DEFAULT_SOURCE = default_cache_dir() / "sources" / "linux-source-6.1"


@pytest.mark.skipif(not (DEFAULT_SOURCE / "Makefile").exists(),
                    reason="needs the unpacked Debian 6.1 source in the default cache")
def test_a_fragment_with_an_unknown_symbol_stops_before_the_build(work):
    """Real virtme-configkernel + olddefconfig on the real 6.1 tree (about half a minute)."""
    fragment = work / "typo.config"
    fragment.write_text("CONFIG_BPF_SYSCALL=y\nCONFIG_BPF_SK_STORAGE_TYPO=y\n")
    proc = run_selftests("--kernel-src", str(DEFAULT_SOURCE), "--config", str(fragment),
                         *common(work), cwd=work)
    assert_one_line_error(proc, ExitCode.BUILD_FAILURE, "did not survive olddefconfig",
                          "CONFIG_BPF_SK_STORAGE_TYPO=y")
    assert f"{fragment}:2: CONFIG_BPF_SK_STORAGE_TYPO=y requested" in proc.stderr
    assert "build:" not in proc.stdout  # no make was started
    # Configured out of tree: the shared source stays clean for O= builds.
    assert not (DEFAULT_SOURCE / ".config").exists()
    assert (work / "out" / "config.log").exists() and (work / "out" / "kernel.config").exists()


@pytest.mark.parametrize("error, code", [
    (UsageError("u"), ExitCode.USAGE),
    (PatchError("p"), ExitCode.PATCH_FAILURE),
    (BuildError("b"), ExitCode.BUILD_FAILURE),
    (ConfigError("c"), ExitCode.BUILD_FAILURE),
    (InfrastructureError("i"), ExitCode.INFRASTRUCTURE),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED),
    (Interrupted("received signal SIGTERM"), ExitCode.INTERRUPTED),
    (OSError(28, "No space left on device", "/cache/build/x.o"), ExitCode.INFRASTRUCTURE),
    (PermissionError(13, "Permission denied", "/cache/build"), ExitCode.USAGE),
])
def test_exceptions_map_to_their_exit_codes(monkeypatch, capsys, error, code):
    def fail(argv):
        raise error

    monkeypatch.setattr(cli, "dispatch", fail)
    assert cli.main([]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_other_os_errors_are_bugs_and_keep_their_traceback(monkeypatch, capsys):
    def fail(argv):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cli, "dispatch", fail)
    assert cli.main([]) == ExitCode.RUNNER_BUG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in fail" in err
    assert err.splitlines()[-1] == ("run-selftests: error: bug in run-selftests (OSError: "
                                    "[Errno 5] Input/output error); please report it")


def test_an_exception_escaping_a_run_is_a_runner_bug_with_its_traceback_saved(
        work, monkeypatch, capsys):
    """A stage raising something unexpected: exit 8 from main(), recorded in summary.json."""
    def broken_stage(*args, **kwargs):
        raise KeyError("a stage that forgot a key")

    image = work / "bzImage"
    image.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    monkeypatch.setattr(pipeline, "obtain_kernel", broken_stage)
    monkeypatch.setattr(pipeline.preflight, "check", lambda requirements: None)
    monkeypatch.setattr(pipeline.prebuilt, "open_kernel_image", lambda *a: None)
    out = work / "out"
    code = cli.main(["--kernel-image", str(image), "--cache-dir", str(work / "cache"),
                     "--output", str(out)])
    captured = capsys.readouterr()
    assert code == ExitCode.RUNNER_BUG == 8
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["verdict"], summary["exit_code"]) == ("runner bug", 8)
    assert summary["reason"] == "KeyError: 'a stage that forgot a key'"
    saved = (out / summary["traceback"]).read_text()
    assert "in broken_stage" in saved and saved.startswith("Traceback")
    # The run's log (stdout here, runner.log under matrix/regressions) has it once...
    assert "in broken_stage" in captured.out
    # ...and stderr says where, without printing it a second time.
    assert "Traceback" not in captured.err
    assert captured.err.strip() == (
        "run-selftests: error: bug in run-selftests (KeyError: 'a stage that forgot a key'); "
        f"traceback in {out / 'runner-traceback.txt'}; please report it")


def test_only_an_interruption_is_recorded_as_interrupted(work, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "obtain_kernel", interrupted)
    monkeypatch.setattr(pipeline.preflight, "check", lambda requirements: None)
    monkeypatch.setattr(pipeline.prebuilt, "open_kernel_image", lambda *a: None)
    out = work / "out"
    code = cli.main(["--kernel-image", str(work / "x"), "--cache-dir", str(work / "cache"),
                     "--output", str(out)])
    assert code == ExitCode.INTERRUPTED
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["verdict"], summary["exit_code"]) == ("interrupted", 130)
    assert "traceback" not in summary


def test_error_details_follow_the_one_line_message(monkeypatch, capsys):
    def fail(argv):
        raise BuildError("kernel build failed (make exit 2); full log: /x/build.log",
                         details=["net/core/x.c:3:1: error: expected ';'"])

    monkeypatch.setattr(cli, "dispatch", fail)
    assert cli.main([]) == ExitCode.BUILD_FAILURE
    err = capsys.readouterr().err.splitlines()
    assert err == [("run-selftests: error: kernel build failed (make exit 2); full log: "
                   "/x/build.log"), "  net/core/x.c:3:1: error: expected ';'"]


def test_subcommands_are_dispatched_to_their_modules(tmp_path):
    proc = run_selftests("parse", str(tmp_path / "nope"), cwd=tmp_path)
    assert_one_line_error(proc, ExitCode.USAGE, "is not a directory")
    assert set(cli.SUBCOMMANDS) >= {"parse"}


def test_the_readme_exit_code_table_lists_exactly_the_enum():
    import re

    readme = (REPO / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    codes = [int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)]
    assert codes == [int(code) for code in ExitCode]
