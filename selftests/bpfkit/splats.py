"""The one catalogue of kernel splats: what a kernel bug report looks like in a log.

Both sides use it: the guest-side guard scans the records /dev/kmsg gained
during a test, the host runner scans a whole QEMU console log.  Either text
may carry noise around the kernel's own words: printk timestamps and caller
ids ("[   12.345678][  T123] "), CRLF line ends, ANSI colour, syslog or CI
clock prefixes, and user-space output interleaved with kernel lines.

A report is recognised only by its trigger line, matched at the start of the
kernel message (after the noise is peeled off), never anywhere in a line: a
pytest line such as "test_x[BUG: y] PASSED" is not a splat, while any message
that *starts* with "BUG: " is one, whatever follows (fail closed: an unknown
BUG is still a BUG).  A "Call Trace:" that belongs to no recognised report is
reported too (kind "orphan trace"), so a report whose trigger line was lost
still fails the run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# Longest excerpt kept for one report: enough for a lockdep chain or a KASAN
# report with its allocation and free stacks, bounded so that a report with
# no end marker cannot swallow the rest of a console log.
MAX_EXCERPT_LINES = 120


@dataclass(frozen=True)
class Splat:
    """One kernel bug report found in a log."""

    kind: str
    line: int
    excerpt: str


# --- peeling noise off a line -------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Prefixes a line may carry before the kernel's own text, tried in order at the
# start of the line: /dev/kmsg raw records ("6,1234,5678,-;"), syslog priority
# ("<4>"), syslog and journal clocks ("Apr 13 06:21:17 host kernel: ",
# "2026-05-28T12:21:57.303+00:00 host kernel: "), a CI clock ("01:20:13.304 "),
# and dmesg -T ("[Wed Dec 19 03:36:07 2018] ").
_LEADING_NOISE = (
    re.compile(r"^\d+,\d+,\d+,[^;]*;"),
    re.compile(r"^<\d+>"),
    re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: "),
    re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \S+ kernel: "),
    re.compile(r"^\d\d:\d\d:\d\d(?:\.\d+)? "),
    re.compile(r"^\[[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}\] ?"),
)
# printk's own stamp ("[%5lu.%06lu]") and caller id ("[ T123]", "[    C1]").
# Searched anywhere in the line: a console line can start with user-space
# output that had no newline ("syzkaller login: [   30.02] usb 1-1: ...").
_PRINTK_STAMP = re.compile(r"\[\s*\d+\.\d{6}\](?:\[\s*[TC]\d+\])? ?")


def _message(raw: str) -> tuple[str, bool]:
    """Return the kernel message of a log line and whether it carried a printk stamp."""
    line = _ANSI.sub("", raw.rstrip("\r\n")).replace("\r", "")
    for prefix in _LEADING_NOISE:
        match = prefix.match(line)
        if match:
            line = line[match.end():]
    stamp = _PRINTK_STAMP.search(line)
    if stamp:
        return line[stamp.end():], True
    return line, False


# --- the catalogue ------------------------------------------------------------

# (kind, trigger) in priority order: the first pattern that matches the start
# of a message names the report.  Specific kinds come before the generic
# "BUG: " and "WARNING: " shapes they would otherwise fall into.
_TRIGGERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("KASAN", r"BUG: KASAN: "),
        ("KFENCE", r"BUG: KFENCE: "),
        ("KMSAN", r"BUG: KMSAN: "),
        ("KCSAN", r"BUG: KCSAN: "),
        ("UBSAN", r"UBSAN: "),
        ("soft lockup", r"(?:NMI )?(?:watchdog: )?BUG: soft lockup"),
        ("hard lockup", r"(?:NMI )?watchdog: (?:Watchdog detected hard LOCKUP|BUG: hard lockup)"),
        ("panic", r"Kernel panic - not syncing"),
        ("RCU stall", r"(?:rcu: )?INFO: rcu_\w+ (?:self-)?detected (?:expedited )?stalls?\b"),
        ("RCU stall", r"(?:rcu: )?INFO: rcu_\w+ detected stall"),
        ("hung task", r"INFO: task .+:\d+ blocked for more than \d+ seconds"),
        ("kmemleak", r"kmemleak: \d+ new suspected memory leaks?"),
        ("kmemleak", r"(?:kmemleak: )?unreferenced object 0x[0-9a-f]+ \(size \d+\):"),
        # lockdep prints its reports as "WARNING: <what>" (no "CPU:"), and
        # before 4.x as "[ INFO: <what> ]".
        ("lockdep", (r"WARNING: (?:possible|inconsistent|suspicious|bad unlock|lock held|held lock"
                    r"|Nested lock|[A-Z]+IRQ-(?:safe|READ-safe))")),
        ("lockdep", r"\[ INFO: .*(?:lock|RCU).* \]$"),
        ("lockdep", r"INFO: trying to register non-static key"),
        ("lockdep", r"BUG: (?:MAX_LOCK|looking up invalid subclass|key [0-9a-f]+ has not been registered)"),
        ("oops", r"BUG: (?:kernel NULL pointer dereference|unable to handle)"),
        ("oops", r"Unable to handle kernel (?:NULL pointer dereference|paging request)"),
        ("oops", r"(?:Oops(?: - \w+)?: )?(?:general protection fault|stack segment)[:,]"),
        ("oops", r"Oops(?: - [\w ]+)?: "),
        ("oops", r"Internal error: Oops"),
        ("oops", r"(?:invalid opcode|divide error|double fault): [0-9a-f]{4} \[#\d+\]"),
        ("BUG", r"kernel BUG at "),
        ("BUG", r"BUG: "),
        ("WARNING", r"WARNING: (?:CPU: \d+ PID: \d+ at |at )"),
        ("WARNING", r"WARNING: "),
    )
)

# A report's own follow-up lines that look like triggers but belong to the
# report that precedes them: the die() line of an oops ("Oops: 0000 [#1]")
# after "BUG: kernel NULL pointer dereference", or KASAN's range note after a
# general protection fault.  Within this many lines of a report's trigger
# they extend it instead of opening a new one.
_FOLLOW_UP = re.compile(
    r"(?:Oops(?: - [\w ]+)?: |Internal error: Oops|invalid opcode: |"
    r"KASAN: (?:null-ptr-deref|maybe wild-memory-access|wild-memory-access|"
    r"probably user-memory-access) in range)"
)
_FOLLOW_UP_WINDOW = 8

# How each kind of report says it is over (the line is part of the report).
_END_TRACE = re.compile(r"---\[ end (?:trace|Kernel panic)")
_SEPARATOR = re.compile(r"={20,}\s*$")
_END_MARKERS = {
    "KASAN": _SEPARATOR,
    "KFENCE": _SEPARATOR,
    "KMSAN": _SEPARATOR,
    "KCSAN": _SEPARATOR,
    "UBSAN": _SEPARATOR,
}

# A stack trace, or the end line of a WARN/oops, outside any recognised
# report: fail closed on reports whose trigger line was lost (console
# interleaving, a log that starts mid-report) or is not in the catalogue.
_ORPHAN_TRACE = re.compile(r"(?:Call [Tt]race:|---\[ end trace)")


def _trigger(message: str) -> str | None:
    for kind, pattern in _TRIGGERS:
        if pattern.match(message):
            return kind
    return None


def _is_continuation(raw: str, stamped: bool, trigger_stamped: bool) -> bool:
    """Whether a line can still belong to a report whose trigger had (or lacked) a stamp.

    In a log whose kernel lines are stamped, a line with neither a stamp nor
    leading indentation (dmesg indents a multi-line record's later lines) is
    user-space output: the report is over.
    """
    if not trigger_stamped or stamped:
        return True
    stripped = _ANSI.sub("", raw).rstrip("\r\n")
    return stripped == "" or stripped[:1] in (" ", "\t")


def _reports(lines: list[str]) -> Iterator[tuple[str, int, int]]:
    """Yield (kind, first line, end line exclusive) for every report in the lines."""
    messages = [_message(raw) for raw in lines]
    index = 0
    while index < len(lines):
        message, stamped = messages[index]
        kind = _trigger(message)
        if kind is None:
            if _ORPHAN_TRACE.match(message):
                kind = "orphan trace"
            else:
                index += 1
                continue
        end = index + 1
        end_marker = _END_MARKERS.get(kind, _END_TRACE)
        while end < len(lines) and end - index < MAX_EXCERPT_LINES:
            follow, follow_stamped = messages[end]
            if not _is_continuation(lines[end], follow_stamped, stamped):
                break
            if _trigger(follow) is not None and not (
                _FOLLOW_UP.match(follow) and end - index <= _FOLLOW_UP_WINDOW
            ):
                break
            end += 1
            if end_marker.match(follow) or _END_TRACE.match(follow):
                break
        # Indented user-space lines (a console's "   Starting foo...") pass as
        # dmesg continuations; at the tail of a report they are not part of it.
        while stamped and end - 1 > index and not messages[end - 1][1]:
            end -= 1
        yield kind, index, end
        index = end


def find_splats(text: str) -> list[Splat]:
    """Every kernel bug report in a log, in order, each with the lines that make it up."""
    lines = text.splitlines()
    return [
        Splat(kind=kind, line=start, excerpt="\n".join(
            line.rstrip("\r") for line in lines[start:end]))
        for kind, start, end in _reports(lines)
    ]


def describe(splats: list[Splat]) -> str:
    """A failure message quoting every splat, for a test or a run verdict."""
    parts = [f"kernel log gained {len(splats)} splat(s):"]
    for splat in splats:
        parts.append(f"--- {splat.kind} at log line {splat.line + 1} ---")
        parts.append(splat.excerpt)
    return "\n".join(parts)
