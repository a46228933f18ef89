"""Guest side of `--debug-kernel`: forget kmemleak's boot noise before the suite, scan after it.

    python kmemleak_guest.py clear OUTPUT_DIR     (before pytest)
    python kmemleak_guest.py collect OUTPUT_DIR   (after pytest)

Runs inside the guest with the runner's own interpreter (the host's root
filesystem is shared read-only), by path, so it needs nothing of the runner
package.  Everything goes into files in the writable output directory, never
onto the console: the report itself is kmemleak.txt, and the console log
level is lowered while scanning so the kernel's "N new suspected memory
leaks" line does not reach the console, where the host's splat scan would
fail the run for any leak.  The host decides instead (runner.stages.debug_kernel):
leaks through BPF local storage fail the run, others are only reported.
What the kernel logged during the scan is kept in kmemleak-dmesg.txt, so a
real splat in that window is still seen.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

DEBUGFS = "/sys/kernel/debug"
KMEMLEAK = DEBUGFS + "/kmemleak"
PRINTK = "/proc/sys/kernel/printk"

STATUS_FILE = "kmemleak-status"
REPORT_FILE = "kmemleak.txt"
DMESG_FILE = "kmemleak-dmesg.txt"

# kmemleak reports only objects older than 5 s (MSECS_MIN_AGE) whose
# checksum did not change between two scans; sockets and their storage are
# freed from RCU callbacks a moment after the last close().
SETTLE_SECONDS = 3.0
BETWEEN_SCANS_SECONDS = 6.0


def _say(message: str) -> None:
    # Plain words only: nothing the host's splat catalogue could take for a report.
    print(f"debug-kernel: {message}", flush=True)


def _write_file(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)


def ensure_kmemleak() -> None:
    """Mount debugfs when it is not; raise RuntimeError when the kernel has no kmemleak."""
    if not os.path.exists(KMEMLEAK) and not os.path.ismount(DEBUGFS):
        subprocess.run(["mount", "-t", "debugfs", "debugfs", DEBUGFS], check=False)
    if not os.path.exists(KMEMLEAK):
        raise RuntimeError(f"{KMEMLEAK} does not exist: kernel built without "
                           "CONFIG_DEBUG_KMEMLEAK, or debugfs could not be mounted")


def kmemleak_command(word: str) -> None:
    """Write one command ("clear", "scan") to kmemleak; OSError when kmemleak disabled itself."""
    with open(KMEMLEAK, "w") as control:
        control.write(word)


def clear(out: str) -> None:
    """Mark every object allocated so far as reported: boot-time leaks are not the suite's."""
    try:
        ensure_kmemleak()
        kmemleak_command("clear")
    except (OSError, RuntimeError) as exc:
        _write_file(os.path.join(out, STATUS_FILE), f"error: clear failed: {exc}\n")
        _say(f"kmemleak clear failed: {exc}")
        return
    _write_file(os.path.join(out, STATUS_FILE), "cleared\n")
    _say("kmemleak cleared before the suite")


def _open_kernel_log():
    try:
        from bpfkit.kmsg import KernelLog

        return KernelLog()
    except (ImportError, OSError) as exc:
        _say(f"cannot follow the kernel log during the scan: {exc}")
        return None


def collect(out: str) -> None:
    """Scan twice with a pause, save the report; status 'ok' or 'error: why'."""
    status_path = os.path.join(out, STATUS_FILE)
    try:
        with open(status_path, encoding="utf-8") as stream:
            before = stream.read().strip()
    except OSError:
        before = "missing"
    if before != "cleared":
        _write_file(status_path, f"error: kmemleak was not cleared before the suite ({before})\n")
        return
    log = _open_kernel_log()
    saved_levels = None
    try:
        with open(PRINTK) as stream:
            saved_levels = stream.read().split()
        with open(PRINTK, "w") as stream:
            stream.write("1")
    except OSError as exc:
        _say(f"could not lower the console log level: {exc}")
    try:
        time.sleep(SETTLE_SECONDS)
        started = time.monotonic()
        _say("kmemleak scan 1 of 2")
        kmemleak_command("scan")
        time.sleep(BETWEEN_SCANS_SECONDS)
        _say("kmemleak scan 2 of 2")
        kmemleak_command("scan")
        with open(KMEMLEAK, encoding="utf-8", errors="replace") as stream:
            report = stream.read()
        seconds = time.monotonic() - started
    except OSError as exc:
        # kmemleak disables itself (pool exhausted, internal error); reading then
        # fails with EBUSY.  Not "no leaks": the host fails the run on this.
        _write_file(status_path, f"error: kmemleak scan or read failed: {exc}\n")
        _say(f"kmemleak scan failed: {exc}")
        return
    finally:
        if saved_levels:
            try:
                with open(PRINTK, "w") as stream:
                    stream.write(saved_levels[0])
            except OSError:
                pass
        if log is not None:
            _write_file(os.path.join(out, DMESG_FILE), log.read_new())
    _write_file(os.path.join(out, REPORT_FILE), report)
    objects = report.count("unreferenced object 0x")
    _write_file(status_path, f"ok {objects} {seconds:.1f}\n")
    _say(f"kmemleak report saved: {objects} object(s), scans took {seconds:.0f} s")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("clear", "collect"):
        print("usage: kmemleak_guest.py clear|collect OUTPUT_DIR", file=sys.stderr)
        return 2
    {"clear": clear, "collect": collect}[argv[0]](argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
