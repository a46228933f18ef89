"""The KVM/TCG decision, on console text captured from real boots on this machine."""

from __future__ import annotations

import os
import platform
import time

import pytest
from conftest import TESTS

from runner.errors import ExitCode, UsageError
from runner.stages import accel

FIXTURES = TESTS / "fixtures" / "runner"
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


# A failed KVM probe, remembered: the host and QEMU it holds for, and when.
HOST = {"host_kernel": "6.1.0-41-cloud-amd64", "qemu": "/usr/bin/qemu-system-x86_64",
        "qemu_mtime": 1779700000.0, "qemu_size": 18397984}
NOW = 1_800_000_000.0


def failed_memo(at: float = NOW - 3600, **changes) -> dict:
    return accel.next_memo(None, {**HOST, **changes}, "tcg",
                           "QEMU reported 'KVM internal error. Suberror: 1' under KVM", False, at)


def test_a_failed_probe_is_remembered_with_the_host_qemu_reason_and_time():
    memo = failed_memo(at=NOW)
    assert {k: memo[k] for k in accel.MEMO_IDENTITY} == HOST
    assert memo["verdict"] == "broken"
    assert memo["reason"] == "QEMU reported 'KVM internal error. Suberror: 1' under KVM"
    assert memo["failed_at"] == NOW
    assert memo["failed_at_local"] == time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(NOW))


def test_auto_with_a_fresh_memo_goes_straight_to_tcg_and_says_how_to_retry():
    memo = failed_memo()
    remembered = accel.remembered_failure(memo, HOST, NOW)
    plan = accel.plan_accel("auto", True, "/dev/kvm is usable", remembered)
    assert (plan.first, plan.fallback) == ("tcg", None)
    assert plan.reason == (
        f"auto: KVM failed here at {memo['failed_at_local']}: QEMU reported 'KVM internal "
        "error. Suberror: 1' under KVM; remembered for 24 h \u2014 --accel kvm to try it again")


def test_explicit_choices_ignore_the_memo():
    remembered = accel.remembered_failure(failed_memo(), HOST, NOW)
    assert accel.plan_accel("kvm", True, "ok", remembered) == accel.AccelPlan(
        "kvm", None, "--accel kvm")
    assert accel.plan_accel("tcg", True, "ok", remembered).reason == "--accel tcg"
    # Without a usable /dev/kvm the device is the reason, not the memo.
    assert accel.plan_accel("auto", False, "/dev/kvm does not exist", remembered).reason == (
        "auto: /dev/kvm does not exist, using TCG")


@pytest.mark.parametrize("memo, why", [
    (failed_memo(at=NOW - 24 * 3600), "24 h old"),
    (failed_memo(at=NOW + 60), "from the future"),
    (failed_memo(host_kernel="6.1.0-42-cloud-amd64"), "another host kernel"),
    (failed_memo(qemu="/opt/qemu/bin/qemu-system-x86_64"), "another QEMU binary"),
    (failed_memo(qemu_mtime=1779800000.0), "QEMU upgraded in place"),
    (failed_memo(qemu_size=1), "QEMU replaced"),
    ({"verdict": "ok", **HOST, "failed_at": NOW}, "not a failure"),
    ({"reason": "x"}, "incomplete"),
    (["not", "a", "dict"], "not an object"),
    (None, "no memo"),
])
def test_a_memo_that_does_not_hold_here_is_ignored(memo, why):
    assert accel.remembered_failure(memo, HOST, NOW) is None, why
    plan = accel.plan_accel("auto", True, "/dev/kvm is usable",
                            accel.remembered_failure(memo, HOST, NOW))
    assert (plan.first, plan.fallback) == ("kvm", "tcg"), why


def test_a_memo_just_under_a_day_old_still_holds():
    assert accel.remembered_failure(failed_memo(at=NOW - 24 * 3600 + 1), HOST, NOW) is not None


def test_a_kvm_boot_that_reached_the_banner_forgets_the_failure():
    assert accel.next_memo(failed_memo(), HOST, "kvm", None, True, NOW) is None


def test_a_tcg_run_keeps_a_memo_that_holds_and_drops_one_that_does_not():
    memo = failed_memo()
    assert accel.next_memo(memo, HOST, "tcg", None, True, NOW) == memo
    # A KVM run that never printed the banner proves nothing either way.
    assert accel.next_memo(memo, HOST, "kvm", None, False, NOW) == memo
    moved = {**HOST, "host_kernel": "6.12.0-1-amd64"}
    assert accel.next_memo(memo, moved, "tcg", None, True, NOW) is None


def test_another_failure_renews_the_memo():
    old = failed_memo(at=NOW - 20 * 3600)
    new = accel.next_memo(old, HOST, "tcg", "no kernel output under KVM within 15 s", True, NOW)
    assert new["failed_at"] == NOW and new["reason"].startswith("no kernel output")


def test_the_memo_file_round_trips_and_survives_garbage(tmp_path):
    path = tmp_path / "cache" / "kvm-verdict.json"
    assert accel.read_memo(path) is None
    memo = failed_memo()
    accel.write_memo(path, memo)
    assert accel.read_memo(path) == memo
    assert [p.name for p in path.parent.iterdir()] == ["kvm-verdict.json"]
    path.write_text("{truncated")
    assert accel.read_memo(path) is None
    accel.write_memo(path, None)
    assert not path.exists()
    accel.write_memo(path, None)  # removing twice is fine


def test_host_identity_names_this_kernel_and_the_qemu_binary(tmp_path):
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_bytes(b"\0" * 10)
    identity = accel.host_identity(str(qemu))
    assert identity == {"host_kernel": platform.release(), "qemu": str(qemu),
                        "qemu_mtime": qemu.stat().st_mtime, "qemu_size": 10}


def test_plan_for_host_and_remember_boot_on_a_real_file(tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "kvm_usability", lambda: (True, "/dev/kvm is usable"))
    monkeypatch.setattr(accel, "host_identity", lambda: dict(HOST))
    path = tmp_path / "kvm-verdict.json"
    assert accel.plan_for_host("auto", path).first == "kvm"
    failed_at = time.time() - 600
    note = accel.remember_boot(path, "tcg", "no kernel output under KVM within 15 s", True,
                               failed_at)
    assert note and "go straight to TCG" in note
    # The time of the probe, not of the end of the run.
    assert accel.read_memo(path)["failed_at"] == failed_at
    plan = accel.plan_for_host("auto", path)
    assert (plan.first, plan.fallback) == ("tcg", None)
    assert "no kernel output under KVM within 15 s; remembered for 24 h" in plan.reason
    # The TCG run the memo chose changes nothing.
    assert accel.remember_boot(path, "tcg", None, True) is None and path.exists()
    # --accel kvm that boots ends it.
    assert accel.plan_for_host("kvm", path).first == "kvm"
    assert "KVM works again" in accel.remember_boot(path, "kvm", None, True)
    assert not path.exists()
    assert accel.plan_for_host("auto", path).first == "kvm"
