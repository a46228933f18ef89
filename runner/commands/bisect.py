"""`run-selftests bisect`: find the commit that broke sk storage with `git bisect run`.

The driver checks the user's tree, tests --good and --bad first (the good one
must pass, the bad one must fail the selected tests, and that failure's
signature, the failing test names, is what the bisect looks for), then lets
`git bisect run` call one step per commit: this module run as
`python -m runner.commands.bisect` (or ci/bisect, the same step for people who call
`git bisect run` by hand).  A step is an ordinary run of the pipeline in the
user's tree, so every commit builds incrementally in the one build directory
of that tree, with --series applied on top and removed again by the pipeline.

A run's exit code (runner.errors.ExitCode, never re-judged here) decides:

  pass                                        -> good
  test failure, or a splat a test failed on   -> bad, if a failing test is in
                                                 the --bad signature; a run
                                                 failing only other tests is
                                                 not evidence either way
  timeout, infrastructure error, a guest that
  died with no test failing (boot crash)      -> retried (--retries), then skip
  build failure, series does not apply        -> skip (125): cannot be judged
  usage error, Ctrl-C, a bug in the runner    -> abort (255): git stops

With --runs N a commit is bad as soon as one run fails a test of the
signature, good only when N runs pass, and skipped when its runs only failed
other tests.  A wrong label silently sends the bisect down the wrong half, so
anything that is not evidence about the commit is a skip, never bad.

Every step leaves <output>/steps/NN-<commit>/verdict.json and one run
directory per run.  The tree is always handed back with `git bisect reset`,
also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from runner import atomic_file, process_group
from runner.cache import open_cache
from runner.commands import option_groups, pipeline
from runner.errors import ExitCode, Interrupted, RunnerError, UsageError
from runner.interrupts import install_sigterm_handler
from runner.record import RecordError, RunRecord, read_if_present
from runner.stages import artifacts, patches, source
from runner.stages.source import git

GOOD, BAD, SKIP, ABORT = "good", "bad", "skip", "abort"
# Not a step label: a run that says nothing about the commit and is repeated.
RETRY = "retry"
# What `git bisect run` understands: 0 good, 125 skip, 1..127 bad, 128..255 stop.
GIT_EXIT = {GOOD: 0, BAD: 1, SKIP: 125, ABORT: 255}

# Exit codes that are a verdict about the commit, and those that are not.
_RUN_OUTCOME = {
    ExitCode.PASS: GOOD,
    ExitCode.TEST_FAILURE: BAD,
    # A crash counts against the commit only when a selected test failed on it
    # (run_outcome); a guest that died before any test ran is retried.
    ExitCode.SPLAT: BAD,
    # Hangs and QEMU/disk/network trouble happen on innocent commits under a
    # loaded host (syzkaller retries these too): retried, then skipped.
    ExitCode.TIMEOUT: RETRY,
    ExitCode.INFRASTRUCTURE: RETRY,
    ExitCode.BUILD_FAILURE: SKIP,
    ExitCode.PATCH_FAILURE: SKIP,
}

VERDICT_FILE = "verdict.json"
STEPS_DIR = "steps"
BISECT_RUN_LOG = "bisect-run.log"
GIT_BISECT_LOG = "git-bisect.log"
RESULT_FILE = "bisect.json"
DEFAULT_RETRIES = 2

REPO_ROOT = Path(__file__).resolve().parents[2]  # runner/<package>/<module>.py
# (first version that does not need it, fragment): kconfig/sk-storage.config is
# written for current kernels; older trees get a fragment adapting it, so a
# 5.10-era commit builds instead of being skipped for a symbol it cannot have.
VERSION_FRAGMENTS = (((5, 18), REPO_ROOT / "kconfig" / "before-5.18.config"),)

# Kbuild stamps the build time, user, host and build count into the kernel; with
# these fixed, two commits whose code is the same build the same vmlinux, which
# is how the report tells a no-op culprit (syzkaller does the same).
REPRODUCIBLE_BUILD_ENV = {"KBUILD_BUILD_TIMESTAMP": "1970-01-01", "KBUILD_BUILD_USER": "bisect",
                          "KBUILD_BUILD_HOST": "bisect", "KBUILD_BUILD_VERSION": "1",
                          "LOCALVERSION": ""}
# A pahole that encodes BTF serially (ci/reproducible-btf/pahole says why), first in
# PATH for the steps' builds: with the parallel one two builds of one commit differ.
REPRODUCIBLE_BTF_DIR = REPO_ROOT / "ci" / "reproducible-btf"


def reproducible_build_env(environ: dict) -> dict:
    """The environment a step builds in: fixed build stamps, serial BTF encoding."""
    env = dict(environ, **REPRODUCIBLE_BUILD_ENV)
    if (REPRODUCIBLE_BTF_DIR / "pahole").is_file():
        env["PATH"] = os.pathsep.join([str(REPRODUCIBLE_BTF_DIR), environ.get("PATH", "")])
    return env


def run_outcome(exit_code: int, failing: Sequence[str] = ()) -> str:
    """What one run says about the commit: good, bad, retry, skip, or abort on unknown codes."""
    try:
        outcome = _RUN_OUTCOME.get(ExitCode(exit_code), ABORT)
    except ValueError:
        return ABORT
    if exit_code == ExitCode.SPLAT and not failing:
        return RETRY
    return outcome


def version_tuple(version: str) -> tuple[int, ...]:
    """'5.10.223-rc1' -> (5, 10, 223); unknown parts stop the tuple."""
    numbers = []
    for part in re.split(r"[.-]", version):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def version_fragments(version: str) -> list[Path]:
    """The extra kconfig fragments a tree of this Makefile version needs."""
    have = version_tuple(version)
    return [fragment for before, fragment in VERSION_FRAGMENTS if have and have < before]


def kernel_signature(vmlinux: Path) -> str | None:
    """SHA-256 of the loaded contents of an ELF64 vmlinux; None when it is not one.

    Only allocated sections with file data count (no debug info, no .bss, no
    notes with the build id), as in syzkaller's elfBinarySignature.  Parsed
    with struct because only the section headers are needed.
    """
    try:
        with open(vmlinux, "rb") as elf:
            header = elf.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            shoff, = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
            elf.seek(shoff)
            table = elf.read(shentsize * shnum)
            digest = hashlib.sha256()
            for index in range(shnum):
                _, kind, flags, _, offset, size = struct.unpack_from(
                    "<IIQQQQ", table, index * shentsize)
                if not flags & 0x2 or kind in (7, 8):  # SHF_ALLOC; SHT_NOTE, SHT_NOBITS
                    continue
                elf.seek(offset)
                digest.update(elf.read(size))
    except (OSError, struct.error):
        return None
    return digest.hexdigest()


def bisect_in_progress(where: Path) -> bool:
    """True when the git tree around `where` is in the middle of a bisect."""
    proc = git(where, "rev-parse", "--path-format=absolute", "--git-path", "BISECT_START",
               check=False)
    return proc.returncode == 0 and Path(proc.stdout.strip()).exists()


class BisectSafeHelp(argparse.Action):
    """-h/--help that exits 255 inside a bisect, where 0 would mark the commit good."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        if bisect_in_progress(Path.cwd()):
            parser.exit(GIT_EXIT[ABORT], f"{parser.prog}: --help inside a bisect: exit "
                        f"{GIT_EXIT[ABORT]} stops 'git bisect run' instead of marking "
                        "the commit good\n")
        parser.exit(0)


