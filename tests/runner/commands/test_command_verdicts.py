"""One verdict path: a plain run, bench, matrix, regressions, mutants and bisect agree.

Each command runs for real down to the boot stage: the kernel provider is a
stand-in, and the VM target's boot is replaced by a fake guest that leaves the
files a real one leaves (junit.xml, exit-code file, console.log from real
fixtures) or raises like a bug would.  Judging, summary.json and the exit code
are the real code, results.judge for one run and results.overall_exit_code for many.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import HIDDEN_CHECKOUT, HIDDEN_CHECKOUT_REASON, TESTS

from runner import record
from runner.commands import (
    bench,
    bisect,
    cli,
    matrix,
    mutants,
    pipeline,
    regression_verdict,
    regressions,
)
from runner.errors import ExitCode
from runner.stages.results import BootStatus

# The runner refuses a checkout its guests cannot see before anything these tests check.
pytestmark = pytest.mark.skipif(bool(HIDDEN_CHECKOUT), reason=HIDDEN_CHECKOUT_REASON)

FIXTURES = TESTS / "fixtures"
CLEAN = (FIXTURES / "runner" / "console-tcg-boot-start.log").read_text()
OOPS = (FIXTURES / "splats" / "oops-null-deref-6.1-qemu.log").read_text()
NEVER_STARTED = (FIXTURES / "runner" / "console-masked-checkout-dash.log").read_text()
EXPECTED_TEST = "test_x.py::test_the_bug"


def junit(*cases: tuple[str, str]) -> str:
    body = {"passed": "", "failed": '<failure message="assert 1 == 2">boom</failure>',
            "skipped": '<skipped type="pytest.skip" message="[older kernel] lacks it (5.9+)"/>'}
    return ("<testsuites><testsuite>" + "".join(
        f'<testcase classname="test_x" name="{name}" time="0.1">{body[outcome]}</testcase>'
        for name, outcome in cases) + "</testsuite></testsuites>")


PASSING = junit(("test_ok", "passed"), ("test_the_bug", "passed"), ("test_new", "skipped"))
FAILING = junit(("test_ok", "passed"), ("test_the_bug", "failed"))


def write_guest(out: Path, scenario: str, bench_run: bool) -> str:
    """What a guest leaves for `scenario`; returns the boot status."""
    console, status = CLEAN, "exited"
    if scenario == "splat":
        console += OOPS
    elif scenario == "infrastructure":
        console = NEVER_STARTED
    elif scenario == "timeout":
        status = "timeout"
    finished = scenario in ("pass", "test failure", "splat")
    if bench_run and finished:
        failed = scenario == "test failure"
        (out / bench.BENCH_EXIT_FILE).write_text("1\n" if failed else "0\n")
        if failed:
            console += "bench: FAILED: sk_storage with 64 sockets: 3 counters wrong\n"
        else:
            shutil.copy(FIXTURES / "bench" / "tcg-1024.json", out / bench.BENCH_JSON)
    elif finished:
        (out / "junit.xml").write_text(FAILING if scenario == "test failure" else PASSING)
        (out / "pytest-exitcode").write_text("1\n" if scenario == "test failure" else "0\n")
    (out / "console.log").write_text(console)
    return status


@pytest.fixture
def fake_guest(monkeypatch):
    """Replace the kernel provider and the VM's boot; returns a setter for the scenario."""
    state = {"scenario": "pass"}

    class StandInKernel:
        """A KernelProvider that has its kernel already."""

        def tools(self):
            return []

        def obtain(self, out, timings, summary, log):
            return pipeline.KernelToBoot(Path("/boot/fake-bzImage"), "fake", "6.1.0-fake")

    def boot_and_record(kernel, out, command, plan, options, cache, summary, log):
        if state["scenario"] == "runner bug":
            raise RuntimeError("the boot stage tripped over its own feet")
        status = write_guest(out, state["scenario"], " -m bench " in command)
        summary.accel = record.AccelRecord("tcg", "test")
        summary.boot = record.BootRecord(BootStatus(status), status)
        return SimpleNamespace(status=status)

    monkeypatch.setattr(pipeline, "kernel_provider", lambda options, cache: StandInKernel())
    monkeypatch.setattr(pipeline, "boot_and_record", boot_and_record)
    monkeypatch.setattr(pipeline.preflight, "check", lambda requirements: None)
    return lambda scenario: state.update(scenario=scenario)


RUN_CODES = [("pass", ExitCode.PASS), ("test failure", ExitCode.TEST_FAILURE),
             ("splat", ExitCode.SPLAT), ("timeout", ExitCode.TIMEOUT),
             ("infrastructure", ExitCode.INFRASTRUCTURE), ("runner bug", ExitCode.RUNNER_BUG)]


