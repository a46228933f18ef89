"""Was a re-introduced bug caught?  One regression's run files against its manifest entry.

Pure logic on saved files (summary.json, console.log), so the table can be
rebuilt offline and tested without a kernel.  The rule:

* caught = "yes" when at least one expected test failed (JUnit).  A splat
  counts only through a test: the guest's kernel-log guard fails the test
  during which it appeared.
* If pytest never finished (guest oopsed, panicked, hung, timed out: no
  JUnit), the console decides.  pytest -v prints each node id before the
  test runs and its result after it: an expected test with a FAILED/ERROR
  line there is caught = "yes" (the hang came after it).  Otherwise a kernel
  report printed while a test was running attributes the crash to that test
  and counts as caught = "yes (crash)"; `crash_in_expected` says whether that
  test is one the manifest expects.  A death with neither is caught =
  "no (silent death)".
* Failures of other tests only, or a splat no test was charged with, are
  caught = "no", with the observation shown.
* A run that never reached the guest (patch or build failure) or could not
  judge its kernel (infrastructure, a bug in the runner) is "error".
* A run whose own verdict is a kernel splat (exit 3: a splat no test was
  charged with, a kmemleak leak through local storage) is caught = "yes
  (run verdict)": the suite went red on the bug, only not through a test.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from runner.errors import ExitCode
from runner.markdown import cell
from runner.stages.results import console_progress, running_test

CAUGHT = "yes"
CAUGHT_CRASH = "yes (crash)"
MISSED = "no"
SILENT_DEATH = "no (silent death)"
ERROR = "error"
CAUGHT_VERDICT = "yes (run verdict)"
CAUGHT_LABELS = (CAUGHT, CAUGHT_CRASH, CAUGHT_VERDICT)
# A run that ended with one of these said nothing about the re-introduced bug.
NO_KERNEL_VERDICT = (ExitCode.RUNNER_BUG, ExitCode.INFRASTRUCTURE, ExitCode.USAGE,
                     ExitCode.BUILD_FAILURE, ExitCode.PATCH_FAILURE, ExitCode.INTERRUPTED)
SHOWN_FAILURES = 6

_IDENT = re.compile(r"\w")


def normalize(name: str) -> str:
    """One spelling for node ids and JUnit names: 'a/test_x.py::T::t[p]' and 'a.test_x.T::t[p]'."""
    name = re.sub(r"\.py$", "", name.replace(".py::", "::"))
    return name.replace("/", ".").replace("::", ".")


def matches(expected: str, name: str) -> bool:
    """True when the manifest's node-id substring names this test (whole identifiers only)."""
    needle, haystack = normalize(expected), normalize(name)
    start = haystack.find(needle)
    while start != -1:
        end = start + len(needle)
        before_ok = start == 0 or not _IDENT.match(haystack[start - 1])
        after_ok = end == len(haystack) or not _IDENT.match(haystack[end]) \
            or not _IDENT.match(needle[-1])
        if before_ok and after_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


def node_id(junit_name: str) -> str:
    """JUnit 'test_teardown.TestX::test_y[p]' as pytest's 'test_teardown.py::TestX::test_y[p]'."""
    classname, sep, name = junit_name.rpartition("::")
    if not sep:
        return junit_name
    parts = classname.split(".")
    module = []
    for part in parts:
        if part[:1].isupper():
            break
        module.append(part)
    rest = parts[len(module):]
    path = "/".join(module) + ".py" if module else ""
    return "::".join([p for p in (path, *rest, name) if p])


@dataclass(frozen=True)
class Attribution:
    """A kernel report printed while a test was running."""

    test: str
    kind: str
    line: int


def attribute_crash(console_text: str, splats: Sequence) -> Attribution | None:
    """The first splat (objects with .kind and .line) that appeared during a test."""
    lines = console_text.splitlines()
    for splat in splats:
        test = running_test(lines, splat.line)
        if test:
            return Attribution(test, splat.kind, splat.line)
    return None


