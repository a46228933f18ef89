"""The KVM/TCG decision, on console text captured from real boots on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner import accel
from runner.errors import ExitCode, UsageError

FIXTURES = Path(__file__).parent / "fixtures" / "runner"
# QEMU under KVM on this host: the real-mode setup prints, then nothing.
KVM_HANG = (FIXTURES / "console-kvm-hang.log").read_text()
# Debian's 6.12 under KVM on this host: KVM gives up at once.
KVM_INTERNAL_ERROR = (FIXTURES / "console-kvm-internal-error-6.12.log").read_text()
# The same kernel under TCG a moment later: the banner arrives.
TCG_START = (FIXTURES / "console-tcg-boot-start.log").read_text()
# The shape of QEMU's abort when KVM refuses a vCPU MSR (kvm_buf_set_msrs), as
# reported for nested virtualisation on hosts like this one; this machine's
# KVM hangs instead, so this text is reconstructed, not captured.
MSR_ABORT = ("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0\n"
             "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3218: kvm_buf_set_msrs: "
             "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n")


def test_explicit_tcg_never_touches_kvm():
    assert accel.plan_accel("tcg", True, "/dev/kvm is usable") == accel.AccelPlan(
        "tcg", None, "--accel tcg")


def test_explicit_kvm_without_kvm_is_a_usage_error():
    with pytest.raises(UsageError) as error:
        accel.plan_accel("kvm", False, "/dev/kvm does not exist")
    assert error.value.exit_code == ExitCode.USAGE
    assert "/dev/kvm does not exist" in error.value.message


def test_explicit_kvm_has_no_fallback():
    assert accel.plan_accel("kvm", True, "ok").fallback is None


def test_auto_tries_kvm_first_and_keeps_tcg_in_reserve():
    plan = accel.plan_accel("auto", True, "/dev/kvm is usable")
    assert (plan.first, plan.fallback) == ("kvm", "tcg")
    assert "trying KVM first" in plan.reason


def test_auto_without_kvm_goes_straight_to_tcg_and_says_why():
    plan = accel.plan_accel("auto", False, "/dev/kvm is not accessible to this user")
    assert (plan.first, plan.fallback) == ("tcg", None)
    assert "not accessible" in plan.reason


def test_a_kvm_boot_stuck_after_probing_edd_is_broken_after_the_window():
    assert accel.judge_kvm(KVM_HANG, elapsed=5.0, exited=False)[0] == "pending"
    verdict, reason = accel.judge_kvm(KVM_HANG, elapsed=15.0, exited=False)
    assert verdict == "broken"
    assert "within 15 s" in reason


def test_a_kvm_failure_message_is_broken_at_once():
    verdict, reason = accel.judge_kvm(MSR_ABORT, elapsed=0.5, exited=False)
    assert verdict == "broken"
    assert "failed to set MSR 0x10a" in reason


def test_a_real_kvm_internal_error_is_broken_at_once():
    verdict, reason = accel.judge_kvm(KVM_INTERNAL_ERROR, elapsed=1.0, exited=False)
    assert verdict == "broken"
    assert reason == "QEMU reported 'KVM internal error. Suberror: 1' under KVM"


def test_qemu_exiting_before_the_banner_is_broken():
    assert accel.judge_kvm("qemu-system-x86_64: terminated\n", 1.0, exited=True)[0] == "broken"


def test_the_kernel_banner_means_kvm_works():
    assert accel.judge_kvm(TCG_START, elapsed=3.0, exited=False)[0] == "ok"
    # Once the kernel runs, a slow boot is no reason to abandon KVM.
    assert accel.judge_kvm(TCG_START, elapsed=60.0, exited=False)[0] == "ok"


def test_kvm_usability_reports_a_missing_device(tmp_path):
    usable, reason = accel.kvm_usability(str(tmp_path / "kvm"))
    assert not usable and "does not exist" in reason


def test_kvm_usability_rejects_a_device_that_is_not_kvm(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_text("")
    usable, reason = accel.kvm_usability(str(fake))
    assert not usable
    assert "KVM_GET_API_VERSION" in reason


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="this machine has no /dev/kvm")
def test_kvm_usability_on_this_machine_answers_with_a_reason():
    usable, reason = accel.kvm_usability()
    assert reason.startswith("/dev/kvm")
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        # Opening and the API ioctl succeed even where KVM guests hang: only
        # the console watch catches that.
        assert usable, reason