def common(tmp_path: Path) -> list[str]:
    return ["--accel", "tcg", "--cache-dir", str(tmp_path / "cache"),
            "--output", str(tmp_path / "out")]


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("scenario, code", RUN_CODES)
def test_plain_run(tmp_path, fake_guest, scenario, code):
    fake_guest(scenario)
    assert cli.main(["--distro-kernel", "6.1", *common(tmp_path)]) == code
    assert summary_of(tmp_path / "out")["exit_code"] == code


@pytest.mark.parametrize("scenario, code", RUN_CODES)
def test_bench(tmp_path, fake_guest, scenario, code, capsys):
    fake_guest(scenario)
    assert cli.main(["bench", "--distro-kernel", "6.1", *common(tmp_path)]) == code
    summary = summary_of(tmp_path / "out")
    assert summary["exit_code"] == code
    if scenario == "infrastructure":
        assert "can't cd to /var/tmp/x/selftests" in summary["reason"]
    if scenario == "pass":
        assert "sk storage" in capsys.readouterr().out  # the table was rendered


@pytest.mark.parametrize("scenario, code", RUN_CODES)
def test_matrix(tmp_path, fake_guest, scenario, code):
    fake_guest(scenario)
    assert cli.main(["matrix", "--kernels", "distro:6.1", *common(tmp_path)]) == code
    kernel = json.loads((tmp_path / "out" / matrix.MATRIX_JSON).read_text())["kernels"][0]
    assert kernel["exit_code"] == code


def test_matrix_reports_the_least_trustworthy_kernel(tmp_path, fake_guest, monkeypatch):
    scenarios = iter(["splat", "pass", "infrastructure"])
    real = pipeline.run_recorded

    def one_kernel(options, log):
        fake_guest(next(scenarios))
        return real(options, log)

    monkeypatch.setattr(pipeline, "run_recorded", one_kernel)
    code = cli.main(["matrix", "--kernels", "distro:5.10,distro:6.1,distro:6.12",
                     *common(tmp_path)])
    assert code == ExitCode.INFRASTRUCTURE
    codes = [k["exit_code"] for k in
             json.loads((tmp_path / "out" / matrix.MATRIX_JSON).read_text())["kernels"]]
    assert codes == [3, 0, 7]


@pytest.fixture
def one_regression(tmp_path) -> Path:
    patch = tmp_path / "0001-reintroduce-the-bug.patch"
    patch.write_text("--- a/x\n+++ b/x\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"id": "the-bug", "patch": patch.name, "bug": "a bug",
                                     "expected_failing": [EXPECTED_TEST]}]))
    return manifest


# Whether a re-introduced bug was caught: a failing expected test or a splat the run's own
# verdict caught means yes (0); a clean run or a silent timeout is a miss (1); a run that
# could not judge the kernel keeps its code.
REGRESSION_CODES = [("pass", ExitCode.TEST_FAILURE, regression_verdict.MISSED),
                    ("test failure", ExitCode.PASS, regression_verdict.CAUGHT),
                    ("splat", ExitCode.PASS, regression_verdict.CAUGHT_VERDICT),
                    ("timeout", ExitCode.TEST_FAILURE, regression_verdict.SILENT_DEATH),
                    ("infrastructure", ExitCode.INFRASTRUCTURE, regression_verdict.ERROR),
                    ("runner bug", ExitCode.RUNNER_BUG, regression_verdict.ERROR)]


@pytest.mark.parametrize("scenario, code, caught", REGRESSION_CODES)
def test_regressions(tmp_path, fake_guest, one_regression, scenario, code, caught):
    fake_guest(scenario)
    argv = ["regressions", "--manifest", str(one_regression), *common(tmp_path)]
    assert cli.main(argv) == code
    table = json.loads((tmp_path / "out" / regressions.REGRESSIONS_JSON).read_text())
    row = table["regressions"][0]
    assert row["caught"] == caught
    assert table["caught"] == (1 if caught in regression_verdict.CAUGHT_LABELS else 0)
    if scenario == "splat":
        assert "the run's verdict caught it: kernel splat" in row["note"]
        assert "1 of 1 caught." in (tmp_path / "out" / regressions.REGRESSIONS_MD).read_text()


