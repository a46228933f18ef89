"""Stage 6, the results: JUnit per-test outcomes, kernel splats in the console, one verdict.

Fails closed: a guest that died, timed out or left no JUnit is never a pass,
and a kernel splat fails the run even when every test passed.  Everything
here works on saved files, so a run can be re-judged offline
(`run-selftests parse OUTPUT_DIR`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from runner.errors import ExitCode, InfrastructureError

# pytest's own exit codes (pytest.ExitCode), as they arrive through the file.
PYTEST_OK, PYTEST_TESTS_FAILED, PYTEST_USAGE_ERROR, PYTEST_NO_TESTS = 0, 1, 4, 5


class _Label(str, enum.Enum):
    """A status word: compares, formats and serialises as its plain string."""

    # The word itself, not Enum's "BootStatus.EXITED", in str() and f-strings alike.
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class BootStatus(_Label):
    """How the guest (or SSH target) run ended, as runner.stages.boot and runner.targets.remote report it."""

    EXITED = "exited"
    TIMEOUT = "timeout"
    STALLED = "stalled"
    PANIC = "panic"
    WEDGED = "wedged"


class VerdictLabel(_Label):
    """The short label of a verdict, as the verdict line and summary.json show it."""

    PASS = "pass"
    TEST_FAILURE = "test failure"
    UNEXPECTED_SKIP = "unexpected skip"
    NOTHING_TESTED = "nothing tested"
    KERNEL_SPLAT = "kernel splat"
    KERNEL_CRASH = "kernel crash"
    CRASH = "crash"
    KMEMLEAK = "kmemleak"
    KMEMLEAK_UNAVAILABLE = "kmemleak unavailable"
    TIMEOUT = "timeout"
    NO_TESTS = "no tests"
    PYTEST_USAGE_ERROR = "pytest usage error"
    INFRASTRUCTURE = "infrastructure"
    # A run that ended before its verdict (runner.commands.pipeline.record_early_end).
    ERROR = "error"
    INTERRUPTED = "interrupted"
    RUNNER_BUG = "runner bug"


# Where the suite ran decides which skips are acceptable (see judge()).
TARGET_VM = "vm"     # a guest the runner booted: it controls the kernel config and the policy
TARGET_SSH = "ssh"   # someone else's machine: its security policy may refuse things
TARGETS = (TARGET_VM, TARGET_SSH)

# The suite prefixes every skip reason with one of these categories.
SKIP_OLDER_KERNEL = "older kernel"
SKIP_KERNEL_CONFIG = "kernel config"
SKIP_ENVIRONMENT = "environment"
SKIP_NOT_ROOT = "not root"
SKIP_UNCATEGORIZED = "uncategorized"
SKIP_CATEGORIES = (SKIP_OLDER_KERNEL, SKIP_KERNEL_CONFIG, SKIP_ENVIRONMENT, SKIP_NOT_ROOT)
# A guest the runner booted is root, has the suite's kconfig and no host
# policy: only the kernel itself (its age, its config) may excuse a test there.
_SKIPS_ALLOWED = {
    TARGET_VM: (SKIP_OLDER_KERNEL, SKIP_KERNEL_CONFIG),
    TARGET_SSH: (SKIP_OLDER_KERNEL, SKIP_KERNEL_CONFIG, SKIP_ENVIRONMENT),
}
_SKIP_PREFIX = re.compile(r"^\[([^\]]+)\]\s*")
_XPASS_STRICT = "[XPASS(strict)]"
SHOWN_REASONS = 3


@dataclass(frozen=True)
class TestResult:
    """One test case from JUnit: outcome is passed, failed, error, skipped or xfailed.

    xfailed is a strict expected failure: a known kernel bug, not a skip.
    """

    name: str
    outcome: str
    message: str
    seconds: float


def parse_junit_text(text: str) -> list[TestResult]:
    """Per-test results from pytest's JUnit XML; raises ValueError when it is not JUnit."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise ValueError(f"junit.xml is not well-formed XML: {exc}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"junit.xml has root <{root.tag}>, not <testsuites>/<testsuite>")
    results = []
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        name = case.get("name", "?")
        full = f"{classname}::{name}" if classname else name
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                if tag == "skipped" and node.get("type") == "pytest.xfail":
                    # pytest writes an expected failure as a skip; it is not one.
                    outcome = "xfailed"
                message = node.get("message") or (node.text or "").strip()
                break
        message = " ".join(message.split())
        try:
            seconds = float(case.get("time", "0") or 0)
        except ValueError:
            seconds = 0.0
        results.append(TestResult(full, outcome, message, seconds))
    return results


