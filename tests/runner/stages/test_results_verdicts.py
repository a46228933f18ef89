"""Verdicts that never lie: judged skips, known bugs, and guests that never started pytest.

The JUnit comes from real pytest runs of small suites; the consoles are a real
guest boot (the 6.1 fixture's first lines, up to virtme-ng-init starting the
script) followed by what dash, bash and Python really print when the runner's
guest command meets a hidden checkout, interpreter or output directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TESTS

from runner import record
from runner.commands import pipeline
from runner.errors import ExitCode
from runner.stages import results

FIXTURES = TESTS / "fixtures" / "runner"


def pytest_junit(tmp_path: Path, body: str) -> list[results.TestResult]:
    """Run pytest on a one-file suite and parse the JUnit it writes."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_cases.py").write_text(textwrap.dedent(body))
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", str(suite)], capture_output=True, text=True,
                   cwd=suite, check=False)
    return results.parse_junit(junit)


@pytest.fixture(scope="module")
def categorized(tmp_path_factory) -> list[results.TestResult]:
    """Every kind of skip the suite emits, a strict xfail and a strict XPASS."""
    return pytest_junit(tmp_path_factory.mktemp("categorized"), """\
        import pytest

        def test_passes():
            pass

        def test_older_kernel():
            pytest.skip("[older kernel] kernel lacks bpf_iter on sk storage maps (5.9+)")

        def test_kernel_config():
            pytest.skip("[kernel config] CONFIG_IPV6 is not set")

        def test_environment():
            pytest.skip("[environment] the host's policy refused BPF_PROG_TYPE_TRACING (EPERM)")

        def test_not_root():
            pytest.skip("[not root] the suite needs root")

        def test_uncategorized():
            pytest.skip("no category at all")

        @pytest.mark.xfail(strict=True, reason="known bug: fixed upstream by 55d49f750b1c")
        def test_known_bug():
            assert False

        @pytest.mark.xfail(strict=True, reason="known bug: fixed upstream by 7cbd0c4cebe4")
        def test_fixed_bug():
            pass
        """)


def by_name(tests, *names):
    return [t for t in tests if t.name.split("::")[-1] in names]


def test_skip_categories_and_xfail_come_out_of_real_junit(categorized):
    outcome = {t.name.split("::")[-1]: (t.outcome, results.skip_category(t.message))
               for t in categorized}
    assert outcome == {
        "test_passes": ("passed", "uncategorized"),
        "test_older_kernel": ("skipped", "older kernel"),
        "test_kernel_config": ("skipped", "kernel config"),
        "test_environment": ("skipped", "environment"),
        "test_not_root": ("skipped", "not root"),
        "test_uncategorized": ("skipped", "uncategorized"),
        "test_known_bug": ("xfailed", "uncategorized"),
        "test_fixed_bug": ("failed", "uncategorized"),
    }
    assert by_name(categorized, "test_fixed_bug")[0].message.startswith("[XPASS(strict)]")


def test_counts_per_outcome_and_skip_category(categorized):
    counts = results.counts(categorized)
    assert {k: counts[k] for k in results.OUTCOMES} == {
        "passed": 1, "failed": 1, "error": 0, "skipped": 5, "xfailed": 1}
    assert counts["skipped_by_category"] == {"older kernel": 1, "kernel config": 1,
                                             "environment": 1, "not root": 1,
                                             "uncategorized": 1}
    reasons = results.skip_reasons(categorized)
    assert len(reasons) == 5 and all(r["count"] == 1 for r in reasons)
    assert {"category": "kernel config", "reason": "[kernel config] CONFIG_IPV6 is not set",
            "count": 1} in reasons


ALLOWED_IN_GUEST = ("test_passes", "test_older_kernel", "test_kernel_config", "test_known_bug")


def test_older_kernel_and_kernel_config_skips_and_known_bugs_pass_in_a_guest(categorized):
    verdict = results.judge("exited", 0, by_name(categorized, *ALLOWED_IN_GUEST), [])
    assert verdict.exit_code == ExitCode.PASS
    assert verdict.tally == ("1 passed, 0 failed, 2 skipped (older kernel 1, kernel config 1), "
                             "1 known bug")
    assert "1 known bug" in results.verdict_line(verdict)


@pytest.mark.parametrize("extra, reason", [
    ("test_environment", "[environment] the host's policy refused"),
    ("test_not_root", "[not root] the suite needs root"),
    ("test_uncategorized", "no category at all"),
])
def test_any_other_skip_in_a_guest_fails_the_run_and_names_it(categorized, extra, reason):
    tests = by_name(categorized, *ALLOWED_IN_GUEST, extra)
    verdict = results.judge("exited", 0, tests, [], target="vm")
    assert (verdict.exit_code, verdict.label) == (ExitCode.TEST_FAILURE, "unexpected skip")
    assert verdict.reason.startswith("1 test(s) skipped for a reason a runner-booted guest "
                                     "must not have: ")
    assert reason in verdict.reason