# A mutant is killed by what kills a regression's kernel (a failing test, a splat, a hang);
# a run that could not judge the kernel is an error with that run's code.
MUTANT_STATUSES = [("pass", mutants.SURVIVED, ExitCode.TEST_FAILURE),
                   ("test failure", mutants.KILLED, ExitCode.PASS),
                   ("splat", mutants.KILLED, ExitCode.PASS),
                   ("timeout", mutants.KILLED, ExitCode.PASS),
                   ("infrastructure", mutants.ERROR, ExitCode.INFRASTRUCTURE),
                   ("runner bug", mutants.ERROR, ExitCode.RUNNER_BUG)]


@pytest.mark.parametrize("scenario, status, code", MUTANT_STATUSES)
def test_mutants(tmp_path, fake_guest, scenario, status, code):
    fake_guest(scenario)
    mutant = mutants.Mutant("the-mutant", "net/core/bpf_sk_storage.c", "a", "b", "a bug")
    out = tmp_path / mutant.id
    options = pipeline.RunOptions(accel="tcg", cache_dir=tmp_path / "cache", output=out)
    seconds, error = regressions.run_one(options, out, lambda line: None, False)
    row = mutants.outcome_from_dir(mutant, out, seconds, error)
    assert row.status == status
    assert mutants.exit_code([row]) == code


# What one bisect step makes of each verdict: the run's own exit code decides, so a commit
# is judged by the same verdict as a plain run.  A crash with no failing test, a hang and
# an infrastructure failure say nothing about the commit (retried, here 0 times, then
# skipped); a bug in the runner stops the bisect.
BISECT_STEPS = [("pass", ExitCode.PASS, bisect.GOOD),
                ("test failure", ExitCode.TEST_FAILURE, bisect.BAD),
                ("splat", ExitCode.SPLAT, bisect.SKIP),
                ("timeout", ExitCode.TIMEOUT, bisect.SKIP),
                ("infrastructure", ExitCode.INFRASTRUCTURE, bisect.SKIP),
                ("runner bug", ExitCode.RUNNER_BUG, bisect.ABORT)]


@pytest.mark.parametrize("scenario, code, outcome", BISECT_STEPS)
def test_bisect_step(tmp_path, fake_guest, scenario, code, outcome):
    fake_guest(scenario)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("one commit\n")
    for command in (["init", "-q"], ["add", "file"],
                    ["-c", "user.name=t", "-c", "user.email=t@test.invalid",
                     "commit", "-q", "-m", "the commit"]):
        subprocess.run(["git", "-C", str(tree), *command], check=True)
    options = pipeline.RunOptions(accel="tcg", cache_dir=tmp_path / "cache")
    result = bisect.run_step(tree, options, 1, tmp_path / "step", log=lambda line: None,
                             retries=0)
    assert result.outcome == outcome
    assert summary_of(tmp_path / "step" / "run-1")["exit_code"] == code


def test_a_kmemleak_verdict_counts_as_caught(tmp_path):
    """--debug-kernel: no test failed, but kmemleak found leaked local storage (exit 3)."""
    out = tmp_path / "the-bug"
    out.mkdir()
    write_guest(out, "pass", bench_run=False)
    (out / "summary.json").write_text(json.dumps({
        "schema_version": 2, "boot": {"status": "exited"}, "verdict": "kmemleak", "exit_code": 3,
        "reason": "71 leaked object(s) allocated through BPF local storage"}))
    entry = regressions.Regression("the-bug", tmp_path / "p.patch", "bug", "fix",
                                   (EXPECTED_TEST,))
    row = regressions.outcome_from_dir(entry, out)
    assert row.caught == regression_verdict.CAUGHT_VERDICT
    assert regressions.exit_code([row]) == ExitCode.PASS


def test_a_usage_error_in_one_run_is_recorded_with_its_own_code(tmp_path):
    """A run that stops before its output exists still leaves a summary saying why."""
    options = pipeline.RunOptions(kernel_src=Path("/nonexistent"), output=tmp_path / "k",
                                  cache_dir=tmp_path / "cache")
    lines: list[str] = []
    code, error = pipeline.run_recorded(options, lines.append)
    assert code == ExitCode.USAGE and "no such directory" in error
    assert summary_of(tmp_path / "k")["exit_code"] == ExitCode.USAGE
    assert lines == [f"run-selftests: error: {error}"]



@pytest.mark.parametrize("command", [["bench"], ["matrix", "--kernels", "distro:6.1"],
                                     ["regressions"]])
def test_every_command_refuses_an_output_the_guest_cannot_see(tmp_path, command, capsys):
    hidden = "/var/cache/sk-storage-selftests-never-created/out"
    assert cli.main([*command, "--output", hidden, "--cache-dir",
                     str(tmp_path / "cache")]) == ExitCode.USAGE
    assert "is under /var/cache, which virtme-ng's guest covers" in capsys.readouterr().err
    assert not Path(hidden).parent.exists()
