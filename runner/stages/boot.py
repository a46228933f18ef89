"""Stage 5, the boot: virtme-ng boots the kernel, the guest runs pytest, pexpect watches the console.

The host's root filesystem is shared read-only over 9p and the output
directory read-write, so the guest runs the suite with the very interpreter
and site-packages the runner uses.  The pytest exit code comes back through
a file in the output directory, never parsed from the console.  The console
is logged in full; a panic, a stall or the deadline ends the run early, and
QEMU is always killed with its whole process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import pexpect

from runner import process_group
from runner.errors import InfrastructureError, UsageError
from runner.preflight import find_tool
from runner.stages.accel import KERNEL_BANNER, AccelPlan, judge_kvm
from runner.stages.artifacts import GUEST_RELEASE_FILE, JUNIT_FILE, PYTEST_EXIT_FILE
from runner.stages.results import console_progress

PANIC = re.compile(r"Kernel panic - not syncing")
# printk lines ("[   12.345678] ..."): shown live only with --verbose.
PRINTK_LINE = re.compile(r"^\s*\[\s*\d+\.\d+\]")
# Output that means QEMU or virtme-ng itself failed, not the kernel.
HOST_SIDE_FAILURE = re.compile(
    r"(qemu-system-\S+: .*|virtme-run: .*|.*: not found|Traceback \(most recent call last\).*|"
    r"(?:vng|virtme-ng|virtme-run): error: .*)"
)
# After a panic QEMU normally exits at once (panic=-1); give the trace a
# moment to reach the log if it does not.
PANIC_DRAIN_SECONDS = 5.0
# Reports (bpfkit.splats kinds) of a kernel that stopped making progress.  It
# keeps printing them (an RCU stall every 21-60 s), so the silent-console
# watch never fires; after one of them plus this long without test output
# the run ends instead of waiting for --timeout.  The report already makes
# the verdict a splat (exit 3), so ending early cannot change it.
WEDGE_KINDS = frozenset({"RCU stall", "soft lockup", "hard lockup", "hung task"})
WEDGE_GRACE_SECONDS = 30.0
# printk's stamp anywhere in a line: user-space output without a newline
# (pytest's "test_x.py::test_y ") gets the kernel's next message glued to it.
_PRINTK_STAMP = re.compile(r"\[\s*\d+\.\d{6}\]")


def vng_command(
    vng: str, kernel: Path, accel: str, cpus: int, memory: str, rw_dirs: Sequence[Path],
    guest_command: str | None,
) -> list[str]:
    """The virtme-ng command line: the only place it is built."""
    # --force-9p: the root filesystem goes over 9p; probing for virtiofsd first
    # costs seconds per boot and fails where it is not installed.
    command = [vng, "--run", str(kernel), "--verbose", "--force-9p", "--user", "root",
               "--cpus", str(cpus), "--memory", memory]
    if accel == "tcg":
        # no_timer_check: on an overloaded host the emulated CPU can miss the
        # boot-time IO-APIC timer check and panic ("IO-APIC + timer doesn't
        # work!"), a host problem the verdict would call a kernel crash.
        command += ["--disable-kvm", "--append", "no_timer_check"]
    for directory in rw_dirs:
        command += ["--rwdir", str(directory)]
    if guest_command is not None:
        command += ["--exec", guest_command]
    return command


def pytest_arguments(suite: str, junit: str, markers: str | None,
                     keyword: str | None) -> list[str]:
    """pytest's arguments after `-m pytest`, the same for a VM and an SSH target."""
    args = [suite, f"--junitxml={junit}",
            # The root filesystem is read-only in the guest: no cache dir.
            "-p", "no:cacheprovider", "-v", "-rfEs",
            # The console is a log read by people and regexes (result lines,
            # splats): whatever TERM the guest inherits, no ANSI colour codes.
            "--color=no"]
    if markers:
        args += ["-m", markers]
    if keyword:
        args += ["-k", keyword]
    return args


