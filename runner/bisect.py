"""`run-selftests bisect`: find the commit that broke sk storage with `git bisect run`.

The driver checks the user's tree, starts `git bisect`, and lets `git bisect
run` call one step per commit: this module run as `python -m runner.bisect`
(or ci/bisect, the same step for people who call `git bisect run` by hand).
A step is an ordinary run of the pipeline in the user's tree, so every commit
builds incrementally in the one build directory of that tree, with --series
applied on top and removed again by the pipeline itself.

The step's verdict is mapped explicitly, because a wrong label silently
sends the bisect down the wrong half:

  pass                                   -> good  (0)
  test failure, kernel splat, timeout    -> bad   (1)
  build failure, series does not apply   -> skip  (125): the commit cannot be judged
  anything else (QEMU, disk, usage, Ctrl-C, a bug in the runner)
                                         -> abort (255): git stops, no commit is labelled

Every step leaves <output>/steps/NN-<commit>/verdict.json and one run
directory per --runs repetition.  The tree is always handed back with
`git bisect reset`, also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from runner import artifacts, cli, patches, pipeline
from runner.cache import open_cache
from runner.errors import ExitCode, Interrupted, RunnerError, UsageError
from runner.interrupts import install_sigterm_handler

GOOD, BAD, SKIP, ABORT = "good", "bad", "skip", "abort"
# What `git bisect run` understands: 0 good, 125 skip, 1..127 bad, 128..255 stop.
GIT_EXIT = {GOOD: 0, BAD: 1, SKIP: 125, ABORT: 255}

OUTCOME_OF_EXIT = {
    ExitCode.PASS: GOOD,
    ExitCode.TEST_FAILURE: BAD,
    ExitCode.SPLAT: BAD,
    # A hang at this commit is the commit's doing far more often than the
    # host's; a too-short --timeout shows up on the good side too.
    ExitCode.TIMEOUT: BAD,
    ExitCode.BUILD_FAILURE: SKIP,
    ExitCode.PATCH_FAILURE: SKIP,
}

VERDICT_FILE = "verdict.json"
STEPS_DIR = "steps"
RUN_LOG = "bisect-run.log"
GIT_BISECT_LOG = "git-bisect.log"
RESULT_FILE = "bisect.json"
# Run options a bisect cannot use: it always builds the tree it bisects.
REJECTED_OPTIONS = {"kernel_image": "--kernel-image", "modules": "--modules",
                    "distro_kernel": "--distro-kernel", "base": "--base", "shell": "--shell"}
# After Ctrl-C the step restores the tree; give it this long before escalating.
STOP_GRACE_SECONDS = 60.0


def outcome_of(exit_code: int) -> str:
    """The bisect label for one run's exit code; unknown codes abort rather than guess."""
    try:
        return OUTCOME_OF_EXIT.get(ExitCode(exit_code), ABORT)
    except ValueError:
        return ABORT


# --- arguments --------------------------------------------------------------------------


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one step: a plain run's options plus --runs."""
    cli.add_run_arguments(parser)
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="test each commit N times; any failure marks it bad "
                             "(default: %(default)s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`run-selftests bisect` options: the endpoints, then everything a step takes."""
    parser.add_argument("--good", required=True, metavar="REV",
                        help="a commit where the selected tests pass")
    parser.add_argument("--bad", required=True, metavar="REV",
                        help="a commit where they fail (or the kernel splats)")
    add_step_arguments(parser)


def _reject_unusable(args: argparse.Namespace) -> None:
    for dest, option in REJECTED_OPTIONS.items():
        if getattr(args, dest, None):
            raise UsageError(f"{option} does not apply to a bisect, which builds every "
                             "commit of --kernel-src")
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")


def _git(tree: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                          env=env, check=check)


def find_tree(path: Path | None) -> Path:
    """The top of the git tree to bisect: --kernel-src, else the one around the cwd."""
    start = Path(path).expanduser() if path else Path.cwd()
    if not start.is_dir():
        raise UsageError(f"--kernel-src {start}: no such directory")
    proc = _git(start, "rev-parse", "--show-toplevel")
    if proc.returncode != 0:
        where = f"--kernel-src {start}" if path else f"the current directory {start}"
        raise UsageError(f"{where} is not in a git tree; bisecting needs the kernel's git "
                         "history (pass --kernel-src DIR)")
    return Path(proc.stdout.strip()).resolve()