def _bisect_safe_help(parser: argparse.ArgumentParser) -> None:
    # cli builds the subcommand's parser with the stock -h; "resolve" lets this one
    # replace it.  The option group copied the handler when it was made, hence _optionals.
    parser.conflict_handler = parser._optionals.conflict_handler = "resolve"
    parser.add_argument("-h", "--help", action=BisectSafeHelp,
                        help="show this help and exit (255 inside a git bisect)")


# --- arguments --------------------------------------------------------------------------


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one step: a run's options plus --runs, --retries, --signature.

    A bisect builds every commit of the tree it bisects: no --base, no prebuilt
    kernel, no --shell.
    """
    _bisect_safe_help(parser)
    option_groups.add_tree_options(parser, base=False)
    option_groups.add_build_options(parser)
    option_groups.add_guest_options(parser)
    option_groups.add_test_options(parser)
    option_groups.add_file_options(parser)
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="test each commit up to N times: bad as soon as one run fails a "
                             "test of the signature, good when all N pass (default: "
                             "%(default)s)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                        help="repeat a run that timed out, hit an infrastructure error or "
                             "whose guest died with no test failing, up to N times per "
                             "commit before skipping it (default: %(default)s)")
    parser.add_argument("--signature", action="append", default=[], metavar="TEST",
                        help="a failing test of the bad commit (repeatable; the bisect sets "
                             "it from --bad); runs failing only other tests do not count")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`run-selftests bisect` options: the endpoints, then everything a step takes."""
    parser.add_argument("--good", required=True, metavar="REV",
                        help="a commit where the selected tests pass (checked first)")
    parser.add_argument("--bad", required=True, metavar="REV",
                        help="a commit where they fail (checked first)")
    add_step_arguments(parser)