def guest_test_command(
    python: str, suite_dir: Path, output_dir: Path, markers: str | None,
    keyword: str | None, extra_args: Sequence[str] = (), pycache_dir: Path | None = None,
    launcher: Sequence[str] | None = None,
) -> str:
    """The shell command the guest runs: pytest on the suite, exit code into its own file.

    extra_args are appended to pytest's argv as they are (quoted for the shell).
    pycache_dir, a directory the guest can write (see run_guest's rw_dirs),
    keeps the bytecode of everything the guest imports from one run to the next.
    launcher replaces `python -m` (guest_bundle.GuestBundle.launcher).
    """
    pytest = [*(launcher or [python, "-m"]), "pytest",
              *pytest_arguments(str(suite_dir), str(output_dir / JUNIT_FILE), markers, keyword),
              *extra_args]
    # Start-up over 9p under TCG is slow: no scan of every installed
    # distribution for pytest plugins (the suite needs none), and bytecode
    # (pytest's rewritten test modules too) from a writable cache instead of
    # recompiling what the read-only root cannot store.
    env = "export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1; "
    if pycache_dir is not None:
        env += f"export PYTHONPYCACHEPREFIX={shlex.quote(str(pycache_dir))}; "
    else:
        env += "export PYTHONDONTWRITEBYTECODE=1; "
    return (
        # From the suite's directory, pytest reports short test paths.
        f"cd {shlex.quote(str(suite_dir))}; {env}"
        f"uname -r > {shlex.quote(str(output_dir / GUEST_RELEASE_FILE))}; "
        f"{shlex.join(pytest)}; "
        f"echo $? > {shlex.quote(str(output_dir / PYTEST_EXIT_FILE))}"
    )


@dataclass
class BootOutcome:
    """How the guest run ended, as plain values for the results stage."""

    status: str  # exited | timeout | stalled | panic | wedged
    accel: str
    accel_reason: str
    seconds: float
    command: list[str]
    exit_status: int | None = None
    banner_seconds: float | None = None
    detail: str = ""
    attempts: list[str] = field(default_factory=list)
    # Why and when (time.time()) the KVM probe failed when `auto` fell back to TCG.
    kvm_failure: str | None = None
    kvm_failed_at: float | None = None


def kill_process_group(child: pexpect.spawn, grace: float = 3.0) -> None:
    """SIGTERM then SIGKILL the child's whole process group (vng, virtme-run, QEMU)."""
    pgid = child.pid
    process_group.stop(pgid, ((signal.SIGTERM, grace), (signal.SIGKILL, grace)),
                       lambda: not process_group.alive(pgid))
    # The processes are gone either way; closing the pty is best effort.
    with contextlib.suppress(OSError, pexpect.ExceptionPexpect):
        child.close(force=True)


@dataclass
class _Attempt:
    status: str
    detail: str
    exit_status: int | None
    banner_seconds: float | None


def _child_env(vng: str, interactive: bool = False) -> dict:
    env = dict(os.environ)
    # vng starts virtme-run by name: make the one beside vng (same venv) win.
    env["PATH"] = os.path.dirname(vng) + os.pathsep + env.get("PATH", "")
    # virtme-ng hands TERM to the guest on the kernel command line.  A logged
    # run must not colour its console whatever terminal the caller has; an
    # interactive shell keeps the caller's terminal.
    if interactive:
        env.setdefault("TERM", "dumb")
    else:
        env["TERM"] = "dumb"
    return env


def _spawn(command: Sequence[str], env: dict) -> pexpect.spawn:
    try:
        return pexpect.spawn(command[0], list(command[1:]), env=env, encoding="utf-8",
                             codec_errors="replace", timeout=None, echo=False,
                             dimensions=(50, 200))
    except pexpect.ExceptionPexpect as exc:
        raise InfrastructureError(f"could not start {command[0]}: {exc}") from None