def step_arguments(args: argparse.Namespace, tree: Path, out: Path) -> list[str]:
    """The step's command-line options, rebuilt from the driver's parsed arguments."""
    argv = ["--kernel-src", str(tree), "--output", str(out), "--runs", str(args.runs),
            "-j", str(args.jobs), "--accel", args.accel, "--cpus", str(args.cpus),
            "--memory", args.memory, "--timeout", str(args.timeout),
            "--stall-timeout", str(args.stall_timeout), "-m", args.markers or "",
            "--suite", str(Path(args.suite).resolve())]
    if args.series:
        argv += ["--series", str(Path(args.series).resolve())]
    for fragment in args.config:
        argv += ["--config", str(Path(fragment).resolve())]
    if args.keyword:
        argv += ["-k", args.keyword]
    if args.cache_dir:
        argv += ["--cache-dir", str(Path(args.cache_dir).resolve())]
    if args.force:
        argv.append("--force")
    if args.verbose:
        argv.append("--verbose")
    if args.debug_kernel:
        argv.append("--debug-kernel")
    return argv


# Every run option is either handed to the step above or refused; tests hold this list
# against cli.add_run_arguments so a new option cannot be dropped silently.
PASSED_OPTIONS = {"kernel_src", "output", "jobs", "accel", "cpus", "memory", "timeout",
                  "stall_timeout", "markers", "suite", "series", "config", "keyword",
                  "cache_dir", "force", "verbose", "debug_kernel"}


# --- one step -----------------------------------------------------------------------------


@dataclass
class StepResult:
    """One commit's verdict: its label, why, and what each run found."""

    commit: str
    subject: str
    outcome: str
    reason: str
    runs: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def git_exit(self) -> int:
        return GIT_EXIT[self.outcome]