def _check_counts(args: argparse.Namespace) -> None:
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    if args.retries < 0:
        raise UsageError("--retries must be 0 or more")


def find_tree(path: Path | None) -> Path:
    """The top of the git tree to bisect: --kernel-src, else the one around the cwd."""
    start = Path(path).expanduser() if path else Path.cwd()
    if not start.is_dir():
        raise UsageError(f"--kernel-src {start}: no such directory")
    proc = git(start, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        where = f"--kernel-src {start}" if path else f"the current directory {start}"
        raise UsageError(f"{where} is not in a git tree; bisecting needs the kernel's git "
                         "history (pass --kernel-src DIR)")
    return Path(proc.stdout.strip()).resolve()


def step_arguments(args: argparse.Namespace, tree: Path, out: Path) -> list[str]:
    """The step's command line: the driver's step options as given, with the tree and output."""
    parser = argparse.ArgumentParser(add_help=False)
    add_step_arguments(parser)
    return (["--kernel-src", str(tree), "--output", str(out)]
            + option_groups.command_line(parser, args, skip={"kernel_src", "output"}))


# --- one step -----------------------------------------------------------------------------


@dataclass
class StepResult:
    """One commit's verdict: its label, why, what each run found, and its kernel's identity."""

    commit: str
    subject: str
    outcome: str
    reason: str
    runs: list = field(default_factory=list)
    seconds: float = 0.0
    signature: list = field(default_factory=list)
    kernel_signature: str | None = None

    @property
    def git_exit(self) -> int:
        return GIT_EXIT[self.outcome]


def _read_summary(out: Path) -> RunRecord:
    """The run's record; an empty one when it left none or one this version cannot read.

    A step's outcome comes from its exit code: the record only adds detail.
    """
    try:
        return read_if_present(out) or RunRecord()
    except RecordError:
        return RunRecord()


def built_vmlinux(summary: RunRecord) -> Path | None:
    """The vmlinux of the build a run's summary.json names, if it built one."""
    root = (summary.kernel or {}).get("build_dir")
    if not root:
        return None
    from runner.stages import build

    return build.BuildDir(Path(root), "").obj / "vmlinux"


def run_record(number: int, out: Path, exit_code: int, reason: str) -> dict:
    """What one run found, from its exit code and the summary.json it left."""
    summary = _read_summary(out)
    failing = [{"name": t.name, "message": t.message}
               for t in summary.tests or [] if t.outcome in ("failed", "error")]
    names = sorted({str(t["name"]) for t in failing})
    vmlinux = built_vmlinux(summary) if exit_code != ExitCode.BUILD_FAILURE else None
    return {
        "run": number,
        "output": str(out),
        "exit_code": exit_code,
        "outcome": run_outcome(exit_code, names),
        "verdict": summary.verdict,
        "reason": summary.reason or reason,
        "failing": failing,
        "signature": names,
        "splats": [dataclasses.asdict(s) for s in summary.splats or []],
        "timings": summary.timings or {},
        "kernel_signature": kernel_signature(vmlinux) if vmlinux else None,
    }


RunOnce = Callable[[pipeline.RunOptions, Callable[[str], None]], int]


def step_options(tree: Path, options: pipeline.RunOptions) -> pipeline.RunOptions:
    """The run options for the checked-out commit: its tree, plus the fragments its version needs."""
    extra = version_fragments(source.tree_version(tree)) if (tree / "Makefile").exists() else []
    return replace(options, kernel_src=tree, config=[*extra, *options.config])


def run_step(tree: Path, options: pipeline.RunOptions, runs: int, step_dir: Path,
             run_once: RunOnce = pipeline.run, log: Callable[[str], None] = print,
             retries: int = DEFAULT_RETRIES, signature: Sequence[str] = ()) -> StepResult:
    """Test the checked-out commit by the rule in the module docstring."""
    started = time.monotonic()
    commit = git(tree, "rev-parse", "HEAD", check=False).stdout.strip()
    subject = git(tree, "log", "-1", "--format=%s", "HEAD", check=False).stdout.strip()
    result = StepResult(commit, subject, GOOD, "")
    wanted = set(signature)
    judged, passed, retried, other = 0, 0, 0, []
    retried_why = ""
    try:
        options = step_options(tree, options)
        number = 0
        while judged < runs:
            number += 1
            out = step_dir / f"run-{number}"
            reason = ""
            try:
                code = int(run_once(replace(options, output=out), log))
            except RunnerError as error:
                code, reason = int(error.exit_code), error.message
            record = run_record(number, out, code, reason)
            result.runs.append(record)
            result.kernel_signature = result.kernel_signature or record["kernel_signature"]
            outcome, why = record["outcome"], record["reason"] or f"exit {code}"
            if outcome == RETRY:
                if retried < retries:
                    retried += 1
                    retried_why = why
                    log(f"bisect step: run {number} says nothing about the commit ({why}); "
                        f"retry {retried} of {retries}")
                    continue
                result.outcome = SKIP
                result.reason = f"not judged after {retried} retries: {why}"
                break
            if outcome in (SKIP, ABORT):
                result.outcome, result.reason = outcome, why
                break
            judged += 1
            if outcome == GOOD:
                passed += 1
                continue
            if not wanted or wanted & set(record["signature"]):
                result.outcome, result.signature = BAD, record["signature"]
                prefix = f"run {number}: " if runs > 1 or number > 1 else ""
                result.reason = prefix + why
                break
            other.append(", ".join(record["signature"]))
        else:
            if passed == runs:
                # A pass after a retry is still a pass, but the report must not hide
                # that the commit needed one (and why).
                result.reason = f"{runs} run(s) passed" + (
                    f" after {retried} retried run(s) ({retried_why})" if retried else "")
            else:
                result.outcome = SKIP
                result.reason = (f"failed only tests outside the signature "
                                 f"({'; '.join(other)}); {passed} of {runs} run(s) passed")
    except (KeyboardInterrupt, Interrupted):
        result.outcome, result.reason = ABORT, "interrupted"
    except Exception as exc:  # noqa: BLE001 - a runner bug must stop the bisect, not label
        result.outcome, result.reason = ABORT, f"runner bug: {type(exc).__name__}: {exc}"
    result.seconds = round(time.monotonic() - started, 2)
    return result


def next_step_dir(out: Path, commit: str) -> Path:
    """<out>/steps/NN-<commit12>, numbered in the order the commits were tested."""
    steps = out / STEPS_DIR
    steps.mkdir(parents=True, exist_ok=True)
    number = len([p for p in steps.iterdir() if p.is_dir()]) + 1
    return steps / f"{number:02d}-{commit[:12]}"


def write_verdict(step_dir: Path, result: StepResult) -> Path:
    """verdict.json of one step, written atomically."""
    step_dir.mkdir(parents=True, exist_ok=True)
    record = dict(result.__dict__, git_exit=result.git_exit)
    return atomic_file.write_text(step_dir / VERDICT_FILE,
                                  json.dumps(record, indent=2, default=str) + "\n")


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
        _check_counts(args)
        tree = find_tree(args.kernel_src)
        out = Path(args.output or Path.cwd() / "runs" / "bisect").expanduser().absolute()
        options = option_groups.options_from_args(args, list(argv))
        commit = git(tree, "rev-parse", "HEAD", check=False).stdout.strip()
        step_dir = next_step_dir(out, commit)
    except SystemExit as exit_:  # argparse: a bad option is 2, --help 0 or 255; 2 stops git
        return GIT_EXIT[ABORT] if exit_.code else 0
    except RunnerError as error:
        print(f"bisect step: error: {error.message}", file=sys.stderr)
        return GIT_EXIT[ABORT]
    except (KeyboardInterrupt, Interrupted):
        return GIT_EXIT[ABORT]
    except Exception:  # noqa: BLE001 - a traceback exits 1, which git would read as bad
        traceback.print_exc()
        return GIT_EXIT[ABORT]
    os.environ.update(reproducible_build_env(dict(os.environ)))
    result = run_step(tree, options, args.runs, step_dir, run_once, retries=args.retries,
                      signature=args.signature)
    write_verdict(step_dir, result)
    print(f"bisect step {step_dir.name}: {result.commit[:12]} {result.subject!r} -> "
          f"{result.outcome.upper()} ({result.reason}) in {result.seconds:.0f} s", flush=True)
    return result.git_exit


# --- the driver -------------------------------------------------------------------------------


def check_tree(tree: Path, good: str, bad: str) -> tuple[str, str]:
    """Refuse trees git bisect would trip over; return (good, bad) as full commit ids."""
    if bisect_in_progress(tree):
        raise UsageError(f"a bisect is already in progress in {tree}; finish it with "
                         "'git bisect reset' first")
    dirty = git(tree, "status", "--porcelain", "--untracked-files=no",
                check=False).stdout.strip()
    if dirty:
        raise UsageError(f"{tree} has uncommitted changes ({dirty.splitlines()[0].strip()}"
                         f"{' ...' if len(dirty.splitlines()) > 1 else ''}); commit or stash "
                         "them, the bisect checks out other commits")
    resolved = []
    for option, rev in (("--good", good), ("--bad", bad)):
        proc = git(tree, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
        if proc.returncode != 0:
            raise UsageError(f"{option} {rev}: no such commit in {tree}")
        resolved.append(proc.stdout.strip())
    good_sha, bad_sha = resolved
    if good_sha == bad_sha:
        raise UsageError("--good and --bad are the same commit; nothing to bisect")
    if git(tree, "merge-base", "--is-ancestor", good_sha, bad_sha, check=False).returncode != 0:
        raise UsageError(f"--good {good} is not an ancestor of --bad {bad}; pick a good "
                         "commit older than the bad one")
    return good_sha, bad_sha


@dataclass
class BisectResult:
    """How the bisect ended: found (first_bad), inconclusive (candidates), refused or aborted."""

    status: str
    first_bad: str | None = None
    candidates: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    seconds: float = 0.0
    reset_ok: bool = True
    messages: list = field(default_factory=list)
    signature: list = field(default_factory=list)
    identical_to_parent: bool | None = None


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


@dataclass(frozen=True)
class StopGrace:
    """Seconds each signal gets before the next, stronger one, when the driver is stopped."""

    interrupt: float = 60.0  # SIGINT: the step removes its series and restores the tree
    terminate: float = 10.0
    kill: float = 10.0


STOP_GRACE = StopGrace()
_POLL_SECONDS = 0.05


def _stop(process: subprocess.Popen, log: Callable[[str], None], grace: StopGrace) -> None:
    """Stop the child and its process group; each wait ends as soon as the group is gone."""

    def gone() -> bool:
        # The group may outlive the child (a step restoring the tree): wait for both, until
        # even its zombies are reaped, so nothing of the step is left when bisect returns.
        process.poll()
        return not process_group.exists(process.pid)

    if process_group.stop(process.pid, ((signal.SIGINT, grace.interrupt),
                                        (signal.SIGTERM, grace.terminate),
                                        (signal.SIGKILL, grace.kill)),
                          gone, _POLL_SECONDS,
                          lambda: log("bisect: still stopping the step; interrupt again to "
                                      "force it")):
        process.wait()


def _run_logged(command: Sequence[str], cwd: Path, run_log, log: Callable[[str], None],
                grace: StopGrace) -> tuple[str, bool]:
    """Run a command in `cwd` in its own process group, teeing its output; (output, interrupted).

    `git bisect run` runs its step in the tree; the endpoint checks do the same.
    """
    output: list[str] = []
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1, start_new_session=True,
                               cwd=cwd, env=dict(os.environ, LC_ALL="C"))
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            run_log.write(line)
            run_log.flush()
            log(line.rstrip("\n"))
        process.wait()
    except (KeyboardInterrupt, Interrupted):
        log("bisect: interrupted; stopping the current step and restoring the tree")
        _stop(process, log, grace)
        return "".join(output), True
    return "".join(output), False


def restore_tree(tree: Path, journal_dir: Path | None, log: Callable[[str], None]) -> bool:
    """End the bisect: replay a step's patch journal if it was killed, then git bisect reset."""
    restored = patches.replay_journal(journal_dir) if journal_dir is not None else None
    if restored is not None:
        log(f"bisect: removed the series a stopped step left in {len(restored)} file(s)")
    proc = git(tree, "bisect", "reset", check=False)
    if proc.returncode != 0:
        log(f"bisect: 'git bisect reset' failed in {tree}: {proc.stderr.strip()[-300:]}")
        return False
    dirty = git(tree, "status", "--porcelain", "--untracked-files=no",
                check=False).stdout.strip()
    if dirty:
        log(f"bisect: {tree} still has changes after the reset: {dirty.splitlines()[0]}")
        return False
    return True


def _endpoint_refusal(role: str, sha: str, step: dict) -> str | None:
    """Why an endpoint's step forbids bisecting, or None when it is what it should be."""
    outcome, reason = step.get("outcome"), step.get("reason", "?")
    wanted = GOOD if role == "good" else BAD
    if outcome == wanted:
        return None
    short = f"--{role} {sha[:12]}"
    if role == "good" and outcome == BAD:
        return (f"{short} fails too ({', '.join(step.get('signature') or []) or reason}); "
                "pick an older --good where the selected tests pass")
    if role == "bad" and outcome == GOOD:
        return (f"{short} passes the selected tests ({reason}); nothing to bisect: check "
                "-k/-m, or raise --runs for a flaky failure")
    return f"{short} could not be judged ({outcome}: {reason}); pick one that builds and boots"


def check_endpoints(tree: Path, good: str, bad: str, command: Sequence[str], out: Path,
                    run_log, log: Callable[[str], None], grace: StopGrace) -> list[str] | None:
    """Test --good and --bad with the step; the bad one's failing tests, None if interrupted.

    Raises UsageError, one line, when good does not pass or bad does not fail:
    a bisect between such endpoints would name a commit that proves nothing.
    """
    verdicts = {}
    for role, sha in (("good", good), ("bad", bad)):
        proc = git(tree, "checkout", "-q", "--detach", sha, check=False)
        if proc.returncode != 0:
            raise UsageError(f"cannot check out --{role} {sha[:12]}: "
                             f"{proc.stderr.strip().splitlines()[-1:]}")
        log(f"bisect: checking that --{role} {sha[:12]} is {role}")
        before = {s["dir"] for s in load_steps(out)}
        _, interrupted = _run_logged(command, tree, run_log, log, grace)
        if interrupted:
            return None
        new = [s for s in load_steps(out) if s["dir"] not in before and s.get("commit") == sha]
        if not new:
            raise UsageError(f"the step left no verdict for --{role} {sha[:12]}; see "
                             f"{out / BISECT_RUN_LOG}")
        refusal = _endpoint_refusal(role, sha, new[-1])
        if refusal:
            raise UsageError(refusal)
        verdicts[role] = new[-1]
    return list(verdicts["bad"].get("signature") or [])


def drive(tree: Path, good: str, bad: str, step_command: Sequence[str], out: Path,
          journal_dir: Path | None = None, log: Callable[[str], None] = print,
          grace: StopGrace | None = None) -> BisectResult:
    """Check the endpoints, then `git bisect run step_command`; the tree is always reset.

    Steps run in their own process group so Ctrl-C and SIGTERM reach them
    through this driver, which then waits for them to restore the tree before
    resetting.  A refused endpoint raises UsageError (after the reset).
    """
    grace = grace or STOP_GRACE
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    result = BisectResult("aborted")
    proc = git(tree, "bisect", "start", bad, good, check=False)
    if proc.returncode != 0:
        raise UsageError(f"git bisect start failed in {tree}: "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    first = git(tree, "rev-parse", "HEAD", check=False).stdout.strip()
    try:
        log(f"bisect: {good[:12]} (good) .. {bad[:12]} (bad) in {tree}")
        with open(out / BISECT_RUN_LOG, "w", errors="replace") as run_log:
            signature = check_endpoints(tree, good, bad, step_command, out, run_log, log, grace)
            if signature is None:
                result.status = "interrupted"
                return result
            result.signature = signature
            if signature:
                log(f"bisect: looking for the first commit failing {', '.join(signature)}")
            git(tree, "checkout", "-q", "--detach", first, check=True)
            command = [*step_command, *(arg for test in signature
                                        for arg in ("--signature", test))]
            output, interrupted = _run_logged(["git", "bisect", "run", *command], tree,
                                              run_log, log, grace)
        status, first_bad, candidates = parse_bisect_output(output)
        result.status = "interrupted" if interrupted else status
        result.first_bad, result.candidates = first_bad, candidates
        (out / GIT_BISECT_LOG).write_text(git(tree, "bisect", "log", check=False).stdout)
        if first_bad:
            parent = git(tree, "rev-parse", "--verify", "--quiet", f"{first_bad}^",
                         check=False).stdout
            result.identical_to_parent = same_kernel(load_steps(out), first_bad, parent.strip())
    except UsageError as error:
        # A refused endpoint: bisect.json must say so and why, not "aborted".
        result.status = "refused"
        result.messages.append(error.message)
        raise
    finally:
        result.reset_ok = restore_tree(tree, journal_dir, log)
        result.steps = load_steps(out)
        result.seconds = round(time.monotonic() - started, 2)
        write_result(out, tree, good, bad, result)
    return result


def same_kernel(steps: Sequence[dict], commit: str, parent: str) -> bool | None:
    """Whether two tested commits built the same kernel; None when either was not built."""
    def signature_of(sha: str) -> str | None:
        found = [s.get("kernel_signature") for s in steps if s.get("commit") == sha]
        return next((sig for sig in reversed(found) if sig), None)

    mine, theirs = signature_of(commit), signature_of(parent)
    if not mine or not theirs:
        return None
    return mine == theirs


def write_result(out: Path, tree: Path, good: str, bad: str, result: BisectResult) -> None:
    """bisect.json: endpoints, outcome and every step with its time."""
    record = {"tree": str(tree), "good": good, "bad": bad, "status": result.status,
              "first_bad": result.first_bad, "candidates": result.candidates,
              "signature": result.signature,
              "identical_to_parent": result.identical_to_parent,
              "seconds": result.seconds, "reset_ok": result.reset_ok,
              "messages": result.messages,
              "steps": [{k: s.get(k) for k in ("dir", "commit", "subject", "outcome",
                                                "reason", "seconds", "signature",
                                                "kernel_signature")}
                        for s in result.steps]}
    (out / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")


# --- the report ------------------------------------------------------------------------------


def _subject(tree: Path, commit: str) -> str:
    return git(tree, "log", "-1", "--format=%s", commit, check=False).stdout.strip()


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


def describe_identity(result: BisectResult) -> str:
    """Whether the culprit changed the kernel at all, in one line."""
    if result.identical_to_parent is None:
        return ("  kernel: not compared with the parent's (the parent was not built during "
                "this bisect)")
    if result.identical_to_parent:
        return ("  kernel: IDENTICAL to its parent's (same vmlinux code and data): this "
                "commit does not change the kernel under test, so the failure is flaky or "
                "comes from outside the kernel; do not blame it")
    return "  kernel: differs from its parent's"


def inconclusive_exit_code(steps: Sequence[dict], candidates: Sequence[str]) -> int:
    """Why an inconclusive bisect could not judge its candidates, as the run exit code.

    5 or 6 when every skipped candidate failed to build or to take the series,
    4 when they all timed out; otherwise (QEMU trouble, guests that died with
    no test failing, a mix) 7: an infrastructure skip is not a build failure.
    """
    codes = {int(step["runs"][-1].get("exit_code", ExitCode.INFRASTRUCTURE))
             for step in steps
             if step.get("commit") in candidates and step.get("outcome") == SKIP
             and step.get("runs")}
    if len(codes) == 1 and codes <= {ExitCode.BUILD_FAILURE, ExitCode.PATCH_FAILURE,
                                     ExitCode.TIMEOUT}:
        return codes.pop()
    return int(ExitCode.INFRASTRUCTURE)


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
        if result.signature:
            log(f"  signature: {', '.join(result.signature)}")
        tested = [s for s in result.steps if s.get("commit") == sha]
        if tested:
            for line in describe_failure(tested[-1]):
                log(line)
        log(describe_identity(result))
    elif result.status == "inconclusive":
        log("bisect: inconclusive; commits that could not be judged (build, series, or "
            "infrastructure failures after retries) hide the first bad one, which is one of:")
        for sha in result.candidates:
            log(f"  {sha[:12]} {_subject(tree, sha)}")
        code = inconclusive_exit_code(result.steps, result.candidates)
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
    return [sys.executable, "-m", "runner.commands.bisect", *step_argv]


def default_output() -> Path:
    """./runs/bisect-<UTC timestamp>, beside plain runs."""
    stamp = artifacts.default_output_dir().name
    return Path.cwd() / "runs" / f"bisect-{stamp}"


def main(args: argparse.Namespace) -> int:
    """`run-selftests bisect`: check, drive `git bisect run`, report, always reset."""
    _check_counts(args)
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
    result = drive(tree, good, bad, command, out, patches.journal_dir_for(cache.root, tree))
    code = report(tree, result, bad, print)
    print(f"bisect: artifacts in {out}")
    return code


if __name__ == "__main__":
    sys.exit(step_main(sys.argv[1:]))
