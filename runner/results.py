"""Stage 6, the results: JUnit per-test outcomes, kernel splats in the console, one verdict.

Fails closed: a guest that died, timed out or left no JUnit is never a pass,
and a kernel splat fails the run even when every test passed.  Everything
here works on saved files, so a run can be re-judged offline
(`run-selftests parse OUTPUT_DIR`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from runner.errors import ExitCode, InfrastructureError

# pytest's own exit codes (pytest.ExitCode), as they arrive through the file.
PYTEST_OK, PYTEST_TESTS_FAILED, PYTEST_INTERRUPTED = 0, 1, 2
PYTEST_INTERNAL_ERROR, PYTEST_USAGE_ERROR, PYTEST_NO_TESTS = 3, 4, 5


@dataclass(frozen=True)
class TestResult:
    """One test case from JUnit: outcome is passed, failed, error or skipped."""

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


@dataclass(frozen=True)
class Verdict:
    """The run's outcome: exit code, a short label and the reason behind it."""

    exit_code: ExitCode
    label: str
    reason: str


def judge(
    boot_status: str, pytest_exit: int | None, tests: Sequence[TestResult] | None,
    splats: Sequence[object], junit_problem: str | None = None,
) -> Verdict:
    """Combine guest fate, pytest's exit code, per-test results and splats into one verdict.

    Order matters: a splat or panic outranks everything, then the clock, then
    missing results (a crash), then pytest's own answer.
    """
    if splats:
        first = splats[0]
        kind = getattr(first, "kind", "splat")
        line = getattr(first, "line", "?")
        more = f" (+{len(splats) - 1} more)" if len(splats) > 1 else ""
        return Verdict(ExitCode.SPLAT, "kernel splat",
                       f"{kind} at console line {line}{more}")
    if boot_status == "panic":
        return Verdict(ExitCode.SPLAT, "kernel crash", "kernel panic")
    if boot_status == "timeout":
        return Verdict(ExitCode.TIMEOUT, "timeout", "the guest did not finish within --timeout")
    if boot_status == "stalled":
        return Verdict(ExitCode.TIMEOUT, "timeout", "the guest stalled (no console output)")
    if tests is None or pytest_exit is None:
        why = junit_problem or "no pytest exit code came back"
        return Verdict(ExitCode.SPLAT, "crash",
                       f"the guest died before the suite finished ({why})")
    if pytest_exit == PYTEST_NO_TESTS:
        return Verdict(ExitCode.USAGE, "no tests",
                       "no test matched the selection; check -k/-m")
    if pytest_exit == PYTEST_USAGE_ERROR:
        return Verdict(ExitCode.USAGE, "pytest usage error",
                       "pytest rejected its command line; check -k/-m")
    bad = [t for t in tests if t.outcome in ("failed", "error")]
    if bad:
        names = ", ".join(t.name.split("::")[-1] for t in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return Verdict(ExitCode.TEST_FAILURE, "test failure",
                       f"{len(bad)} test(s) failed: {names}{more}")
    if pytest_exit != PYTEST_OK:
        return Verdict(ExitCode.TEST_FAILURE, "test failure",
                       f"pytest exited {pytest_exit} without a failing test case")
    if not tests:
        return Verdict(ExitCode.TEST_FAILURE, "test failure",
                       "pytest reported success but junit.xml lists no tests")
    return Verdict(ExitCode.PASS, "pass", f"{len(tests)} test(s), none failed")


_LABELS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}


def counts(tests: Sequence[TestResult]) -> dict:
    """Number of tests per outcome (passed, failed, error, skipped)."""
    result = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for test in tests:
        result[test.outcome] = result.get(test.outcome, 0) + 1
    return result


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
    total = counts(tests)
    lines.append(
        f"{total['passed']} passed, {total['failed'] + total['error']} failed, "
        f"{total['skipped']} skipped"
    )
    return "\n".join(lines)


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
    """The single closing line: verdict, reason and exit code."""
    return f"VERDICT: {verdict.label.upper()} - {verdict.reason} (exit {int(verdict.exit_code)})"