def parse_junit(path: Path) -> list[TestResult]:
    """parse_junit_text on a file; raises FileNotFoundError or ValueError."""
    return parse_junit_text(Path(path).read_text(encoding="utf-8", errors="replace"))


def read_exit_code(path: Path) -> int | None:
    """The integer the guest wrote into its exit-code file, None if absent or garbled."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def find_console_splats(text: str) -> list:
    """Kernel splats in a console log, via the project's one splat catalogue (bpfkit.splats)."""
    try:
        from bpfkit.splats import find_splats
    except ImportError as exc:
        # Fail closed: without the catalogue nothing can be declared clean.
        raise InfrastructureError(f"cannot scan for kernel splats: {exc}") from None
    return list(find_splats(text))


def skip_category(reason: str) -> str:
    """The bracketed category the suite put in front of a skip reason, else "uncategorized"."""
    match = _SKIP_PREFIX.match(reason)
    if match and match.group(1).strip().lower() in SKIP_CATEGORIES:
        return match.group(1).strip().lower()
    return SKIP_UNCATEGORIZED


def skip_reasons(tests: Iterable[TestResult]) -> list[dict]:
    """The distinct skip reasons, most frequent first: category, reason and how many tests."""
    tally: dict[str, int] = {}
    for test in tests:
        if test.outcome == "skipped":
            tally[test.message] = tally.get(test.message, 0) + 1
    ordered = sorted(tally.items(), key=lambda item: (-item[1], item[0]))
    return [{"category": skip_category(reason), "reason": reason, "count": count}
            for reason, count in ordered]


def unexpected_skips(tests: Iterable[TestResult], target: str) -> list[TestResult]:
    """Skips whose category does not excuse a test on this target."""
    allowed = _SKIPS_ALLOWED[target]
    return [t for t in tests if t.outcome == "skipped" and skip_category(t.message) not in allowed]


# --- a guest that never started pytest ------------------------------------------------------

_PRINTK = re.compile(r"^\s*<\d+>?\s*\[\s*\d+\.\d+\]")
SESSION_HEADER = re.compile(r"^=+ test session starts =+$")
# What a shell (dash as /bin/sh, or bash) or Python prints when the guest
# command cannot even begin: the suite directory or the interpreter is not
# visible in the guest, pytest or a module is not installed for it.  Only
# meaningful before pytest's session header: after it, a test may print anything.
_BEFORE_PYTEST = re.compile(
    r"\bcd: can't cd to "                                  # dash
    r"|\bcd: .*: No such file or directory$"               # bash
    r"|^(?:/bin/)?(?:sh|bash|dash)(?:: line)?(?::| \d+:) .*"
    r"(?:: not found|: No such file or directory|: Permission denied|"
    r": command not found|: cannot execute.*)$"
    r"|: No module named \S+"                              # python -m <absent module>
    r"|^(?:E\s+)?(?:ImportError|ModuleNotFoundError)\b"
)
# pytest's own refusals of the runner's command line: it did start, but ran nothing.
_PYTEST_STARTUP = re.compile(
    r"^ImportError while loading conftest "
    r"|^ERROR: file or directory not found: "
)
# The runner's own result files could not be written: the output directory
# is not visible in the guest.  Counts wherever it appears.
_RESULT_FILES = re.compile(
    r"(?:junit\.xml|pytest-exitcode|guest-kernel-release|bench-exitcode|bench\.json).*"
    r"(?:Directory nonexistent|No such file or directory|Read-only file system|"
    r"Permission denied)"
)
SHOWN_CONSOLE_LINES = 4


