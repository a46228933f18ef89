"""The accelerator decision: KVM only when it really works, TCG otherwise.

A /dev/kvm that opens fine can still be useless (nested virtualisation that
aborts with "failed to set MSR", or a guest that hangs before the kernel
prints anything).  So `auto` starts with KVM when /dev/kvm is usable, watches
the first seconds of the console, and falls back to TCG by itself.  The
decisions are pure functions so they are tested without QEMU.

Such a fallback costs up to KVM_PROBE_SECONDS on every run, so a failed KVM
probe is remembered in the cache (kvm-verdict.json) for MEMO_MAX_AGE_S: while
the host kernel and the QEMU binary stay the same, `auto` goes straight to TCG
and says why.  A KVM boot that works, or another host kernel or QEMU, ends it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from runner import atomic_file
from runner.errors import UsageError
from runner.preflight import find_tool

KVM_DEVICE = "/dev/kvm"
# _IO(KVMIO=0xAE, 0x00); a working KVM answers 12.
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
# How long a KVM boot may go without printing the kernel banner before it
# counts as hung; TCG prints it within a few seconds on a 2-core machine.
KVM_PROBE_SECONDS = 15.0

KERNEL_BANNER = re.compile(r"Linux version \d")
KVM_FAILURES = re.compile(
    r"(failed to set MSR[^\r\n]*|KVM: entry failed[^\r\n]*|kvm run failed[^\r\n]*|"
    r"KVM internal error[^\r\n]*|Could not access KVM kernel module[^\r\n]*|"
    r"failed to initialize kvm[^\r\n]*|kvm_init_vcpu failed[^\r\n]*)",
    re.IGNORECASE,
)
# How long a failed KVM probe sends `auto` straight to TCG.
MEMO_MAX_AGE_S = 24 * 3600.0
# What a remembered verdict holds for; any change and KVM is probed again.
MEMO_IDENTITY = ("host_kernel", "qemu", "qemu_mtime", "qemu_size")


@dataclass(frozen=True)
class AccelPlan:
    """Which accelerator to boot with first, what to fall back to, and why."""

    first: str
    fallback: str | None
    reason: str


def kvm_usability(device: str = KVM_DEVICE) -> tuple[bool, str]:
    """Whether /dev/kvm exists, is accessible to this user and answers the API ioctl."""
    if not os.path.exists(device):
        return False, f"{device} does not exist"
    if not os.access(device, os.R_OK | os.W_OK):
        return False, f"{device} is not accessible to this user (join the kvm group)"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{device} cannot be opened: {exc.strerror}"
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"{device} does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if api != KVM_API_VERSION:
        return False, f"{device} reports KVM API {api}, expected {KVM_API_VERSION}"
    return True, f"{device} is usable"


def plan_accel(requested: str, kvm_ok: bool, kvm_reason: str,
               remembered: dict | None = None) -> AccelPlan:
    """Turn --accel and the /dev/kvm check into a plan; explicit kvm without KVM is an error.

    `remembered` is a KVM failure that still applies to this host (remembered_failure):
    with it `auto` skips the KVM probe; an explicit --accel kvm ignores it.
    """
    if requested == "tcg":
        return AccelPlan("tcg", None, "--accel tcg")
    if requested == "kvm":
        if not kvm_ok:
            raise UsageError(f"--accel kvm, but {kvm_reason}; use --accel auto or tcg")
        return AccelPlan("kvm", None, "--accel kvm")
    if requested != "auto":
        raise UsageError(f"--accel {requested}: choose auto, kvm or tcg")
    if kvm_ok and remembered is not None:
        return AccelPlan("tcg", None, remembered_reason(remembered))
    if kvm_ok:
        return AccelPlan("kvm", "tcg", f"auto: {kvm_reason}, trying KVM first")
    return AccelPlan("tcg", None, f"auto: {kvm_reason}, using TCG")


def remembered_reason(memo: dict, max_age: float = MEMO_MAX_AGE_S) -> str:
    """Why `auto` skips KVM, and how to make it try again."""
    return (f"auto: KVM failed here at {memo.get('failed_at_local', '?')}: "
            f"{memo.get('reason', 'unknown reason')}; remembered for {max_age / 3600:.0f} h "
            "\u2014 --accel kvm to try it again")


def remembered_failure(memo: dict | None, identity: dict, now: float,
                       max_age: float = MEMO_MAX_AGE_S) -> dict | None:
    """The memo if it records a KVM failure on this very host kernel and QEMU, younger than max_age."""
    if not isinstance(memo, dict) or memo.get("verdict") != "broken":
        return None
    if any(memo.get(key) != identity.get(key) for key in MEMO_IDENTITY):
        return None
    failed_at = memo.get("failed_at")
    if not isinstance(failed_at, (int, float)) or not 0 <= now - failed_at < max_age:
        return None
    return memo


def next_memo(memo: dict | None, identity: dict, used: str, kvm_failure: str | None,
              banner_seen: bool, now: float) -> dict | None:
    """The memo after a boot: a new one when the KVM probe failed, none once KVM ran a
    kernel, otherwise the old one while it still applies to this host and none if not."""
    if kvm_failure is not None:
        return {**{key: identity.get(key) for key in MEMO_IDENTITY}, "verdict": "broken",
                "reason": kvm_failure, "failed_at": now,
                "failed_at_local": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now))}
    if used == "kvm" and banner_seen:
        return None
    return remembered_failure(memo, identity, now)


def host_identity(qemu: str | None = None) -> dict:
    """The host kernel and the QEMU binary virtme-ng will start (found the way it finds it)."""
    path = qemu or find_tool(f"qemu-system-{platform.machine()}")
    identity: dict = {"host_kernel": platform.release(), "qemu": path, "qemu_mtime": None,
                      "qemu_size": None}
    if path:
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            identity.update(qemu_mtime=stat.st_mtime, qemu_size=stat.st_size)
    return identity


def read_memo(path: Path) -> dict | None:
    """The stored KVM verdict; None when there is none or it is unreadable."""
    try:
        memo = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return memo if isinstance(memo, dict) else None


def write_memo(path: Path, memo: dict | None) -> None:
    """Store the verdict atomically, or remove it for None; a failure only costs the shortcut."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if memo is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_file.write_text(path, json.dumps(memo, indent=2) + "\n")


