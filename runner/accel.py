"""The accelerator decision: KVM only when it really works, TCG otherwise.

A /dev/kvm that opens fine can still be useless (nested virtualisation that
aborts with "failed to set MSR", or a guest that hangs before the kernel
prints anything).  So `auto` starts with KVM when /dev/kvm is usable, watches
the first seconds of the console, and falls back to TCG by itself.  The
decisions are pure functions so they are tested without QEMU.
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass

from runner.errors import UsageError

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


def plan_accel(requested: str, kvm_ok: bool, kvm_reason: str) -> AccelPlan:
    """Turn --accel and the /dev/kvm check into a plan; explicit kvm without KVM is an error."""
    if requested == "tcg":
        return AccelPlan("tcg", None, "--accel tcg")
    if requested == "kvm":
        if not kvm_ok:
            raise UsageError(f"--accel kvm, but {kvm_reason}; use --accel auto or tcg")
        return AccelPlan("kvm", None, "--accel kvm")
    if requested != "auto":
        raise UsageError(f"--accel {requested}: choose auto, kvm or tcg")
    if kvm_ok:
        return AccelPlan("kvm", "tcg", f"auto: {kvm_reason}, trying KVM first")
    return AccelPlan("tcg", None, f"auto: {kvm_reason}, using TCG")


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