def startup_failure(console: str) -> list[str]:
    """Console lines showing the guest's command failed before any test could run.

    Kernel (printk) lines are never counted; shell and import errors count
    only before pytest's session header.
    """
    found = []
    started = False
    for raw in console.splitlines():
        line = raw.strip()
        if not line or _PRINTK.match(line):
            continue
        if SESSION_HEADER.match(line):
            started = True
            continue
        if (_RESULT_FILES.search(line) or _PYTEST_STARTUP.search(line)
                or not started and _BEFORE_PYTEST.search(line)):
            found.append(line)
    return found


# --- the verdict ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """The run's outcome: exit code, a short label, the reason, and the per-outcome tally."""

    exit_code: ExitCode
    label: VerdictLabel
    reason: str
    tally: str = ""


def judge(
    boot_status: BootStatus | str, pytest_exit: int | None, tests: Sequence[TestResult] | None,
    splats: Sequence[object], junit_problem: str | None = None, *,
    target: str = TARGET_VM, console: str = "",
) -> Verdict:
    """Combine guest fate, pytest's exit code, per-test results and splats into one verdict.

    Order matters: a splat or panic outranks everything, then the clock, then
    a command that never started (infrastructure), then missing results (a
    crash), then pytest's own answer, then the skips: in a runner-booted guest
    (target "vm") only "[older kernel]" and "[kernel config]" skips are
    acceptable, on an SSH target "[environment]" too; a run in which no test
    passed is never a pass.
    """
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {TARGETS}")
    tally = describe_counts(tests) if tests else ""
    if splats:
        first = splats[0]
        kind = getattr(first, "kind", "splat")
        line = getattr(first, "line", "?")
        more = f" (+{len(splats) - 1} more)" if len(splats) > 1 else ""
        # A wedged guest ends the run mid-test: say which test it was in.
        running = running_test(console.splitlines(), line) if isinstance(line, int) else None
        during = f" during {running}" if running else ""
        return Verdict(ExitCode.SPLAT, VerdictLabel.KERNEL_SPLAT,
                       f"{kind} at console line {line}{more}{during}", tally)
    if boot_status == BootStatus.PANIC:
        return Verdict(ExitCode.SPLAT, VerdictLabel.KERNEL_CRASH, "kernel panic", tally)
    if boot_status == BootStatus.TIMEOUT:
        return Verdict(ExitCode.TIMEOUT, VerdictLabel.TIMEOUT,
                       "the guest did not finish within --timeout", tally)
    if boot_status == BootStatus.STALLED:
        return Verdict(ExitCode.TIMEOUT, VerdictLabel.TIMEOUT,
                       "the guest stalled (no console output)", tally)
    if not tests:
        failed_start = startup_failure(console)
        if failed_start:
            quoted = " | ".join(failed_start[:SHOWN_CONSOLE_LINES])
            more = (f" (+{len(failed_start) - SHOWN_CONSOLE_LINES} more lines)"
                    if len(failed_start) > SHOWN_CONSOLE_LINES else "")
            return Verdict(ExitCode.INFRASTRUCTURE, VerdictLabel.INFRASTRUCTURE,
                           f"the guest could not start the tests, not a kernel problem: "
                           f"{quoted}{more}")
    if tests is None or pytest_exit is None:
        why = junit_problem or "no pytest exit code came back"
        return Verdict(ExitCode.SPLAT, VerdictLabel.CRASH,
                       f"the guest died before the suite finished ({why})", tally)
    if pytest_exit == PYTEST_NO_TESTS:
        return Verdict(ExitCode.USAGE, VerdictLabel.NO_TESTS,
                       "no test matched the selection; check -k/-m")
    if pytest_exit == PYTEST_USAGE_ERROR:
        return Verdict(ExitCode.USAGE, VerdictLabel.PYTEST_USAGE_ERROR,
                       "pytest rejected its command line; check -k/-m")
    bad = [t for t in tests if t.outcome in ("failed", "error")]
    if bad:
        names = ", ".join(t.name.split("::")[-1] for t in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        fixed = sum(t.message.startswith(_XPASS_STRICT) for t in bad)
        retire = (f"; {fixed} known bug(s) no longer reproduce (XPASS): retire their "
                  "registry entries" if fixed else "")
        return Verdict(ExitCode.TEST_FAILURE, VerdictLabel.TEST_FAILURE,
                       f"{len(bad)} test(s) failed: {names}{more}{retire}", tally)
    if pytest_exit != PYTEST_OK:
        return Verdict(ExitCode.TEST_FAILURE, VerdictLabel.TEST_FAILURE,
                       f"pytest exited {pytest_exit} without a failing test case", tally)
    if not tests:
        return Verdict(ExitCode.TEST_FAILURE, VerdictLabel.TEST_FAILURE,
                       "pytest reported success but junit.xml lists no tests")
    unexpected = unexpected_skips(tests, target)
    if unexpected:
        where = ("a runner-booted guest" if target == TARGET_VM else "an SSH target")
        reasons = list(dict.fromkeys(t.message or "(no reason)" for t in unexpected))
        shown = "; ".join(reasons[:SHOWN_REASONS])
        more = f" (+{len(reasons) - SHOWN_REASONS} more reasons)" \
            if len(reasons) > SHOWN_REASONS else ""
        return Verdict(ExitCode.TEST_FAILURE, VerdictLabel.UNEXPECTED_SKIP,
                       f"{len(unexpected)} test(s) skipped for a reason {where} must not "
                       f"have: {shown}{more}", tally)
    if not any(t.outcome == "passed" for t in tests):
        return Verdict(ExitCode.TEST_FAILURE, VerdictLabel.NOTHING_TESTED,
                       f"none of the {len(tests)} test(s) passed (all skipped or known bugs); "
                       "a run that tested nothing is not a pass", tally)
    return Verdict(ExitCode.PASS, VerdictLabel.PASS, f"{len(tests)} test(s), none failed", tally)


_LABELS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP",
           "xfailed": "XFAIL"}
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")