def plan_for_host(requested: str, memo_path: Path) -> AccelPlan:
    """plan_accel on this machine: /dev/kvm checked, a remembered KVM failure read."""
    kvm_ok, kvm_reason = kvm_usability()
    remembered = None
    if requested == "auto" and kvm_ok:
        remembered = remembered_failure(read_memo(memo_path), host_identity(), time.time())
    return plan_accel(requested, kvm_ok, kvm_reason, remembered)


def remember_boot(memo_path: Path, used: str, kvm_failure: str | None, banner_seen: bool,
                  failed_at: float | None = None) -> str | None:
    """Update the memo after a boot; a line saying what changed, None when nothing did."""
    memo = read_memo(memo_path)
    now = failed_at if kvm_failure is not None and failed_at is not None else time.time()
    new = next_memo(memo, host_identity(), used, kvm_failure, banner_seen, now)
    if new == memo:
        return None
    write_memo(memo_path, new)
    if new is not None:
        return (f"KVM failure remembered in {memo_path} for {MEMO_MAX_AGE_S / 3600:.0f} h; "
                "later --accel auto runs go straight to TCG")
    if memo is None:
        return None
    if used == "kvm" and banner_seen:
        return f"KVM works again; forgot the remembered failure in {memo_path}"
    return f"forgot the KVM failure in {memo_path}: it no longer applies to this host"


def judge_kvm(console: str, elapsed: float, exited: bool,
              window: float = KVM_PROBE_SECONDS) -> tuple[str, str]:
    """Judge a KVM boot from its console so far: ('ok'|'broken'|'pending', reason).

    Broken means fall back to TCG: QEMU printed a KVM failure, exited before the
    kernel banner, or showed no banner within `window` seconds.
    """
    failure = KVM_FAILURES.search(console)
    if failure:
        return "broken", f"QEMU reported '{failure.group(1).strip()}' under KVM"
    if KERNEL_BANNER.search(console):
        return "ok", "the kernel started under KVM"
    if exited:
        return "broken", "QEMU exited under KVM before the kernel printed its banner"
    if elapsed >= window:
        return "broken", f"no kernel output under KVM within {window:.0f} s"
    return "pending", "waiting for the kernel banner"