def test_an_ssh_target_may_skip_for_its_environment_but_not_for_anything_else(categorized):
    environment = by_name(categorized, *ALLOWED_IN_GUEST, "test_environment")
    verdict = results.judge("exited", 0, environment, [], target="ssh")
    assert verdict.exit_code == ExitCode.PASS
    # Allowed, but reported.
    assert "environment 1" in results.verdict_line(verdict)
    not_root = by_name(categorized, *ALLOWED_IN_GUEST, "test_not_root")
    assert results.judge("exited", 0, not_root, [], target="ssh").exit_code == \
        ExitCode.TEST_FAILURE


def test_many_unexpected_skips_show_the_count_and_the_first_reasons():
    tests = [results.TestResult(f"m::t{i}", "skipped", f"[environment] reason {i % 5}", 0)
             for i in range(20)] + [results.TestResult("m::ok", "passed", "", 0)]
    verdict = results.judge("exited", 0, tests, [])
    assert verdict.reason.startswith("20 test(s) skipped")
    assert "reason 0; [environment] reason 1; [environment] reason 2 (+2 more reasons)" \
        in verdict.reason


@pytest.mark.parametrize("target", results.TARGETS)
def test_a_run_where_everything_skipped_is_never_a_pass(categorized, target):
    tests = by_name(categorized, "test_older_kernel", "test_kernel_config", "test_known_bug")
    verdict = results.judge("exited", 0, tests, [], target=target)
    assert (verdict.exit_code, verdict.label) == (ExitCode.TEST_FAILURE, "nothing tested")


def test_a_known_bug_that_no_longer_fails_fails_the_run_and_says_to_retire_it(categorized):
    tests = by_name(categorized, "test_passes", "test_fixed_bug")
    verdict = results.judge("exited", 1, tests, [])
    assert verdict.exit_code == ExitCode.TEST_FAILURE
    assert "1 known bug(s) no longer reproduce (XPASS): retire" in verdict.reason


def test_an_unknown_target_is_a_bug_not_a_lenient_verdict():
    with pytest.raises(ValueError):
        results.judge("exited", 0, [], [], target="laptop")


# --- the vm/ssh fact travels through summary.json to `parse` ---------------------------------


def saved_run(out: Path, tests: list[results.TestResult], summary: dict | None) -> Path:
    """An output directory with junit.xml built from `tests`, exit code 0 and a clean console."""
    out.mkdir()
    cases = []
    for t in tests:
        module, name = t.name.split("::")
        inner = {"passed": "", "skipped": f'<skipped type="pytest.skip" message="{t.message}"/>',
                 "xfailed": f'<skipped type="pytest.xfail" message="{t.message}"/>'}[t.outcome]
        cases.append(f'<testcase classname="{module}" name="{name}" time="0.1">{inner}'
                     "</testcase>")
    (out / "junit.xml").write_text("<testsuites><testsuite>" + "".join(cases)
                                   + "</testsuite></testsuites>")
    (out / "pytest-exitcode").write_text("0\n")
    (out / "console.log").write_text((FIXTURES / "console-tcg-boot-start.log").read_text())
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(dict(summary, schema_version=2)))
    return out


ENVIRONMENT_SKIP = [results.TestResult("m::ok", "passed", "", 0),
                    results.TestResult("m::iter", "skipped",
                                       "[environment] policy refused BPF_PROG_TYPE_TRACING", 0)]