def counts(tests: Sequence[TestResult]) -> dict:
    """Number of tests per outcome, and the skips per category (summary.json's "counts")."""
    result: dict = {outcome: 0 for outcome in OUTCOMES}
    by_category: dict[str, int] = {}
    for test in tests:
        result[test.outcome] = result.get(test.outcome, 0) + 1
        if test.outcome == "skipped":
            category = skip_category(test.message)
            by_category[category] = by_category.get(category, 0) + 1
    result["skipped_by_category"] = by_category
    return result


def describe_counts(tests: Sequence[TestResult]) -> str:
    """"150 passed, 0 failed, 3 skipped (older kernel 2, kernel config 1), 2 known bugs"."""
    total = counts(tests)
    text = f"{total['passed']} passed, {total['failed'] + total['error']} failed, " \
           f"{total['skipped']} skipped"
    by_category = total["skipped_by_category"]
    if by_category:
        text += " (" + ", ".join(f"{name} {n}" for name, n in sorted(
            by_category.items(), key=lambda item: -item[1])) + ")"
    if total["xfailed"]:
        text += f", {total['xfailed']} known bug{'s' if total['xfailed'] != 1 else ''}"
    return text


def format_table(tests: Sequence[TestResult]) -> str:
    """One line per test (outcome, name, time or skip reason/failure message), then totals."""
    if not tests:
        return "(no test results)"
    name_width = min(max(len(t.name) for t in tests), 70)
    lines = []
    for test in tests:
        if test.outcome == "passed":
            note = f"{test.seconds:.2f}s"
        else:
            note = test.message
        label = _LABELS.get(test.outcome, test.outcome.upper())
        lines.append(f"  {label:<5} {test.name:<{name_width}}  {note}".rstrip())
    lines.append(describe_counts(tests))
    return "\n".join(lines)


def format_skip_reasons(tests: Sequence[TestResult]) -> str:
    """The distinct skip reasons with their counts, one a line; empty when nothing skipped."""
    return "\n".join(f"  {r['count']:>4} x {r['reason'] or '(no reason)'}"
                     for r in skip_reasons(tests))


