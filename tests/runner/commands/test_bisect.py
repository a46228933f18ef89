"""The bisect driver and step on a scratch git repository with a stand-in for the pipeline.

Real git, real `git bisect run`, real subprocesses and signals; only the
kernel build and boot are replaced: the stand-in step reads a `behaviour`
file that each commit of the scratch repository sets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

from runner.commands import bisect, option_groups
from runner.errors import ExitCode, UsageError
from runner.stages import patches

# The stand-in for pipeline.run, driven by the commit's `behaviour` file.
STANDIN = textwrap.dedent('''\
    import json, os, shutil, signal, sys, time
    from pathlib import Path
    from runner import errors, record
    from runner.commands import bisect
    from runner.stages import patches

    SIGNATURE_TEST = "test_teardown::test_closed_sockets_leave_no_storage_in_the_map"

    def summary(out, verdict, tests=(), splats=(), kernel="/bin/false"):
        # A real ELF stands in for vmlinux, so the report can compare kernels.
        obj = out / "build" / "obj"
        obj.mkdir(parents=True)
        shutil.copy(kernel, obj / "vmlinux")
        record.write(out, record.parse({
            "schema_version": record.SCHEMA_VERSION, "verdict": verdict, "reason": verdict,
            "tests": list(tests), "splats": list(splats),
            "kernel": {"build_dir": str(out / "build")},
            "timings": {"build": 2.0, "guest": 3.0}}))

    def failed(out, name=SIGNATURE_TEST, kernel="/bin/false"):
        summary(out, "test failure", [
            {"name": "test_teardown::test_a", "outcome": "passed"},
            {"name": name, "outcome": "failed", "message": "assert 12 == 0"}], kernel=kernel)
        return 1

    def run_once(options, log):
        tree, out = Path(options.kernel_src), Path(options.output)
        out.mkdir(parents=True, exist_ok=True)
        behaviour = (tree / "behaviour").read_text().strip()
        run = int(out.name.split("-")[1])
        log(f"stand-in: {behaviour} (run {run}, -k {options.keyword}, "
            f"config {[p.name for p in options.config]})")
        if behaviour == "pass" or (behaviour == "flaky" and run != 2) or (
                behaviour == "boot-flake" and run != 1):
            summary(out, "pass", [{"name": "test_teardown::test_a", "outcome": "passed"}],
                    kernel="/bin/true")
            return 0
        if behaviour in ("fail", "flaky") or (behaviour == "infra-then-fail" and run != 1):
            return failed(out)
        if behaviour == "fail-same-kernel":
            return failed(out, kernel="/bin/true")
        if behaviour == "other-fail":
            return failed(out, name="test_map_create::test_something_else")
        if behaviour == "splat":
            summary(out, "kernel splat", [{"name": SIGNATURE_TEST, "outcome": "failed",
                                           "message": "kernel splat during the test"}],
                    splats=[{"kind": "KASAN", "line": 7,
                             "excerpt": "BUG: KASAN: use-after-free in bpf_sk_storage_free"}])
            return 3
        if behaviour == "boot-flake":
            summary(out, "crash", splats=[{"kind": "panic", "line": 3, "excerpt": "panic"}])
            return 3
        if behaviour == "timeout":
            summary(out, "timeout")
            return 4
        if behaviour == "nobuild":
            raise errors.BuildError("kernel build failed (make exit 2)")
        if behaviour in ("infra", "infra-then-fail"):
            raise errors.InfrastructureError("QEMU could not start: no space left")
        if behaviour == "bug":
            raise ValueError("boom")
        if behaviour in ("hang", "stubborn"):
            # Like the pipeline with a series applied: a tracked file changed,
            # journalled, and restored in `finally` (unless killed).
            journal = patches.Journal(Path(os.environ["STANDIN_JOURNAL"]))
            journal.record(tree, ["behaviour"])
            (tree / "behaviour").write_text("patched by the series\\n")
            if behaviour == "stubborn":
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            Path(os.environ["STANDIN_MARKER"]).write_text(str(os.getpid()))
            try:
                time.sleep(120)
            finally:
                journal.restore()
                journal.discard()
            return 0
        raise AssertionError(f"unknown behaviour {behaviour!r}")

    sys.exit(bisect.step_main(sys.argv[1:], run_once=run_once))
''')

# Runs the driver in its own process so a test can signal it like a terminal would.
HARNESS = textwrap.dedent('''\
    import json, sys
    from pathlib import Path
    from runner.commands import bisect
    from runner.interrupts import install_sigterm_handler

    install_sigterm_handler()
    bisect.STOP_GRACE = bisect.StopGrace(interrupt=2.0, terminate=0.5, kill=5.0)
    tree, good, bad, out, journal = (Path(a) for a in sys.argv[1:6])
    result = bisect.drive(tree, str(good), str(bad), sys.argv[6:], out, journal)
    sys.exit(bisect.report(tree, result, str(bad), print))
''')


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def make_repo(path: Path, behaviours: list[str]) -> list[str]:
    """A repository with one commit per behaviour; returns the commit ids, oldest first."""
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "bisect@test.invalid")
    git(path, "config", "user.name", "Bisect Test")
    commits = []
    for number, behaviour in enumerate(behaviours):
        (path / "behaviour").write_text(behaviour + "\n")
        (path / "history.txt").write_text(f"commit {number}\n")
        git(path, "add", "behaviour", "history.txt")
        git(path, "commit", "-q", "-m", f"c{number}: {behaviour}")
        commits.append(git(path, "rev-parse", "HEAD"))
    return commits


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    return script


def step_command(standin: Path, out: Path, runs: int = 1, keyword: str = "teardown") -> list:
    return [sys.executable, str(standin), "--output", str(out), "--runs", str(runs),
            "-k", keyword]


def assert_restored(tree: Path) -> None:
    """Back on the branch it started on, no bisect in progress, no change left behind."""
    assert git(tree, "symbolic-ref", "--short", "HEAD") == "main"
    assert not Path(git(tree, "rev-parse", "--path-format=absolute", "--git-path",
                        "BISECT_START")).exists()
    assert git(tree, "status", "--porcelain", "--untracked-files=no") == ""


def bisect_repo(tmp_path, standin, behaviours, runs=1, journal=None):
    tree = tmp_path / "tree"
    commits = make_repo(tree, behaviours)
    out = tmp_path / "out"
    lines: list[str] = []
    result = bisect.drive(tree, commits[0], commits[-1],
                          step_command(standin, out, runs), out, journal, log=lines.append)
    code = bisect.report(tree, result, commits[-1], lines.append)
    assert_restored(tree)
    return commits, result, code, "\n".join(lines)


# --- mapping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code, failing, outcome", [
    (ExitCode.PASS, [], "good"),
    (ExitCode.TEST_FAILURE, ["t::a"], "bad"),
    (ExitCode.SPLAT, ["t::a"], "bad"),        # a splat a selected test failed on
    (ExitCode.SPLAT, [], "retry"),            # the guest died with no test failing
    (ExitCode.TIMEOUT, [], "retry"),
    (ExitCode.INFRASTRUCTURE, [], "retry"),
    (ExitCode.BUILD_FAILURE, [], "skip"),
    (ExitCode.PATCH_FAILURE, [], "skip"),
    (ExitCode.USAGE, [], "abort"),
    (ExitCode.INTERRUPTED, [], "abort"),
    (42, [], "abort"),
    (-9, [], "abort"),
])
def test_exit_codes_map_to_bisect_labels(code, failing, outcome):
    assert bisect.run_outcome(int(code), failing) == outcome


def test_git_exit_codes_are_what_git_bisect_run_understands():
    assert bisect.GIT_EXIT == {"good": 0, "bad": 1, "skip": 125, "abort": 255}
    assert 128 <= bisect.GIT_EXIT["abort"] <= 255


# --- whole bisects ---------------------------------------------------------------------------


def test_names_the_first_failing_commit_and_why(tmp_path, standin):
    commits, result, code, text = bisect_repo(
        tmp_path, standin, ["pass"] * 5 + ["fail"] * 4)
    assert (result.status, result.first_bad, code) == ("found", commits[5], 0)
    assert f"first bad commit: {commits[5][:12]} c5: fail" in text
    assert "failed: test_teardown::test_closed_sockets_leave_no_storage_in_the_map: " \
           "assert 12 == 0" in text
    # Each step's label matches the behaviour of the commit it tested.
    by_commit = {c: b for c, b in zip(commits, ["good"] * 5 + ["bad"] * 4)}
    assert result.steps and all(s["outcome"] == by_commit[s["commit"]] for s in result.steps)
    # The -k expression reached the runs, and every step has its own directory.
    for step in result.steps:
        assert Path(step["dir"], "verdict.json").exists()
        assert Path(step["dir"], "run-1", "summary.json").exists()
    assert "-k teardown" in (tmp_path / "out" / bisect.BISECT_RUN_LOG).read_text()
    saved = json.loads((tmp_path / "out" / bisect.RESULT_FILE).read_text())
    assert saved["first_bad"] == commits[5] and len(saved["steps"]) == len(result.steps)


def test_a_splat_marks_the_commit_bad_and_is_reported(tmp_path, standin):
    commits, result, code, text = bisect_repo(
        tmp_path, standin, ["pass"] * 3 + ["splat"] * 3)
    assert result.first_bad == commits[3] and code == 0
    assert "splat: KASAN at console line 7:" in text
    assert "BUG: KASAN: use-after-free in bpf_sk_storage_free" in text


def test_commits_that_do_not_build_are_skipped_not_blamed(tmp_path, standin):
    behaviours = ["pass"] * 4 + ["nobuild", "pass"] + ["fail"] * 3
    commits, result, code, text = bisect_repo(tmp_path, standin, behaviours)
    assert (result.status, result.first_bad, code) == ("found", commits[6], 0)
    skipped = [s for s in result.steps if s["outcome"] == "skip"]
    assert [s["commit"] for s in skipped] == [commits[4]]
    assert "kernel build failed" in skipped[0]["reason"]
    assert f"first bad commit: {commits[6][:12]} c6: fail" in text


def test_skips_next_to_the_answer_leave_candidates(tmp_path, standin):
    behaviours = ["pass"] * 4 + ["nobuild"] + ["fail"] * 3
    commits, result, code, text = bisect_repo(tmp_path, standin, behaviours)
    assert result.status == "inconclusive" and code == ExitCode.BUILD_FAILURE
    assert set(result.candidates) == {commits[4], commits[5]}
    assert f"{commits[4][:12]} c4: nobuild" in text


def test_a_runner_bug_aborts_without_labelling(tmp_path, standin):
    behaviours = ["pass"] * 4 + ["bug"] + ["fail"] * 4
    commits, result, code, text = bisect_repo(tmp_path, standin, behaviours)
    assert result.status == "aborted" and result.first_bad is None
    assert code == ExitCode.INFRASTRUCTURE
    assert result.steps[-1]["commit"] == commits[4] and result.steps[-1]["outcome"] == "abort"
    assert f"aborted at {commits[4][:12]}" in text and "runner bug: ValueError: boom" in text
    log = (tmp_path / "out" / bisect.GIT_BISECT_LOG).read_text()
    labelled = [line for line in log.splitlines() if not line.startswith("#")]
    assert not any(commits[4] in line for line in labelled)


@pytest.mark.parametrize("behaviour, why", [
    ("infra", "QEMU could not start"),
    ("timeout", "timeout"),
    ("boot-flake-forever", None),
])
def test_infrastructure_failures_are_retried_then_skipped_never_bad(
        tmp_path, standin, behaviour, why):
    if behaviour == "boot-flake-forever":
        behaviour, why = "splat-no-test", "crash"
    # The injected commit c4 is the one git tests first; c7 is the answer either way.
    behaviours = ["pass"] * 4 + [behaviour] + ["pass"] * 2 + ["fail"] * 2
    if behaviour == "splat-no-test":
        # Run 1's guest dies with no test failing, the retry passes: good after one retry.
        behaviours[4] = "boot-flake"
    commits, result, code, text = bisect_repo(tmp_path, standin, behaviours)
    assert (result.status, result.first_bad, code) == ("found", commits[7], 0), text
    tested = [s for s in result.steps if s["commit"] == commits[4]]
    assert tested, "git never tested the injected commit; the test proves nothing"
    step = tested[0]
    if behaviours[4] == "boot-flake":
        assert step["outcome"] == "good" and len(step["runs"]) == 2
        assert step["runs"][0]["outcome"] == "retry"
        # The label is good, and the reason says a run was retried and why.
        assert step["reason"] == "1 run(s) passed after 1 retried run(s) (crash)"
    else:
        assert step["outcome"] == "skip" and why in step["reason"]
        # One run and the default two retries, then skipped.
        assert len(step["runs"]) == 1 + bisect.DEFAULT_RETRIES
        assert step["reason"].startswith("not judged after 2 retries")
    assert all(s["outcome"] != "bad" for s in tested)


def test_an_infrastructure_failure_next_to_the_answer_is_never_blamed(tmp_path, standin):
    behaviours = ["pass"] * 4 + ["infra"] + ["fail"] * 3
    commits, result, code, _text = bisect_repo(tmp_path, standin, behaviours)
    assert result.status == "inconclusive" and commits[4] in result.candidates
    assert result.first_bad is None
    # Inconclusive for an infrastructure reason: 7, not 5 (kernel build failure).
    assert code == ExitCode.INFRASTRUCTURE


@pytest.mark.parametrize("codes, expected", [
    ([ExitCode.BUILD_FAILURE], ExitCode.BUILD_FAILURE),
    ([ExitCode.PATCH_FAILURE], ExitCode.PATCH_FAILURE),
    ([ExitCode.TIMEOUT, ExitCode.TIMEOUT], ExitCode.TIMEOUT),
    ([ExitCode.SPLAT], ExitCode.INFRASTRUCTURE),   # a guest that died with no test failing
    ([ExitCode.INFRASTRUCTURE], ExitCode.INFRASTRUCTURE),
    ([ExitCode.BUILD_FAILURE, ExitCode.INFRASTRUCTURE], ExitCode.INFRASTRUCTURE),
])
def test_an_inconclusive_bisect_exits_with_why_its_candidates_were_skipped(codes, expected):
    steps = [{"commit": f"c{n}", "outcome": "skip", "runs": [{"exit_code": int(code)}]}
             for n, code in enumerate(codes)]
    steps.append({"commit": "c9", "outcome": "skip",  # not a candidate: does not count
                  "runs": [{"exit_code": int(ExitCode.PATCH_FAILURE)}]})
    candidates = [f"c{n}" for n in range(len(codes))] + ["c8"]
    assert bisect.inconclusive_exit_code(steps, candidates) == expected


def test_a_retry_that_then_fails_labels_the_commit_bad(tmp_path, standin):
    behaviours = ["pass"] * 4 + ["infra-then-fail"] + ["fail"] * 3
    commits, result, code, _text = bisect_repo(tmp_path, standin, behaviours)
    assert result.first_bad == commits[4] and code == 0
    step = next(s for s in result.steps if s["commit"] == commits[4])
    assert [r["outcome"] for r in step["runs"]] == ["retry", "bad"]
    assert step["reason"].startswith("run 2: ")


def test_a_commit_failing_only_other_tests_is_skipped_not_blamed(tmp_path, standin):
    behaviours = ["pass"] * 4 + ["other-fail"] + ["pass"] * 2 + ["fail"] * 2
    commits, result, _code, text = bisect_repo(tmp_path, standin, behaviours)
    assert (result.status, result.first_bad) == ("found", commits[7]), text
    assert result.signature == ["test_teardown::test_closed_sockets_leave_no_storage_in_the_map"]
    step = next(s for s in result.steps if s["commit"] == commits[4])
    assert step["outcome"] == "skip"
    assert "test_map_create::test_something_else" in step["reason"]


@pytest.mark.parametrize("runs, first_bad", [(1, 5), (3, 4)])
def test_runs_catch_a_flaky_failure(tmp_path, standin, runs, first_bad):
    # c4 fails only on its second run: one run calls it good, three call it bad.
    behaviours = ["pass"] * 4 + ["flaky"] + ["fail"] * 3
    commits, result, code, text = bisect_repo(tmp_path, standin, behaviours, runs=runs)
    assert result.first_bad == commits[first_bad] and code == 0
    assert f"first bad commit: {commits[first_bad][:12]}" in text
    flaky = [s for s in result.steps if s["commit"] == commits[4]]
    if runs == 3:
        assert flaky[0]["outcome"] == "bad" and len(flaky[0]["runs"]) == 2
        assert flaky[0]["reason"].startswith("run 2: ")
    good = [s for s in result.steps if s["outcome"] == "good"]
    assert all(len(s["runs"]) == runs for s in good)


# --- interruption ------------------------------------------------------------------------------


def start_harness(tmp_path, standin, behaviour):
    tree = tmp_path / "tree"
    commits = make_repo(tree, ["pass"] * 4 + [behaviour] + ["fail"] * 4)
    out, journal, marker = tmp_path / "out", tmp_path / "journal", tmp_path / "marker"
    (tmp_path / "harness.py").write_text(HARNESS)
    env = dict(os.environ, STANDIN_JOURNAL=str(journal), STANDIN_MARKER=str(marker))
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "harness.py"), str(tree), commits[0], commits[-1],
         str(out), str(journal), *step_command(standin, out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the step never reached the hanging commit"
        time.sleep(0.1)
    time.sleep(0.2)
    assert (tree / "behaviour").read_text() == "patched by the series\n"
    return tree, process, int(marker.read_text())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_driver_stops_the_step_and_resets_the_tree(tmp_path, standin, sig):
    tree, process, step_pid = start_harness(tmp_path, standin, "hang")
    process.send_signal(sig)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == ExitCode.INTERRUPTED, output
    assert "interrupted" in output
    assert not pid_alive(step_pid)
    assert_restored(tree)
    assert (tree / "behaviour").read_text() == "fail\n"


def test_a_step_that_ignores_signals_is_killed_and_its_series_removed(tmp_path, standin):
    tree, process, step_pid = start_harness(tmp_path, standin, "stubborn")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == ExitCode.INTERRUPTED, output
    assert not pid_alive(step_pid)
    assert "removed the series a stopped step left in 1 file(s)" in output
    assert_restored(tree)


# --- refusals -----------------------------------------------------------------------------------


def test_refuses_trees_a_bisect_would_trip_over(tmp_path):
    tree = tmp_path / "tree"
    commits = make_repo(tree, ["pass", "pass", "fail"])
    with pytest.raises(UsageError, match="no such commit"):
        bisect.check_tree(tree, "v0.0-nonexistent", commits[-1])
    with pytest.raises(UsageError, match="not an ancestor"):
        bisect.check_tree(tree, commits[2], commits[0])
    with pytest.raises(UsageError, match="same commit"):
        bisect.check_tree(tree, commits[1], commits[1])
    (tree / "history.txt").write_text("edited\n")
    with pytest.raises(UsageError, match="uncommitted changes"):
        bisect.check_tree(tree, commits[0], commits[-1])
    git(tree, "checkout", "history.txt")
    git(tree, "bisect", "start", commits[-1], commits[0])
    with pytest.raises(UsageError, match="already in progress"):
        bisect.check_tree(tree, commits[0], commits[-1])
    git(tree, "bisect", "reset")
    assert bisect.check_tree(tree, "HEAD~2", "HEAD") == (commits[0], commits[-1])
    with pytest.raises(UsageError, match="not in a git tree"):
        bisect.find_tree(tmp_path)


def test_a_step_that_cannot_start_stops_the_bisect_instead_of_blaming(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bisect.step_main(["--runs", "not-a-number"]) == 255
    assert bisect.step_main(["--distro-kernel", "6.1"]) == 255
    assert bisect.step_main(["--kernel-src", str(tmp_path)]) == 255  # not a git tree


@pytest.mark.parametrize("option", [["--base", "v6.1"], ["--kernel-image", "i"], ["--modules", "m"],
                                    ["--distro-kernel", "6.1"], ["--shell"], ["--target", "t"]])
def test_a_bisect_does_not_offer_options_it_cannot_use(option):
    # It builds every commit of the tree it bisects.
    parser = option_groups.Parser(prog="run-selftests bisect")
    bisect.add_arguments(parser)
    with pytest.raises(UsageError, match="unrecognized arguments"):
        parser.parse_args(["--good", "v1", "--bad", "v2", *option])


def test_step_arguments_round_trip_every_step_option(tmp_path):
    series = tmp_path / "series"
    series.write_text("")
    fragment = tmp_path / "extra.config"
    fragment.write_text("CONFIG_X=y\n")
    driver = argparse.ArgumentParser()
    bisect.add_arguments(driver)
    args = driver.parse_args(["--good", "v1", "--bad", "v2", "-k", "teardown and not slow",
                              "--series", str(series), "--config", str(fragment), "--runs",
                              "3", "-m", "", "--timeout", "600", "--accel", "tcg", "-j", "3",
                              "--force", "--cache-dir", str(tmp_path / "c"), "--cpus", "1",
                              "--memory", "3G", "--stall-timeout", "60", "--debug-kernel",
                              "--verbose", "--retries", "0", "--signature", "t::a",
                              "--signature", "t::b", "--suite", str(tmp_path)])
    step = argparse.ArgumentParser()
    bisect.add_step_arguments(step)
    parsed = step.parse_args(bisect.step_arguments(args, tmp_path / "tree", tmp_path / "o"))
    assert parsed.kernel_src == tmp_path / "tree" and parsed.output == tmp_path / "o"
    dests = {a.dest for a in step._actions if a.option_strings and a.dest != "help"}
    for dest in dests - {"kernel_src", "output"}:
        # Every option was given a value other than its default, and each comes back.
        assert getattr(args, dest) != step.get_default(dest), dest
        assert getattr(parsed, dest) == getattr(args, dest), dest


def test_restore_tree_replays_a_left_over_journal(tmp_path):
    tree = tmp_path / "tree"
    commits = make_repo(tree, ["pass", "fail"])
    git(tree, "bisect", "start", commits[1], commits[0])
    journal = patches.Journal(tmp_path / "journal")
    journal.record(tree, ["behaviour"])
    (tree / "behaviour").write_text("patched\n")
    lines: list[str] = []
    assert bisect.restore_tree(tree, tmp_path / "journal", lines.append)
    assert_restored(tree)
    assert not journal.exists()


def test_parses_what_git_bisect_run_prints():
    sha = "a" * 40
    assert bisect.parse_bisect_output(f"x\n{sha} is the first bad commit\ncommit {sha}\n") == \
        ("found", sha, [])
    text = ("There are only 'skip'ped commits left to test.\n"
            "The first bad commit could be any of:\n" + "b" * 40 + "\n" + "c" * 40 +
            "\nWe cannot bisect more!\n")
    assert bisect.parse_bisect_output(text) == ("inconclusive", None, ["b" * 40, "c" * 40])
    assert bisect.parse_bisect_output("bisect run failed: exit code 255")[0] == "aborted"


def test_the_subcommand_refuses_an_output_directory_holding_another_bisect(tmp_path,
                                                                         monkeypatch):
    tree = tmp_path / "tree"
    make_repo(tree, ["pass", "fail"])
    for name in ("Makefile", "Kconfig"):
        (tree / name).write_text("")
    out = tmp_path / "out"
    (out / bisect.STEPS_DIR / "01-abc").mkdir(parents=True)
    parser = argparse.ArgumentParser()
    bisect.add_arguments(parser)
    args = parser.parse_args(["--kernel-src", str(tree), "--good", "HEAD~1", "--bad", "HEAD",
                              "--output", str(out), "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(UsageError, match="already holds the steps of a bisect"):
        bisect.main(args)
    assert_restored(tree)


# --- endpoints, signatures and kernels -----------------------------------------------------------


@pytest.mark.parametrize("behaviours, refusal", [
    (["fail", "pass", "fail"], "--good .* fails too .*test_closed_sockets.*pick an older --good"),
    (["pass", "fail", "pass"], "--bad .* passes the selected tests"),
    (["pass", "pass", "nobuild"], "--bad .* could not be judged \\(skip: kernel build failed"),
])
def test_endpoints_are_checked_before_bisecting(tmp_path, standin, behaviours, refusal):
    tree = tmp_path / "tree"
    commits = make_repo(tree, behaviours)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=refusal) as caught:
        bisect.drive(tree, commits[0], commits[-1], step_command(standin, out), out,
                     log=lambda line: None)
    assert "\n" not in caught.value.message
    assert_restored(tree)
    # git bisect run never started: only the endpoint checks ran.
    assert not (out / bisect.GIT_BISECT_LOG).exists()
    assert {s["commit"] for s in bisect.load_steps(out)} <= {commits[0], commits[-1]}
    # bisect.json says the bisect was refused and why, not that it was aborted.
    saved = json.loads((out / bisect.RESULT_FILE).read_text())
    assert saved["status"] == "refused" and saved["reset_ok"] is True
    assert saved["messages"] == [caught.value.message]


def test_the_report_says_when_the_culprit_builds_its_parents_kernel(tmp_path, standin):
    commits, result, _code, text = bisect_repo(
        tmp_path, standin, ["pass", "pass", "fail-same-kernel"])
    assert result.first_bad == commits[2] and result.identical_to_parent is True
    assert "kernel: IDENTICAL to its parent's" in text and "do not blame it" in text
    assert "signature: test_teardown::test_closed_sockets_leave_no_storage_in_the_map" in text
    saved = json.loads((tmp_path / "out" / bisect.RESULT_FILE).read_text())
    assert saved["identical_to_parent"] is True


def test_a_culprit_that_changes_the_kernel_is_reported_as_such(tmp_path, standin):
    commits, result, _code, text = bisect_repo(tmp_path, standin, ["pass", "pass", "fail"])
    assert result.first_bad == commits[2] and result.identical_to_parent is False
    assert "kernel: differs from its parent's" in text


def test_kernel_signature_ignores_what_is_not_loaded(tmp_path):
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        pytest.skip("objcopy (binutils) is needed to make the ELF variants")
    true, false = tmp_path / "true", tmp_path / "false"
    shutil.copy("/bin/true", true)
    shutil.copy("/bin/false", false)
    assert bisect.kernel_signature(true) != bisect.kernel_signature(false)
    # A non-allocated section (like debug info) changes the file, not the kernel.
    note = tmp_path / "note"
    note.write_text("built on another day\n")
    commented = tmp_path / "commented"
    subprocess.run([objcopy, "--add-section", f".comment.bisect={note}", str(true),
                    str(commented)], check=True)
    assert commented.read_bytes() != true.read_bytes()
    assert bisect.kernel_signature(commented) == bisect.kernel_signature(true)
    assert bisect.kernel_signature(note) is None
    assert bisect.kernel_signature(tmp_path / "absent") is None


@pytest.mark.parametrize("version, fragments", [
    ("5.10.223", ["before-5.18.config"]),
    ("5.17.0-rc3", ["before-5.18.config"]),
    ("5.18.0", []),
    ("6.1.192", []),
])
def test_fragments_follow_the_trees_version(version, fragments):
    assert [p.name for p in bisect.version_fragments(version)] == fragments
    for path in bisect.version_fragments(version):
        assert path.is_file()


def test_a_step_on_an_old_tree_builds_with_the_old_fragment(tmp_path):
    tree = tmp_path / "tree"
    make_repo(tree, ["pass"])
    (tree / "Makefile").write_text("VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 0\nEXTRAVERSION =\n")
    user = tmp_path / "user.config"
    user.write_text("CONFIG_X=y\n")
    seen = []

    def run_once(options, log):
        seen.append(list(options.config))
        return 0

    result = bisect.run_step(tree, bisect.pipeline.RunOptions(config=[user]), 1,
                             tmp_path / "step", run_once, log=lambda line: None)
    assert result.outcome == "good"
    assert [p.name for p in seen[0]] == ["before-5.18.config", "user.config"]
    fragment = bisect.version_fragments("5.10")[0].read_text()
    assert "# CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT is not set" in fragment
    assert "CONFIG_DEBUG_INFO=y" in fragment


def test_help_inside_a_bisect_stops_git_instead_of_saying_good(tmp_path):
    tree = tmp_path / "tree"
    commits = make_repo(tree, ["pass", "fail"])
    step = [sys.executable, "-m", "runner.commands.bisect", "--help"]
    driver = [sys.executable, "-m", "runner", "bisect", "--help"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for command in (step, driver):
        outside = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env,
                                 check=False)
        assert outside.returncode == 0 and "--runs N" in outside.stdout, outside.stderr
    git(tree, "bisect", "start", commits[1], commits[0])
    for command in (step, driver):
        inside = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env,
                                 check=False)
        assert inside.returncode == 255, inside.stdout + inside.stderr
        assert "stops 'git bisect run' instead of marking the commit good" in inside.stderr
    git(tree, "bisect", "reset")


def test_a_step_that_ignores_signals_is_stopped_within_the_configured_grace(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout.readline() == "ready\n"
    started = time.monotonic()
    bisect._stop(process, lambda line: None, bisect.StopGrace(0.3, 0.3, 5.0))
    assert process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 3.0
    # A step that exits on SIGINT ends the wait at once, whatever the grace.
    quick = subprocess.Popen([sys.executable, "-c", ("import time; print('ready', flush=True); "
                              "time.sleep(60)")], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    assert quick.stdout.readline() == "ready\n"
    started = time.monotonic()
    bisect._stop(quick, lambda line: None, bisect.StopGrace(30.0, 30.0, 30.0))
    assert time.monotonic() - started < 3.0


def test_steps_build_with_a_serial_pahole_first_in_path(tmp_path):
    # Two builds of one 6.1 commit with pahole 1.24 -j differed in .BTF, and through its
    # size in .BTF_ids, kallsyms, .rodata and .text: the report could never say
    # "identical to its parent's".  The steps' builds get a pahole without -j.
    env = bisect.reproducible_build_env({"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert env["PATH"].split(os.pathsep)[0] == str(bisect.REPRODUCIBLE_BTF_DIR)
    assert env["PATH"].endswith("/usr/bin:/bin") and env["HOME"] == "/root"
    assert env["KBUILD_BUILD_TIMESTAMP"] == "1970-01-01"
    # The wrapper drops every form of -j and runs the next pahole in PATH.
    real = tmp_path / "bin"
    real.mkdir()
    (real / "pahole").write_text('#!/bin/sh\necho "$@"\n')
    (real / "pahole").chmod(0o755)
    path = os.pathsep.join([str(bisect.REPRODUCIBLE_BTF_DIR), str(real), "/usr/bin", "/bin"])
    proc = subprocess.run(["pahole", "-J", "--btf_gen_floats", "-j", "--lang_exclude=rust",
                           "-j4", "--jobs", "--jobs=3", ".tmp_vmlinux.btf"],
                          env=dict(os.environ, PATH=path), capture_output=True, text=True,
                          check=True)
    assert proc.stdout.split() == ["-J", "--btf_gen_floats", "--lang_exclude=rust",
                                   ".tmp_vmlinux.btf"]


def test_the_serial_pahole_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(bisect.REPRODUCIBLE_BTF_DIR / "pahole")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