class WedgeWatch:
    """Spots a wedged kernel on the console: a stall/lockup/hung-task report, then no test output.

    Fed line by line; any user-space output (pytest's result lines) after a
    report means the tests moved on and disarms it.
    """

    def __init__(self, grace: float | None = None):
        try:
            from bpfkit.splats import find_splats
        except ImportError as exc:
            raise InfrastructureError(f"cannot watch for kernel splats: {exc}") from None
        self._find_splats = find_splats
        self.grace = WEDGE_GRACE_SECONDS if grace is None else grace
        self.report: tuple[str, float] | None = None
        # User-space lines only, enough to find pytest's running node id.
        self._user: deque[str] = deque(maxlen=200)

    def line(self, line: str, now: float) -> None:
        """One complete console line, seen at `now` (time.monotonic())."""
        stamp = _PRINTK_STAMP.search(line)
        user = line[:stamp.start()] if stamp else line
        kernel = line[stamp.start():] if stamp else ""
        kinds = {s.kind for s in self._find_splats(kernel or line)}
        if user.strip() and not (kinds & WEDGE_KINDS and not stamp):
            self._user.append(user)
            self.report = None
        wedge = sorted(kinds & WEDGE_KINDS)
        if wedge and self.report is None:
            self.report = (wedge[0], now)

    def wedged(self, now: float, partial: str = "") -> str | None:
        """Why the guest counts as wedged at `now`, naming the running test; None while it is not."""
        if self.report is None or now - self.report[1] < self.grace:
            return None
        stamp = _PRINTK_STAMP.search(partial)
        tail = partial[:stamp.start()] if stamp else partial
        running = console_progress([*self._user, tail]).running
        during = f" during {running}" if running else ""
        return (f"kernel wedged: {self.report[0]} reported, then no test output for "
                f"{self.grace:.0f} s{during}")


def _text(lines: list[str], partial: str | None) -> str:
    """Complete console lines plus the unfinished tail, as one text to judge."""
    return "\n".join([*lines, partial or ""])


def _watch(
    child: pexpect.spawn, log: TextIO, started: float, deadline: float, stall_timeout: float,
    probe_kvm: bool, echo: Callable[[str], None], verbose: bool,
) -> _Attempt:
    """Follow the console line by line until the guest exits, panics, stalls or runs out of time."""
    child.logfile_read = log
    head: list[str] = []
    banner_at: float | None = None
    panic_at: float | None = None
    wedge = WedgeWatch()
    last_output = time.monotonic()
    pending = ""
    while True:
        now = time.monotonic()
        wait = max(0.05, min(1.0, deadline - now))
        index = child.expect([r"\r?\n", pexpect.EOF, pexpect.TIMEOUT], timeout=wait)
        now = time.monotonic()
        if index == 0:
            line = child.before.replace("\r", "")
            last_output = now
            if len(head) < 400:
                head.append(line)
            if banner_at is None and KERNEL_BANNER.search(line):
                banner_at = now - started
            if panic_at is None and PANIC.search(line):
                panic_at = now
            wedge.line(line, now)
            # Without --verbose, show what the guest command prints, not the
            # decompressor chatter before the banner or the kernel's printk lines.
            if verbose or (banner_at is not None and not PRINTK_LINE.match(line)):
                echo(line)
        elif index == 1:
            child.close()
            status = child.exitstatus if child.exitstatus is not None else -(child.signalstatus or 0)
            if probe_kvm and banner_at is None:
                _, reason = judge_kvm(_text(head, child.before), now - started, True)
                return _Attempt("kvm-broken", reason, status, None)
            if panic_at is not None:
                return _Attempt("panic", "kernel panic", status, banner_at)
            if banner_at is None:
                # A kernel that is broken hangs or stalls; exiting before the banner
                # means QEMU or virtme-ng never got the guest going.
                text = _text(head, child.before)
                host = HOST_SIDE_FAILURE.findall(text)
                why = host[-1].strip()[:200] if host else f"exit status {status}, no kernel output"
                raise InfrastructureError(
                    f"QEMU/virtme-ng did not start the guest ({why}); see {log.name}",
                    details=[line for line in text.splitlines() if line.strip()][-8:],
                )
            return _Attempt("exited", f"guest exited with status {status}", status, banner_at)
        else:
            if child.buffer != pending:
                pending = child.buffer
                last_output = now
        if probe_kvm and banner_at is None:
            verdict, reason = judge_kvm(_text(head, child.buffer), now - started, False)
            if verdict == "broken":
                return _Attempt("kvm-broken", reason, None, None)
        if panic_at is not None and now - panic_at > PANIC_DRAIN_SECONDS:
            return _Attempt("panic", "kernel panic", None, banner_at)
        wedged = wedge.wedged(now, child.buffer)
        if wedged:
            return _Attempt("wedged", wedged, None, banner_at)
        if now >= deadline:
            return _Attempt("timeout", "the run exceeded --timeout", None, banner_at)
        if now - last_output >= stall_timeout:
            return _Attempt("stalled", f"no console output for {stall_timeout:.0f} s", None,
                            banner_at)