def format_splats(splats: Sequence[object], max_lines: int = 40) -> str:
    """Each splat's kind, console line and excerpt, for the terminal."""
    blocks = []
    for splat in splats:
        excerpt = getattr(splat, "excerpt", "").splitlines()
        shown = "\n".join("    " + line for line in excerpt[:max_lines])
        if len(excerpt) > max_lines:
            shown += f"\n    ... ({len(excerpt) - max_lines} more lines in console.log)"
        blocks.append(f"  {getattr(splat, 'kind', 'splat')} at console line "
                      f"{getattr(splat, 'line', '?')}:\n{shown}")
    return "\n".join(blocks)


def verdict_line(verdict: Verdict) -> str:
    """The single closing line: verdict, reason, the per-outcome tally and exit code."""
    tally = f" [{verdict.tally}]" if verdict.tally else ""
    return (f"VERDICT: {verdict.label.upper()} - {verdict.reason}{tally} "
            f"(exit {int(verdict.exit_code)})")


# How a command made of several runs (matrix, regressions) sums them up: the
# least trustworthy run first (a bug in the runner, then anything that kept a
# run from judging the kernel), then the kernel's findings, worst first.
_PRECEDENCE = (ExitCode.RUNNER_BUG, ExitCode.INTERRUPTED, ExitCode.INFRASTRUCTURE,
               ExitCode.USAGE, ExitCode.PATCH_FAILURE, ExitCode.BUILD_FAILURE, ExitCode.SPLAT,
               ExitCode.TIMEOUT, ExitCode.TEST_FAILURE, ExitCode.PASS)


def overall_exit_code(codes: Iterable[int | None]) -> ExitCode:
    """One exit code for several runs' codes.

    A run that recorded no code left no verdict at all: that is the machinery's
    failure (infrastructure), not something to blame on the kernel.
    """
    seen = {ExitCode.INFRASTRUCTURE if code is None else _as_exit_code(code) for code in codes}
    for code in _PRECEDENCE:
        if code in seen:
            return code
    return ExitCode.PASS


def _as_exit_code(code: int) -> ExitCode:
    try:
        return ExitCode(code)
    except ValueError:
        # A code this version does not know cannot be trusted as a verdict.
        return ExitCode.RUNNER_BUG


# --- which test was running when the kernel reported ---------------------------------------

_NODE = re.compile(r"(?:^|(?<=\s))((?:[\w.-]+/)*test_\w*\.py::\S+)")
_RESULT = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_PRINTK_STAMP = re.compile(r"\[\s*\d+\.\d{6}\]")
# The end of the per-test lines: the final sections or the summary line.
_SESSION_END = re.compile(
    r"^=+ (?:FAILURES|ERRORS|warnings summary|short test summary info|"
    r".*\b(?:passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s.*) =+\s*$"
)


@dataclass
class ConsoleProgress:
    """What pytest -v printed on the console: finished tests with their result, the running one."""

    results: list[tuple[str, str]] = field(default_factory=list)
    running: str | None = None
    finished: bool = False

    def failing(self) -> list[str]:
        return [node for node, result in self.results if result in ("FAILED", "ERROR")]


def console_progress(lines: Sequence[str], upto: int | None = None) -> ConsoleProgress:
    """Follow pytest -v's per-test lines up to line `upto` (0-based; default: all of them).

    On line `upto` itself only the text before the kernel's printk stamp
    counts: a report may be glued to a node id that had no newline yet.
    """
    progress = ConsoleProgress()
    last = len(lines) - 1 if upto is None else upto
    for index, line in enumerate(lines[:last + 1]):
        if index == upto:
            stamp = _PRINTK_STAMP.search(line)
            line = line[:stamp.start()] if stamp else line
        if _SESSION_END.match(line.strip()):
            progress.running, progress.finished = None, True
            return progress
        events = [(m.start(), "node", m.group(1)) for m in _NODE.finditer(line)]
        events += [(m.start(), "result", m.group(1)) for m in _RESULT.finditer(line)]
        for _, kind, value in sorted(events):
            if kind == "node":
                progress.running = value
            elif progress.running is not None:
                progress.results.append((progress.running, value))
                progress.running = None
    return progress


def running_test(lines: Sequence[str], upto: int) -> str | None:
    """The pytest -v node id started but not finished at line `upto` (0-based), if any."""
    return console_progress(lines, upto).running
