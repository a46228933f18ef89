"""`--debug-kernel`: build with kconfig/debug.config and judge kmemleak's report after the suite.

The fragment joins the build's fragment set, and fragments are part of the
build-directory key (runner.stages.build), so the debug kernel gets its own build
directory and the normal one stays warm.  In the guest, kmemleak_guest.py
clears kmemleak before pytest and scans twice after it; here the saved
report is split: a leak whose allocation backtrace passes through BPF local
storage fails the run (its backtrace is shown), any other leak is listed but
does not.  A kmemleak that could not scan fails the run too: "no report" is
not "no leaks".  What the kernel logged during the scan (the console was
quiet then) is scanned for splats like the console is.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from runner.errors import ExitCode
from runner.guest import kmemleak_guest
from runner.stages import kmemleak, results

REPO_ROOT = Path(__file__).resolve().parents[2]  # runner/<package>/<module>.py
DEBUG_FRAGMENT = REPO_ROOT / "kconfig" / "debug.config"
GUEST_SCRIPT = Path(kmemleak_guest.__file__).resolve()
# Verdicts a kmemleak finding may replace: a leak is a kernel splat, which
# outranks failed tests; a crash or timeout already says more.
_REPLACEABLE = (ExitCode.PASS, ExitCode.TEST_FAILURE)
SHOWN_FRAMES = 16


def fragments(enabled: bool) -> list[Path]:
    """The extra config fragment of a debug-kernel build (none otherwise)."""
    return [DEBUG_FRAGMENT] if enabled else []


def prepare_guest(command: str, python: str, out: Path) -> str:
    """The boot stage's guest command with kmemleak cleared before it and collected after it.

    Also removes kmemleak files an earlier run left in `out`, so a guest that
    dies before writing its own can never be judged on a stale "ok".
    """
    for name in (kmemleak_guest.STATUS_FILE, kmemleak_guest.REPORT_FILE,
                 kmemleak_guest.DMESG_FILE):
        (out / name).unlink(missing_ok=True)
    script = [python, str(GUEST_SCRIPT)]
    return (f"{shlex.join([*script, 'clear', str(out)])}; {command}; "
            f"{shlex.join([*script, 'collect', str(out)])}")


def read_status(out: Path) -> str:
    """The guest script's status line: 'ok N S', 'cleared' (never collected), 'error: ...', 'missing'."""
    try:
        return (out / kmemleak_guest.STATUS_FILE).read_text(errors="replace").strip() or "missing"
    except FileNotFoundError:
        return "missing"


def scan_window_splats(out: Path) -> list:
    """Splats the kernel logged while kmemleak scanned, except kmemleak's own leak notice."""
    path = out / kmemleak_guest.DMESG_FILE
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    return [s for s in results.find_console_splats(text) if s.kind != "kmemleak"]


def format_leak(leak: kmemleak.Leak, max_frames: int = SHOWN_FRAMES) -> str:
    """A leak for the terminal: headline, then its backtrace with local storage frames marked."""
    ours = set(leak.local_storage_frames())
    lines = [f"  {leak.headline()}"]
    for frame in leak.frames[:max_frames]:
        lines.append(f"    {'>' if frame in ours else ' '} {frame}")
    if len(leak.frames) > max_frames:
        lines.append(f"      ... ({len(leak.frames) - max_frames} more frames)")
    return "\n".join(lines)


def judge(out: Path, verdict: results.Verdict,
          log: Callable[[str], None] = print) -> tuple[results.Verdict, dict]:
    """Fold the kmemleak outcome into the run's verdict: (verdict, the record's "kmemleak")."""
    status = read_status(out)
    report_path = out / kmemleak_guest.REPORT_FILE
    leaks = kmemleak.parse_report(report_path.read_text(errors="replace")) \
        if report_path.exists() else []
    ours, others = kmemleak.split_leaks(leaks)
    extra_splats = scan_window_splats(out)
    facts = {
        "status": status,
        "report": str(report_path) if report_path.exists() else None,
        "objects": len(leaks),
        "local_storage_leaks": [leak.text for leak in ours],
        "other_leaks": [leak.headline() for leak in others],
        "scan_window_splats": [{"kind": s.kind, "excerpt": s.excerpt} for s in extra_splats],
    }
    log("")
    for line in describe(status, ours, others, extra_splats, report_path):
        log(line)
    if verdict.exit_code not in _REPLACEABLE:
        return verdict, facts
    if extra_splats:
        return results.Verdict(ExitCode.SPLAT, results.VerdictLabel.KERNEL_SPLAT,
                               f"{extra_splats[0].kind} while kmemleak scanned "
                               f"(see {kmemleak_guest.DMESG_FILE})"), facts
    if ours:
        first = ours[0]
        return results.Verdict(
            ExitCode.SPLAT, results.VerdictLabel.KMEMLEAK,
            f"{len(ours)} leaked object(s) allocated through BPF local storage "
            f"(first: {' <- '.join(first.functions[:4])})"), facts
    if not status.startswith("ok") and verdict.exit_code == ExitCode.PASS:
        why = "the guest never collected it" if status in ("cleared", "missing") else status
        return results.Verdict(ExitCode.INFRASTRUCTURE,
                               results.VerdictLabel.KMEMLEAK_UNAVAILABLE,
                               f"no kmemleak report: {why}; leaks cannot be ruled out"), facts
    return verdict, facts


def describe(status: str, ours: Sequence[kmemleak.Leak], others: Sequence[kmemleak.Leak],
             extra_splats: Sequence, report_path: Path) -> list[str]:
    """The kmemleak section of the run's report."""
    if not status.startswith("ok"):
        return [f"kmemleak: no report ({status})"]
    lines = [(f"kmemleak: {len(ours) + len(others)} unreferenced object(s) after the suite, "
              f"{len(ours)} through BPF local storage ({report_path})")]
    for leak in ours:
        lines.append(format_leak(leak))
    if others:
        lines.append(f"kmemleak: {len(others)} leak(s) elsewhere in the kernel "
                     "(reported, not failing the run):")
        lines += [f"  {leak.headline()}" for leak in others[:10]]
        if len(others) > 10:
            lines.append(f"  ... {len(others) - 10} more in {report_path.name}")
    for splat in extra_splats:
        lines.append(f"kmemleak: the kernel logged a {splat.kind} during the scan:")
        lines += ["    " + line for line in splat.excerpt.splitlines()[:40]]
    return lines