# --- one regression ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """One row of the table: the manifest's expectation next to what the run showed."""

    id: str
    bug: str
    upstream_fix: str
    expected: list[str]
    caught: str
    observed: list[str] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)
    crash: str | None = None
    crash_in_expected: bool | None = None
    verdict: str = ""
    reason: str = ""
    exit_code: int | None = None
    seconds: float | None = None
    build_seconds: float | None = None
    guest_seconds: float | None = None
    runner_args: list[str] = field(default_factory=list)
    output_dir: str = ""
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    expected: Sequence[str], tests: Sequence | None, boot_status: str | None,
    splats: Sequence, console_text: str, run_error: str | None = None,
) -> dict:
    """caught/observed/matched/crash/note for one run.

    tests: JUnit results (objects with .name and .outcome) or None when pytest
    left none; splats: console splats (objects with .kind and .line, 0-based).
    """
    if run_error is not None and tests is None and boot_status is None:
        return {"caught": ERROR, "observed": [], "matched": [], "crash": None,
                "crash_in_expected": None, "note": run_error}
    if tests is not None:
        failing = [node_id(t.name) for t in tests if t.outcome in ("failed", "error")]
        matched = [e for e in expected if any(matches(e, name) for name in failing)]
        if matched:
            return {"caught": CAUGHT, "observed": failing, "matched": matched, "crash": None,
                    "crash_in_expected": None, "note": ""}
        if failing:
            note = "only tests the manifest does not expect failed"
        elif splats:
            first = splats[0]
            note = (f"{first.kind} at console line {first.line + 1} was not charged to any "
                    "test (kernel-log guard); a splat alone does not count")
        else:
            note = "every test passed"
        return {"caught": MISSED, "observed": failing, "matched": [], "crash": None,
                "crash_in_expected": None, "note": note}
    died = {"panic": "panicked", "timeout": "timed out", "stalled": "stalled"}.get(
        boot_status or "", "died before pytest finished")
    # No JUnit: pytest -v's own lines on the console are the record of what ran.
    progress = console_progress(console_text.splitlines())
    failing = progress.failing()
    matched = [e for e in expected if any(matches(e, name) for name in failing)]
    blame = attribute_crash(console_text, splats)
    if blame is not None:
        crash = (f"guest {died}: {blame.kind} (console line {blame.line + 1}) during "
                 f"{blame.test}")
    elif progress.running:
        crash = f"guest {died} during {progress.running}"
    else:
        crash = f"guest {died}"
    if matched:
        return {"caught": CAUGHT, "observed": failing, "matched": matched, "crash": crash,
                "crash_in_expected": None,
                "note": f"no JUnit ({crash}); the failures are pytest's own result lines "
                        "on the console"}
    if blame is not None:
        in_expected = any(matches(e, blame.test) for e in expected)
        return {
            "caught": CAUGHT_CRASH, "observed": [*failing, blame.test],
            "matched": [e for e in expected if matches(e, blame.test)], "crash": crash,
            "crash_in_expected": in_expected,
            "note": "" if in_expected else "the crash hit a test the manifest does not list",
        }
    if splats:
        note = (f"guest {died}; {splats[0].kind} at console line {splats[0].line + 1} "
                "outside any test")
    else:
        note = f"guest {died} with no kernel report in console.log"
    return {"caught": SILENT_DEATH, "observed": failing, "matched": [], "crash": crash,
            "crash_in_expected": None, "note": note}


def with_run_verdict(found: dict, exit_code: int | None, verdict: str, reason: str,
                     console_splats: bool) -> dict:
    """`found` with the run's own verdict taken into account.

    A run that went red with a kernel splat (exit 3) although no expected test
    failed caught the bug all the same; a silent death with no kernel report
    stays a silent death.  Any other miss shows what else made the run red.
    """
    if found["caught"] in CAUGHT_LABELS or found["caught"] == ERROR:
        return found
    if exit_code == ExitCode.SPLAT and (found["caught"] == MISSED or console_splats):
        note = f"no expected test failed; the run's verdict caught it: {verdict} ({reason})"
        return dict(found, caught=CAUGHT_VERDICT, note=note)
    if verdict not in ("", "pass", "test failure"):
        return dict(found, note=f"{found['note']}; the run's verdict: {verdict} ({reason})")
    return found


# --- the table ------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def _observed_cell(outcome: Outcome) -> str:
    if outcome.caught == ERROR:
        return f"run error: {outcome.note}"
    parts = []
    if outcome.observed:
        shown = [f"`{name}`" for name in outcome.observed[:SHOWN_FAILURES]]
        more = len(outcome.observed) - SHOWN_FAILURES
        parts.append(", ".join(shown) + (f" and {more} more" if more > 0 else ""))
    if outcome.crash:
        parts.append(f"then {outcome.crash}" if outcome.observed and outcome.caught == CAUGHT
                     else outcome.crash)
    text = "; ".join(parts) or "none"
    if outcome.caught not in CAUGHT_LABELS and outcome.note and not outcome.crash:
        text += f" ({outcome.note})"
    return text


def _time_cell(outcome: Outcome) -> str:
    detail = []
    if outcome.build_seconds is not None:
        detail.append(f"build {outcome.build_seconds:.0f} s")
    if outcome.guest_seconds is not None:
        detail.append(f"guest {outcome.guest_seconds:.0f} s")
    total = format_seconds(outcome.seconds)
    return f"{total} ({', '.join(detail)})" if detail else total


def markdown(outcomes: Sequence[Outcome], title: str = "Regression corpus") -> str:
    """The table: id | bug | upstream fix | expected failing | observed | caught | time."""
    lines = [f"## {title}", "",
             "| regression | bug | fix | expected failing | failing tests observed | caught | time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        expected = "<br>".join(f"`{e}`" for e in o.expected) or "-"
        caught = o.caught
        if o.caught == CAUGHT_CRASH and o.crash_in_expected is False:
            caught += ", not an expected test"
        runner = f" (`{' '.join(o.runner_args)}`)" if o.runner_args else ""
        lines.append(f"| {cell(o.id)}{runner} | {cell(o.bug)} | {cell(o.upstream_fix)} | "
                     f"{expected} | {cell(_observed_cell(o))} | **{caught}** | "
                     f"{_time_cell(o)} |")
    total_caught = sum(o.caught in CAUGHT_LABELS for o in outcomes)
    lines += ["", f"{total_caught} of {len(outcomes)} caught."]
    notes = [o for o in outcomes if o.note]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"* {o.id}: {o.note}" for o in notes]
    return "\n".join(lines) + "\n"