def find_vng() -> str:
    """Path of vng (the one in the runner's venv first); a usage error if absent."""
    vng = find_tool("vng")
    if vng is None:
        raise UsageError("vng (virtme-ng) not found; install it with: pip install virtme-ng")
    return vng


def run_guest(
    kernel: Path, output_dir: Path, guest_command: str, plan: AccelPlan, console_log: Path,
    cpus: int = 2, memory: str = "2G", timeout: float = 1800.0, stall_timeout: float = 300.0,
    echo: Callable[[str], None] = print, verbose: bool = False, vng: str | None = None,
    rw_dirs: Sequence[Path] = (),
) -> BootOutcome:
    """Boot the kernel, run guest_command, and report how it ended (fallback to TCG included).

    The guest may write output_dir and rw_dirs (created when missing); the rest is read-only.
    """
    vng = vng or find_vng()
    for directory in rw_dirs:
        Path(directory).mkdir(parents=True, exist_ok=True)
    env = _child_env(vng)
    started = time.monotonic()
    deadline = started + timeout
    accel, reason = plan.first, plan.reason
    attempts: list[str] = []
    kvm_failure, kvm_failed_at = None, None
    with open(console_log, "w", encoding="utf-8", errors="replace") as log:
        while True:
            command = vng_command(vng, kernel, accel, cpus, memory, [output_dir, *rw_dirs],
                                  guest_command)
            log.write(f"### accel={accel} ({reason})\n### $ {shlex.join(command)}\n")
            log.flush()
            attempt_started = time.monotonic()
            child = _spawn(command, env)
            try:
                result = _watch(child, log, attempt_started, deadline, stall_timeout,
                                probe_kvm=(accel == "kvm" and plan.fallback is not None),
                                echo=echo, verbose=verbose)
            finally:
                kill_process_group(child)
            attempts.append(f"{accel}: {result.detail}")
            if result.status == "kvm-broken" and plan.fallback:
                kvm_failure, kvm_failed_at = result.detail, time.time()
                reason = f"auto: fell back to {plan.fallback}: {result.detail}"
                echo(f"boot: {result.detail}; retrying with {plan.fallback}")
                log.write(f"\n### {reason}\n")
                accel = plan.fallback
                plan = AccelPlan(plan.fallback, None, reason)
                continue
            return BootOutcome(
                status=result.status, accel=accel, accel_reason=reason,
                seconds=time.monotonic() - started, command=command,
                exit_status=result.exit_status, banner_seconds=result.banner_seconds,
                detail=result.detail, attempts=attempts, kvm_failure=kvm_failure,
                kvm_failed_at=kvm_failed_at,
            )


def run_shell(kernel: Path, plan: AccelPlan, cpus: int = 2, memory: str = "2G",
              echo: Callable[[str], None] = print) -> int:
    """--shell: boot the same kernel with an interactive root shell on this terminal."""
    vng = find_vng()
    env = _child_env(vng, interactive=True)
    accel, reason = plan.first, plan.reason
    while True:
        command = vng_command(vng, kernel, accel, cpus, memory, [], None)
        echo(f"shell: booting with {accel} ({reason}); exit the shell to stop the guest")
        size = shutil.get_terminal_size()
        child = pexpect.spawn(command[0], command[1:], env=env, timeout=None, echo=False,
                              dimensions=(size.lines, size.columns))
        try:
            if accel == "kvm" and plan.fallback:
                started = time.monotonic()
                seen = ""
                while True:
                    try:
                        seen += child.read_nonblocking(4096, timeout=1.0).decode("utf-8", "replace")
                    except pexpect.TIMEOUT:
                        pass
                    except pexpect.EOF:
                        verdict, why = judge_kvm(seen, time.monotonic() - started, True)
                        break
                    verdict, why = judge_kvm(seen, time.monotonic() - started, False)
                    if verdict != "pending":
                        break
                if verdict == "broken":
                    kill_process_group(child)
                    reason = f"auto: fell back to {plan.fallback}: {why}"
                    accel = plan.fallback
                    plan = AccelPlan(accel, None, reason)
                    continue
                os.write(1, seen.encode())
            child.interact(escape_character=None)
            child.close()
            return child.exitstatus or 0
        finally:
            kill_process_group(child)