@pytest.mark.parametrize("summary, expected", [
    ({"target_kind": "ssh", "boot": {"status": "exited"}}, ExitCode.PASS),
    ({"target_kind": "vm", "boot": {"status": "exited"}}, ExitCode.TEST_FAILURE),
    # Summaries from before target_kind: an SSH run recorded its target's facts.
    ({"target": {"release": "6.1.0"}, "boot": {"status": "exited"}}, ExitCode.PASS),
    ({"boot": {"status": "exited"}}, ExitCode.TEST_FAILURE),
    (None, ExitCode.TEST_FAILURE),
])
def test_parse_rejudges_with_the_rule_of_the_runs_target(tmp_path, summary, expected):
    out = saved_run(tmp_path / "run", ENVIRONMENT_SKIP, summary)
    proc = subprocess.run([sys.executable, "-m", "runner.commands.cli", "parse", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == expected, proc.stdout + proc.stderr
    assert "1 x [environment] policy refused BPF_PROG_TYPE_TRACING" in proc.stdout


def test_summary_records_counts_skip_reasons_and_tally(categorized):
    tests = by_name(categorized, *ALLOWED_IN_GUEST)
    verdict = results.judge("exited", 0, tests, [])
    summary = record.RunRecord()
    pipeline.record_verdict(summary, verdict, tests, [], 0)
    assert summary.counts["xfailed"] == 1
    assert summary.counts["skipped_by_category"] == {"older kernel": 1, "kernel config": 1}
    assert [r["category"] for r in summary.skip_reasons] == ["kernel config", "older kernel"]
    assert (summary.verdict, summary.exit_code) == ("pass", 0)
    assert summary.tally == verdict.tally


# --- a guest that never started pytest is infrastructure, not a crash -------------------------


def console(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize("fixture, pytest_exit, junit, quoted", [
    # The checkout under /var/tmp: dash cannot cd, the venv's python is not there,
    # and the output directory is gone too (no exit-code file, no JUnit).
    ("console-masked-checkout-dash.log", None, None,
     "sh: 1: cd: can't cd to /var/tmp/x/selftests"),
    # bash as the guest's shell, an interpreter without pytest: exit 1, no JUnit.
    ("console-no-pytest-bash.log", "1", None, "/usr/bin/python3: No module named pytest"),
    # The suite's conftest cannot be imported: pytest exits 4 before its header.
    ("console-conftest-importerror.log", "4", None,
     "ImportError while loading conftest '/tmp/vt/suite/conftest.py'."),
    # Only --suite hidden: pytest starts, collects nothing, writes an empty JUnit.
    ("console-masked-suite-dash.log", "4",
     '<testsuites><testsuite tests="0"/></testsuites>',
     "ERROR: file or directory not found: /var/tmp/x/selftests"),
    # Only --output hidden: the tests ran, but nothing came back to the host.
    ("console-masked-output-dash.log", None, None,
     "guest-kernel-release: Directory nonexistent"),
])
def test_a_guest_that_could_not_start_the_tests_is_infrastructure(tmp_path, fixture,
                                                                   pytest_exit, junit, quoted):
    out = tmp_path / "run"
    out.mkdir()
    (out / "console.log").write_text(console(fixture))
    if pytest_exit is not None:
        (out / "pytest-exitcode").write_text(pytest_exit + "\n")
    if junit is not None:
        (out / "junit.xml").write_text(junit)
    verdict, _, _, _ = pipeline.judge_output_dir(out, "exited")
    assert (verdict.exit_code, verdict.label) == (ExitCode.INFRASTRUCTURE, "infrastructure")
    assert verdict.reason.startswith("the guest could not start the tests, not a kernel "
                                     "problem: ")
    assert quoted in verdict.reason


def test_the_masked_checkout_quotes_every_failed_step():
    lines = results.startup_failure(console("console-masked-checkout-dash.log"))
    assert lines == [
        "sh: 1: cd: can't cd to /var/tmp/x/selftests",
        ("sh: 1: cannot create /var/tmp/x/runs/20261202T030000Z/guest-kernel-release: "
         "Directory nonexistent"),
        "sh: 1: /var/tmp/x/.venv/bin/python3: not found",
        ("sh: 1: cannot create /var/tmp/x/runs/20261202T030000Z/pytest-exitcode: "
         "Directory nonexistent"),
    ]


def test_a_clean_boot_and_a_mid_suite_panic_are_not_startup_failures():
    assert results.startup_failure(console("console-tcg-boot-start.log")) == []
    assert results.startup_failure(console("console-sysrq-panic-6.1.log")) == []
    # After pytest's header a test may print anything; kernel lines never count.
    text = ("[    1.0] ACPI: _OSC not found\n"
            "============================= test session starts ==============================\n"
            "test_x.py::test_a sh: 1: foo: not found\n"
            "ImportError: cannot import name 'x'\n")
    assert results.startup_failure(text) == []


def test_a_guest_that_died_after_pytest_started_is_still_a_crash(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "console.log").write_text(console("console-sysrq-panic-6.1.log")
                                     .split("[  156.700522]")[0])
    verdict, _, _, _ = pipeline.judge_output_dir(out, "exited")
    assert verdict.exit_code == ExitCode.SPLAT


def test_a_splat_during_boot_outranks_a_failed_command():
    splat = type("Splat", (), {"kind": "BUG", "line": 3})()
    verdict = results.judge("exited", None, None, [splat],
                            console=console("console-masked-checkout-dash.log"))
    assert verdict.exit_code == ExitCode.SPLAT


@pytest.mark.parametrize("codes, expected", [
    ([0, 0], ExitCode.PASS),
    ([0, 1], ExitCode.TEST_FAILURE),
    ([1, 4, 0], ExitCode.TIMEOUT),
    ([1, 3, 4], ExitCode.SPLAT),
    ([3, 7], ExitCode.INFRASTRUCTURE),
    ([7, 8, 3], ExitCode.RUNNER_BUG),
    ([0, None], ExitCode.INFRASTRUCTURE),
    ([3, None], ExitCode.INFRASTRUCTURE),
    ([0, 99], ExitCode.RUNNER_BUG),
])
def test_several_runs_sum_up_to_one_code(codes, expected):
    assert results.overall_exit_code(codes) == expected