def _read_summary(out: Path) -> dict:
    try:
        return json.loads((out / artifacts.SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


def run_record(number: int, out: Path, exit_code: int, reason: str) -> dict:
    """What one run found, from its exit code and the summary.json it left."""
    summary = _read_summary(out)
    return {
        "run": number,
        "output": str(out),
        "exit_code": exit_code,
        "outcome": outcome_of(exit_code),
        "verdict": summary.get("verdict"),
        "reason": summary.get("reason") or reason,
        "failing": [{"name": t.get("name"), "message": t.get("message", "")}
                    for t in summary.get("tests", [])
                    if t.get("outcome") in ("failed", "error")],
        "splats": summary.get("splats", []),
        "timings": summary.get("timings", {}),
    }


RunOnce = Callable[[pipeline.RunOptions, Callable[[str], None]], int]


def run_step(tree: Path, options: pipeline.RunOptions, runs: int, step_dir: Path,
             run_once: RunOnce = pipeline.run, log: Callable[[str], None] = print) -> StepResult:
    """Test the checked-out commit up to `runs` times; stop at the first run that is not good."""
    started = time.monotonic()
    commit = _git(tree, "rev-parse", "HEAD").stdout.strip()
    subject = _git(tree, "log", "-1", "--format=%s", "HEAD").stdout.strip()
    result = StepResult(commit, subject, GOOD, "")
    try:
        for number in range(1, runs + 1):
            out = step_dir / f"run-{number}"
            reason = ""
            try:
                code = int(run_once(replace(options, output=out, kernel_src=tree), log))
            except RunnerError as error:
                code, reason = int(error.exit_code), error.message
            record = run_record(number, out, code, reason)
            result.runs.append(record)
            if record["outcome"] != GOOD:
                result.outcome = record["outcome"]
                prefix = f"run {number} of {runs}: " if runs > 1 else ""
                result.reason = prefix + (record["reason"] or f"exit {code}")
                break
        else:
            result.reason = f"{runs} run(s) passed"
    except (KeyboardInterrupt, Interrupted):
        result.outcome, result.reason = ABORT, "interrupted"
    except Exception as exc:  # noqa: BLE001 - a runner bug must stop the bisect, not label
        result.outcome, result.reason = ABORT, f"runner bug: {type(exc).__name__}: {exc}"
    result.seconds = round(time.monotonic() - started, 2)
    return result


def next_step_dir(out: Path, commit: str) -> Path:
    """<out>/steps/NN-<commit12>, numbered in the order git chose the commits."""
    steps = out / STEPS_DIR
    steps.mkdir(parents=True, exist_ok=True)
    number = len([p for p in steps.iterdir() if p.is_dir()]) + 1
    return steps / f"{number:02d}-{commit[:12]}"


def write_verdict(step_dir: Path, result: StepResult) -> Path:
    """verdict.json of one step, written atomically."""
    step_dir.mkdir(parents=True, exist_ok=True)
    record = dict(result.__dict__, git_exit=result.git_exit)
    tmp = step_dir / (VERDICT_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, step_dir / VERDICT_FILE)
    return step_dir / VERDICT_FILE


def step_main(argv: Sequence[str], run_once: RunOnce = pipeline.run) -> int:
    """One `git bisect run` step: test HEAD, record the verdict, return git's exit code.

    Never exits 1 by accident: whatever goes wrong before a verdict exists
    returns 255, which stops the bisect instead of marking the commit bad.
    """
    try:
        install_sigterm_handler()
        parser = argparse.ArgumentParser(prog="ci/bisect", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add_step_arguments(parser)
        args = parser.parse_args(list(argv))
        _reject_unusable(args)
        tree = find_tree(args.kernel_src)
        out = Path(args.output or Path.cwd() / "runs" / "bisect").expanduser().absolute()
        options = cli.options_from_args(args, list(argv))
        commit = _git(tree, "rev-parse", "HEAD").stdout.strip()
        step_dir = next_step_dir(out, commit)
    except SystemExit as exit_:  # argparse: --help is 0, a bad option 2; both stop git
        return GIT_EXIT[ABORT] if exit_.code else 0
    except RunnerError as error:
        print(f"bisect step: error: {error.message}", file=sys.stderr)
        return GIT_EXIT[ABORT]
    except (KeyboardInterrupt, Interrupted):
        return GIT_EXIT[ABORT]
    result = run_step(tree, options, args.runs, step_dir, run_once)
    write_verdict(step_dir, result)
    print(f"bisect step {step_dir.name}: {result.commit[:12]} {result.subject!r} -> "
          f"{result.outcome.upper()} ({result.reason}) in {result.seconds:.0f} s", flush=True)
    return result.git_exit


# --- the driver -------------------------------------------------------------------------------


def check_tree(tree: Path, good: str, bad: str) -> tuple[str, str]:
    """Refuse trees git bisect would trip over; return (good, bad) as full commit ids."""
    if Path(_git(tree, "rev-parse", "--path-format=absolute", "--git-path",
                 "BISECT_START").stdout.strip()).exists():
        raise UsageError(f"a bisect is already in progress in {tree}; finish it with "
                         "'git bisect reset' first")
    dirty = _git(tree, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        raise UsageError(f"{tree} has uncommitted changes ({dirty.splitlines()[0].strip()}"
                         f"{' ...' if len(dirty.splitlines()) > 1 else ''}); commit or stash "
                         "them, the bisect checks out other commits")
    resolved = []
    for option, rev in (("--good", good), ("--bad", bad)):
        proc = _git(tree, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        if proc.returncode != 0:
            raise UsageError(f"{option} {rev}: no such commit in {tree}")
        resolved.append(proc.stdout.strip())
    good_sha, bad_sha = resolved
    if good_sha == bad_sha:
        raise UsageError("--good and --bad are the same commit; nothing to bisect")
    if _git(tree, "merge-base", "--is-ancestor", good_sha, bad_sha).returncode != 0:
        raise UsageError(f"--good {good} is not an ancestor of --bad {bad}; pick a good "
                         "commit older than the bad one")
    return good_sha, bad_sha


@dataclass
class BisectResult:
    """How the bisect ended: found (first_bad), inconclusive (candidates) or aborted."""

    status: str
    first_bad: str | None = None
    candidates: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    seconds: float = 0.0
    reset_ok: bool = True
    messages: list = field(default_factory=list)


FIRST_BAD = re.compile(r"^([0-9a-f]{40}) is the first bad commit$", re.MULTILINE)
ONLY_SKIPPED = "There are only 'skip'ped commits left to test."


def parse_bisect_output(text: str) -> tuple[str, str | None, list[str]]:
    """(status, first bad commit, candidates) from what `git bisect run` printed."""
    found = FIRST_BAD.search(text)
    if found:
        return "found", found.group(1), []
    if ONLY_SKIPPED in text:
        tail = text.split("The first bad commit could be any of:", 1)[-1]
        return "inconclusive", None, re.findall(r"^([0-9a-f]{40})$", tail, re.MULTILINE)
    return "aborted", None, []


def load_steps(out: Path) -> list[dict]:
    """Every step's verdict.json, in the order they ran."""
    steps = []
    for path in sorted((out / STEPS_DIR).glob(f"*/{VERDICT_FILE}")):
        try:
            steps.append(dict(json.loads(path.read_text()), dir=str(path.parent)))
        except ValueError:
            steps.append({"dir": str(path.parent), "outcome": ABORT,
                          "reason": "unreadable verdict.json"})
    return steps


def _stop(process: subprocess.Popen, log: Callable[[str], None]) -> None:
    """Stop `git bisect run` and its step: SIGINT lets the step restore the tree first."""
    for sig, wait in ((signal.SIGINT, STOP_GRACE_SECONDS), (signal.SIGTERM, 10.0),
                      (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # The group may outlive git (the step restoring the tree): wait for it too.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(process.pid):
                time.sleep(0.2)
            if not _group_alive(process.pid):
                return
        except subprocess.TimeoutExpired:
            pass
        except (KeyboardInterrupt, Interrupted):
            log("bisect: still stopping the step; interrupt again to force it")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restore_tree(tree: Path, journal_dir: Path | None, log: Callable[[str], None]) -> bool:
    """End the bisect: replay a step's patch journal if it was killed, then git bisect reset."""
    if journal_dir is not None and patches.Journal(journal_dir).exists():
        journal = patches.Journal(journal_dir)
        restored = journal.restore()
        journal.discard()
        log(f"bisect: removed the series a stopped step left in {len(restored)} file(s)")
    proc = _git(tree, "bisect", "reset")
    if proc.returncode != 0:
        log(f"bisect: 'git bisect reset' failed in {tree}: {proc.stderr.strip()[-300:]}")
        return False
    dirty = _git(tree, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        log(f"bisect: {tree} still has changes after the reset: {dirty.splitlines()[0]}")
        return False
    return True


def drive(tree: Path, good: str, bad: str, step_command: Sequence[str], out: Path,
          journal_dir: Path | None = None, log: Callable[[str], None] = print) -> BisectResult:
    """Run `git bisect run step_command` between good and bad; the tree is always reset.

    The step runs in its own process group so Ctrl-C and SIGTERM reach it
    through this driver, which then waits for it to restore the tree before
    resetting.
    """
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    result = BisectResult("aborted")
    interrupted = False
    proc = _git(tree, "bisect", "start", bad, good)
    if proc.returncode != 0:
        raise UsageError(f"git bisect start failed in {tree}: "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    output: list[str] = []
    try:
        log(f"bisect: {good[:12]} (good) .. {bad[:12]} (bad) in {tree}")
        with open(out / RUN_LOG, "w", errors="replace") as run_log:
            process = subprocess.Popen(
                ["git", "-C", str(tree), "bisect", "run", *step_command],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                errors="replace", bufsize=1, start_new_session=True,
                env=dict(os.environ, LC_ALL="C"),
            )
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    output.append(line)
                    run_log.write(line)
                    run_log.flush()
                    log(line.rstrip("\n"))
                process.wait()
            except (KeyboardInterrupt, Interrupted):
                interrupted = True
                log("bisect: interrupted; stopping the current step and restoring the tree")
                _stop(process, log)
        status, first_bad, candidates = parse_bisect_output("".join(output))
        result.status = "interrupted" if interrupted else status
        result.first_bad, result.candidates = first_bad, candidates
        (out / GIT_BISECT_LOG).write_text(_git(tree, "bisect", "log").stdout)
    finally:
        result.reset_ok = restore_tree(tree, journal_dir, log)
        result.steps = load_steps(out)
        result.seconds = round(time.monotonic() - started, 2)
        write_result(out, tree, good, bad, result)
    return result


def write_result(out: Path, tree: Path, good: str, bad: str, result: BisectResult) -> None:
    """bisect.json: endpoints, outcome and every step with its time."""
    record = {"tree": str(tree), "good": good, "bad": bad, "status": result.status,
              "first_bad": result.first_bad, "candidates": result.candidates,
              "seconds": result.seconds, "reset_ok": result.reset_ok,
              "steps": [{k: s.get(k) for k in ("dir", "commit", "subject", "outcome",
                                                "reason", "seconds")}
                        for s in result.steps]}
    (out / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")


# --- the report ------------------------------------------------------------------------------


def _subject(tree: Path, commit: str) -> str:
    return _git(tree, "log", "-1", "--format=%s", commit).stdout.strip()


def format_steps(steps: Sequence[dict]) -> str:
    """One line per step: number, commit, label, build and guest time, total."""
    lines = ["step  commit        result  build    guest    total  subject"]
    for number, step in enumerate(steps, start=1):
        timings: dict = {}
        for run in step.get("runs", []):
            for key in ("build", "guest"):
                timings[key] = timings.get(key, 0.0) + float(run.get("timings", {}).get(key, 0))
        lines.append(
            f"{number:>4}  {str(step.get('commit', '?'))[:12]:<12}  "
            f"{step.get('outcome', '?')!s:<6}  {timings.get('build', 0):>6.0f}s  "
            f"{timings.get('guest', 0):>6.0f}s  {float(step.get('seconds', 0)):>5.0f}s  "
            f"{step.get('subject', '')}"
        )
    return "\n".join(lines)


def describe_failure(step: dict, excerpt_lines: int = 15) -> list[str]:
    """The failing tests and the first splat of a bad step, for the closing report."""
    lines = [f"  why: {step.get('reason', '?')}"]
    for run in step.get("runs", []):
        if run.get("outcome") != BAD:
            continue
        for test in run.get("failing", []):
            lines.append(f"  failed: {test.get('name')}: {test.get('message', '')[:300]}")
        for splat in run.get("splats", [])[:1]:
            lines.append(f"  splat: {splat.get('kind')} at console line {splat.get('line')}:")
            lines += ["    " + ln for ln in str(splat.get("excerpt", "")).splitlines()
                      [:excerpt_lines]]
        lines.append(f"  artifacts: {run.get('output')}")
        break
    return lines


def report(tree: Path, result: BisectResult, bad: str, log: Callable[[str], None]) -> int:
    """Print the steps and the answer; return the subcommand's exit code."""
    log("")
    if result.steps:
        log(format_steps(result.steps))
    log(f"bisect: {len(result.steps)} step(s) in {result.seconds:.0f} s")
    code = int(ExitCode.PASS)
    if result.status == "found":
        sha = result.first_bad or ""
        log(f"first bad commit: {sha[:12]} {_subject(tree, sha)}")
        tested = [s for s in result.steps if s.get("commit") == sha]
        if tested:
            for line in describe_failure(tested[-1]):
                log(line)
        elif sha == bad:
            log("  (the --bad commit itself: every commit after --good passed)")
    elif result.status == "inconclusive":
        log("bisect: inconclusive; commits that could not be built or patched hide the "
            "first bad one, which is one of:")
        for sha in result.candidates:
            log(f"  {sha[:12]} {_subject(tree, sha)}")
        code = int(ExitCode.BUILD_FAILURE)
    elif result.status == "interrupted":
        log("bisect: interrupted; no commit was labelled by the interrupted step")
        code = int(ExitCode.INTERRUPTED)
    else:
        last = result.steps[-1] if result.steps else {}
        why = last.get("reason") or "git bisect run stopped (see bisect-run.log)"
        where = f" at {str(last.get('commit', ''))[:12]}" if last else ""
        log(f"bisect: aborted{where} without labelling the commit: {why}")
        code = int(ExitCode.INTERRUPTED if why == "interrupted" else ExitCode.INFRASTRUCTURE)
    if not result.reset_ok:
        log(f"bisect: the tree {tree} was NOT fully restored; check 'git status' there")
        code = code or int(ExitCode.INFRASTRUCTURE)
    return code


def step_command(step_argv: Sequence[str]) -> list[str]:
    """This module as the step, under the interpreter running now."""
    return [sys.executable, "-m", "runner.bisect", *step_argv]


def default_output() -> Path:
    """./runs/bisect-<UTC timestamp>, beside plain runs."""
    stamp = artifacts.default_output_dir().name
    return Path.cwd() / "runs" / f"bisect-{stamp}"


def journal_dir_for(cache_root: Path, tree: Path) -> Path:
    """Where the pipeline keeps its patch journal for a tree (pipeline.build_from_source)."""
    return cache_root / "restore" / hashlib.sha256(str(tree).encode()).hexdigest()[:16]


def main(args: argparse.Namespace) -> int:
    """`run-selftests bisect`: check, drive `git bisect run`, report, always reset."""
    _reject_unusable(args)
    tree = find_tree(args.kernel_src)
    if not Path(args.suite).is_dir():
        raise UsageError(f"test suite directory {args.suite} does not exist; check --suite")
    if args.series is not None and not Path(args.series).is_file():
        raise UsageError(f"series file {args.series} does not exist; check --series")
    good, bad = check_tree(tree, args.good, args.bad)
    out = Path(args.output).expanduser().absolute() if args.output else default_output()
    if (out / STEPS_DIR).is_dir() and any((out / STEPS_DIR).iterdir()):
        raise UsageError(f"{out} already holds the steps of a bisect; pass another --output")
    cache = open_cache(args.cache_dir)
    command = step_command(step_arguments(args, tree, out))
    result = drive(tree, good, bad, command, out, journal_dir_for(cache.root, tree))
    code = report(tree, result, bad, print)
    print(f"bisect: artifacts in {out}")
    return code


if __name__ == "__main__":
    sys.exit(step_main(sys.argv[1:]))
