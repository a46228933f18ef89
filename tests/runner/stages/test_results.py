"""JUnit parsing, the verdict rules and the summary table, on files real runs produced."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TESTS

from runner.commands import pipeline
from runner.errors import ExitCode
from runner.stages import results

FIXTURES = TESTS / "fixtures" / "runner"


@pytest.fixture(scope="module")
def mixed_junit(tmp_path_factory) -> list:
    """JUnit from a real pytest run with every outcome: pass, fail, error, skip, xfail."""
    suite = tmp_path_factory.mktemp("suite")
    (suite / "test_mixed.py").write_text(textwrap.dedent("""\
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture exploded")

        def test_passes():
            assert True

        def test_fails():
            assert 2 + 2 == 5, "arithmetic is off"

        def test_errors(broken):
            pass

        def test_skips():
            pytest.skip("needs CONFIG_BPF_LSM")

        @pytest.mark.xfail(reason="known upstream bug")
        def test_xfails():
            assert False
        """))
    junit = suite / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", str(suite)], capture_output=True, text=True,
                          cwd=suite, check=False)
    assert proc.returncode == 1, proc.stdout
    return results.parse_junit(junit)


def test_junit_from_a_real_guest_run():
    tests = results.parse_junit(FIXTURES / "junit-guest-6.1.xml")
    assert [(t.name, t.outcome) for t in tests] == [
        ("check_guest::test_runs_as_root_in_the_guest", "passed"),
        ("check_guest::test_kernel_release_matches_proc", "passed"),
        ("check_guest::test_skipped_with_a_reason", "skipped"),
    ]
    assert tests[2].message == "fixture skip reason"
    assert tests[0].seconds == pytest.approx(0.007)


def test_junit_with_every_outcome(mixed_junit):
    by_name = {t.name.split("::")[-1]: t for t in mixed_junit}
    assert by_name["test_passes"].outcome == "passed"
    assert by_name["test_fails"].outcome == "failed"
    assert "arithmetic is off" in by_name["test_fails"].message
    assert by_name["test_errors"].outcome == "error"
    assert "fixture exploded" in by_name["test_errors"].message
    assert by_name["test_skips"].outcome == "skipped"
    assert by_name["test_skips"].message == "needs CONFIG_BPF_LSM"
    # An expected failure is its own outcome: a known bug, not a skip.
    assert by_name["test_xfails"].outcome == "xfailed"
    assert "known upstream bug" in by_name["test_xfails"].message


def test_junit_that_is_not_xml_or_not_junit_is_refused():
    with pytest.raises(ValueError, match="not well-formed"):
        results.parse_junit_text("<testsuites><testcase")
    with pytest.raises(ValueError, match="root <html>"):
        results.parse_junit_text("<html/>")


class FakeSplat:
    def __init__(self, kind, line, excerpt=""):
        self.kind, self.line, self.excerpt = kind, line, excerpt


PASSING = [results.TestResult("m::test_a", "passed", "", 0.1),
           results.TestResult("m::test_b", "skipped", "[older kernel] lacks X (5.9+)", 0.0)]
FAILING = PASSING + [results.TestResult("m::test_c", "failed", "boom", 0.2)]


@pytest.mark.parametrize("case, expected", [
    ({"boot_status": "exited", "pytest_exit": 0, "tests": PASSING, "splats": []}, ExitCode.PASS),
    ({"boot_status": "exited", "pytest_exit": 1, "tests": FAILING, "splats": []}, ExitCode.TEST_FAILURE),
    # A splat fails the run even when every test passed.
    ({"boot_status": "exited", "pytest_exit": 0, "tests": PASSING,
          "splats": [FakeSplat("WARNING", 812)]}, ExitCode.SPLAT),
    ({"boot_status": "panic", "pytest_exit": None, "tests": None, "splats": []}, ExitCode.SPLAT),
    # Missing results are a crash, never a pass.
    ({"boot_status": "exited", "pytest_exit": None, "tests": None, "splats": []}, ExitCode.SPLAT),
    ({"boot_status": "exited", "pytest_exit": 0, "tests": None, "splats": []}, ExitCode.SPLAT),
    ({"boot_status": "exited", "pytest_exit": None, "tests": PASSING, "splats": []}, ExitCode.SPLAT),
    ({"boot_status": "timeout", "pytest_exit": None, "tests": None, "splats": []}, ExitCode.TIMEOUT),
    ({"boot_status": "stalled", "pytest_exit": None, "tests": None, "splats": []}, ExitCode.TIMEOUT),
    # ...but a splat outranks the clock.
    ({"boot_status": "stalled", "pytest_exit": None, "tests": None,
          "splats": [FakeSplat("soft lockup", 40)]}, ExitCode.SPLAT),
    ({"boot_status": "exited", "pytest_exit": 5, "tests": [], "splats": []}, ExitCode.USAGE),
    ({"boot_status": "exited", "pytest_exit": 4, "tests": [], "splats": []}, ExitCode.USAGE),
    ({"boot_status": "exited", "pytest_exit": 2, "tests": PASSING, "splats": []}, ExitCode.TEST_FAILURE),
    ({"boot_status": "exited", "pytest_exit": 0, "tests": [], "splats": []}, ExitCode.TEST_FAILURE),
])
def test_verdict_rules(case, expected):
    assert results.judge(**case).exit_code == expected


def test_verdict_reasons_name_what_happened():
    failing = results.judge("exited", 1, FAILING, [])
    assert failing.reason == "1 test(s) failed: test_c"
    splat = results.judge("exited", 0, PASSING, [FakeSplat("KASAN", 90), FakeSplat("BUG", 99)])
    assert splat.reason == "KASAN at console line 90 (+1 more)"
    crash = results.judge("exited", None, None, [], "no junit.xml")
    assert "no junit.xml" in crash.reason
    assert results.verdict_line(failing) == (
        "VERDICT: TEST FAILURE - 1 test(s) failed: test_c "
        "[1 passed, 1 failed, 1 skipped (older kernel 1)] (exit 1)")


def test_table_lists_each_test_with_skip_reasons_and_totals(mixed_junit):
    table = results.format_table(mixed_junit).splitlines()
    assert any(line.split()[0] == "SKIP" and line.endswith("needs CONFIG_BPF_LSM")
               for line in table)
    assert any(line.split()[0] == "FAIL" and "test_fails" in line for line in table)
    assert any(line.split()[0] == "ERROR" and "test_errors" in line for line in table)
    assert any(line.split()[0] == "XFAIL" and "test_xfails" in line for line in table)
    assert table[-1] == "1 passed, 2 failed, 1 skipped (uncategorized 1), 1 known bug"


def write_run(out: Path, junit: str | None = None, exit_code: str | None = None, console: str = "") -> Path:
    out.mkdir()
    if junit is not None:
        (out / "junit.xml").write_text(junit)
    if exit_code is not None:
        (out / "pytest-exitcode").write_text(exit_code)
    (out / "console.log").write_text(console)
    return out


# A real guest run whose one skip has no category ("fixture skip reason")...
GUEST_JUNIT_UNCATEGORIZED = (FIXTURES / "junit-guest-6.1.xml").read_text()
# ...and the same run as the suite reports it now, every skip with its category.
GUEST_JUNIT = GUEST_JUNIT_UNCATEGORIZED.replace(
    "fixture skip reason", "[kernel config] fixture skip reason")
CLEAN_CONSOLE = (FIXTURES / "console-tcg-boot-start.log").read_text()


def test_a_saved_clean_run_passes(tmp_path):
    out = write_run(tmp_path / "run", GUEST_JUNIT, "0\n", CLEAN_CONSOLE)
    verdict, tests, splats, pytest_exit = pipeline.judge_output_dir(out, "exited")
    assert verdict.exit_code == ExitCode.PASS
    assert len(tests) == 3 and splats == [] and pytest_exit == 0


def test_a_saved_run_without_junit_is_a_crash(tmp_path):
    out = write_run(tmp_path / "run", None, None, CLEAN_CONSOLE)
    verdict, tests, _, _ = pipeline.judge_output_dir(out, "exited")
    assert verdict.exit_code == ExitCode.SPLAT
    assert "no junit.xml" in verdict.reason and tests is None


def test_a_saved_run_with_garbled_junit_is_a_crash(tmp_path):
    out = write_run(tmp_path / "run", GUEST_JUNIT[:200], "0\n", CLEAN_CONSOLE)
    verdict, _, _, _ = pipeline.judge_output_dir(out, "exited")
    assert verdict.exit_code == ExitCode.SPLAT
    assert "not well-formed" in verdict.reason


def test_the_parse_subcommand_rejudges_a_saved_run(tmp_path):
    out = write_run(tmp_path / "run", GUEST_JUNIT, "0\n", CLEAN_CONSOLE)
    proc = subprocess.run([sys.executable, "-m", "runner.commands.cli", "parse", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "SKIP  check_guest::test_skipped_with_a_reason" in proc.stdout
    assert "1 x [kernel config] fixture skip reason" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("VERDICT: PASS")


def test_parse_of_a_real_guest_run_with_an_uncategorized_skip_fails(tmp_path):
    out = write_run(tmp_path / "run", GUEST_JUNIT_UNCATEGORIZED, "0\n", CLEAN_CONSOLE)
    proc = subprocess.run([sys.executable, "-m", "runner.commands.cli", "parse", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == ExitCode.TEST_FAILURE, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1] == (
        "VERDICT: UNEXPECTED SKIP - 1 test(s) skipped for a reason a runner-booted guest must "
        "not have: fixture skip reason [2 passed, 0 failed, 1 skipped (uncategorized 1)] "
        "(exit 1)")


PANIC_CONSOLE = (FIXTURES / "console-sysrq-panic-6.1.log").read_text()


def test_a_real_panic_console_is_a_crash_verdict_with_its_excerpt(tmp_path):
    out = write_run(tmp_path / "run", None, None, PANIC_CONSOLE)
    verdict, _tests, splats, _ = pipeline.judge_output_dir(out, "panic")
    assert verdict.exit_code == ExitCode.SPLAT
    assert splats and splats[0].kind == "panic"
    # The report starts at sysrq's own line, just before the panic message.
    assert "sysrq: Trigger a crash" in PANIC_CONSOLE.splitlines()[splats[0].line - 1]
    assert "Kernel panic - not syncing: sysrq triggered crash" in splats[0].excerpt
    shown = results.format_splats(splats)
    assert "sysrq_handle_crash" in shown and "\n\n" not in shown


def test_a_splat_fails_a_run_whose_tests_all_passed(tmp_path):
    out = write_run(tmp_path / "run", GUEST_JUNIT, "0\n", CLEAN_CONSOLE + PANIC_CONSOLE)
    verdict, tests, _splats, pytest_exit = pipeline.judge_output_dir(out, "exited")
    assert pytest_exit == 0 and all(t.outcome != "failed" for t in tests)
    assert verdict.exit_code == ExitCode.SPLAT


def test_console_carriage_returns_do_not_shift_line_numbers(tmp_path):
    crlf = PANIC_CONSOLE.replace("\n", "\r\r\n")
    out = write_run(tmp_path / "run", None, None, crlf)
    _, _, splats, _ = pipeline.judge_output_dir(out, "panic")
    raw_lines = (out / "console.log").read_bytes().split(b"\n")
    assert b"sysrq: Trigger a crash" in raw_lines[splats[0].line - 1]
