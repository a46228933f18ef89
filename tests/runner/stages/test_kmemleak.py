"""kmemleak report parsing, BPF local storage classification and the --debug-kernel verdict."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import TESTS

from runner.errors import ExitCode
from runner.guest import kmemleak_guest
from runner.stages import debug_kernel, kmemleak, results

FIXTURES = TESTS / "fixtures"
REPORT_5_4 = (FIXTURES / "splats" / "kmemleak-report-5.4.log").read_text()
# From this project's 6.1 debug kernel with elements leaked at socket destruction.
REPORT_SELEM = (FIXTURES / "kmemleak" / "kmemleak-bpf-selem-6.1-debug.log").read_text()

PASS = results.Verdict(ExitCode.PASS, "pass", "162 test(s), none failed")
FAILED = results.Verdict(ExitCode.TEST_FAILURE, "test failure", "1 test(s) failed: x")
CRASH = results.Verdict(ExitCode.SPLAT, "crash", "the guest died")


def test_the_debugfs_report_parses_into_objects_with_their_backtraces():
    leaks = kmemleak.parse_report(REPORT_5_4)
    assert [(leak.address, leak.size, leak.comm, leak.pid) for leak in leaks] == [
        ("0xb5971f00", 176, "softirq", 0), ("0xb5a12300", 176, "softirq", 0)]
    first = leaks[0]
    assert len(first.frames) == 16
    assert first.frames[0] == "kmem_cache_alloc+0xe0/0x1f4"
    assert first.functions[:3] == ["kmem_cache_alloc", "__build_skb", "__netdev_alloc_skb"]
    assert first.text.splitlines()[0] == "unreferenced object 0xb5971f00 (size 176):"
    # The second object is cut short in the source report: still one object, partial trace.
    assert leaks[1].functions == ["kmem_cache_alloc", "__build_skb"]


def test_a_leak_in_the_network_stack_is_not_a_local_storage_leak():
    ours, others = kmemleak.split_leaks(kmemleak.parse_report(REPORT_5_4))
    assert ours == [] and len(others) == 2
    assert others[0].headline() == ('176 bytes at 0xb5971f00 by "softirq" pid 0: '
                                    "kmem_cache_alloc <- __build_skb <- __netdev_alloc_skb <- "
                                    "ftgmac100_alloc_rx_buf.constprop.0")


def test_a_real_6_1_report_of_leaked_sk_storage_elements_is_ours():
    leaks = kmemleak.parse_report(REPORT_SELEM)
    assert [(leak.size, leak.comm, leak.pid) for leak in leaks] == [(96, "python3", 134)] * 4
    assert leaks[0].frames[:2] == ("__kmalloc+0x4d/0x160", "bpf_selem_alloc+0x108/0x460")
    assert leaks[0].local_storage_frames() == [
        "bpf_selem_alloc+0x108/0x460", "bpf_local_storage_update+0x383/0x880",
        "bpf_fd_sk_storage_update_elem+0x115/0x170"]
    ours, others = kmemleak.split_leaks(leaks)
    assert len(ours) == 4 and others == []


def test_the_dmesg_form_with_printk_stamps_parses_the_same():
    stamped = "\n".join(f"[  123.456789] kmemleak: {line}" if i == 0 else f"[  123.456790] {line}"
                        for i, line in enumerate(REPORT_5_4.splitlines()))
    leaks = kmemleak.parse_report(stamped)
    assert [leak.functions for leak in leaks] == \
        [leak.functions for leak in kmemleak.parse_report(REPORT_5_4)]


def test_lines_after_a_report_end_its_object():
    leaks = kmemleak.parse_report(REPORT_5_4.split("unreferenced object 0xb5a12300")[0]
                                  + "root@virtme-ng:/# \n")
    assert len(leaks) == 1 and len(leaks[0].frames) == 16


# Function names from Debian 6.1.192's kernel/bpf/bpf_local_storage.c and
# net/core/bpf_sk_storage.c (the code under test), 6.2+'s cgroup storage,
# and neighbours that are not BPF local storage.
OURS = ["bpf_selem_alloc", "bpf_local_storage_alloc", "bpf_local_storage_update",
        "bpf_sk_storage_clone", "bpf_sk_storage_get", "bpf_sk_storage_get_tracing",
        "bpf_fd_sk_storage_update_elem", "bpf_sk_storage_diag_alloc",
        "bpf_sk_storage_map_alloc", "bpf_local_storage_map_alloc", "__bpf_selem_unlink_storage",
        "bpf_iter_init_sk_storage_map", "bpf_task_storage_get", "bpf_inode_storage_get",
        "bpf_cgrp_storage_get", "____bpf_sk_storage_get"]
NOT_OURS = ["kmem_cache_alloc", "__kmalloc_node", "bpf_map_kmalloc_node", "sk_clone_lock",
            "sk_prot_alloc", "bpf_cgroup_storage_alloc", "cgroup_storage_map_alloc",
            "bpf_get_local_storage", "bpf_map_update_value", "__sys_bpf", "bpf_prog_alloc",
            "htab_map_update_elem", "inet_csk_clone_lock"]


@pytest.mark.parametrize("function", OURS)
def test_local_storage_functions_are_recognised(function):
    assert kmemleak.LOCAL_STORAGE_FUNCTION.match(function)


@pytest.mark.parametrize("function", NOT_OURS)
def test_other_functions_are_not(function):
    assert not kmemleak.LOCAL_STORAGE_FUNCTION.match(function)


# --- the verdict of a --debug-kernel run -------------------------------------------------


def guest_files(out: Path, status: str, report: str = "", dmesg: str | None = None) -> None:
    (out / kmemleak_guest.STATUS_FILE).write_text(status + "\n")
    if status.startswith("ok"):
        (out / kmemleak_guest.REPORT_FILE).write_text(report)
    if dmesg is not None:
        (out / kmemleak_guest.DMESG_FILE).write_text(dmesg)


def judge(out: Path, verdict: results.Verdict) -> tuple[results.Verdict, dict, list[str]]:
    lines: list[str] = []
    verdict, facts = debug_kernel.judge(out, verdict, lines.append)
    return verdict, {"kmemleak": facts}, lines


def test_an_empty_report_keeps_the_verdict(tmp_path):
    guest_files(tmp_path, "ok 0 41.2", "")
    verdict, summary, lines = judge(tmp_path, PASS)
    assert verdict == PASS
    assert summary["kmemleak"]["objects"] == 0
    assert any("0 unreferenced object(s)" in line for line in lines)


def test_leaks_elsewhere_are_reported_but_do_not_fail_the_run(tmp_path):
    guest_files(tmp_path, "ok 2 40.0", REPORT_5_4)
    verdict, summary, lines = judge(tmp_path, PASS)
    assert verdict == PASS
    assert len(summary["kmemleak"]["other_leaks"]) == 2
    assert summary["kmemleak"]["local_storage_leaks"] == []
    assert any("not failing the run" in line for line in lines)


def test_a_local_storage_leak_fails_the_run_with_its_backtrace_shown(tmp_path):
    guest_files(tmp_path, "ok 6 23.2", REPORT_5_4 + REPORT_SELEM)
    verdict, summary, lines = judge(tmp_path, PASS)
    assert verdict.exit_code == ExitCode.SPLAT and verdict.label == "kmemleak"
    assert verdict.reason == ("4 leaked object(s) allocated through BPF local storage (first: "
                              "__kmalloc <- bpf_selem_alloc <- bpf_local_storage_update <- "
                              "bpf_fd_sk_storage_update_elem)")
    assert len(summary["kmemleak"]["local_storage_leaks"]) == 4
    assert len(summary["kmemleak"]["other_leaks"]) == 2
    text = "\n".join(lines)
    assert "    > bpf_selem_alloc+0x108/0x460" in text
    assert "      __sys_bpf+0x3231/0x4d40" in text
    # It outranks failed tests, not a crash.
    assert judge(tmp_path, FAILED)[0].label == "kmemleak"
    assert judge(tmp_path, CRASH)[0] == CRASH


def test_no_report_fails_an_otherwise_passing_run(tmp_path):
    guest_files(tmp_path, "error: kmemleak scan or read failed: [Errno 16] Device or resource busy")
    verdict, _, _ = judge(tmp_path, PASS)
    assert verdict.exit_code == ExitCode.INFRASTRUCTURE and "Device or resource busy" in \
        verdict.reason
    # A guest that never got to collect (it crashed): the crash verdict stays.
    guest_files(tmp_path, "cleared")
    assert judge(tmp_path, CRASH)[0] == CRASH
    assert judge(tmp_path, PASS)[0].label == "kmemleak unavailable"
    (tmp_path / kmemleak_guest.STATUS_FILE).unlink()
    assert "never collected" in judge(tmp_path, PASS)[0].reason
    # Failed tests say more than a missing report.
    assert judge(tmp_path, FAILED)[0] == FAILED


def test_a_splat_while_kmemleak_scanned_fails_the_run_but_its_own_notice_does_not(tmp_path):
    notice = "[  301.000001] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)\n"
    guest_files(tmp_path, "ok 2 40.0", REPORT_5_4, dmesg=notice)
    assert judge(tmp_path, PASS)[0] == PASS
    oops = (FIXTURES / "splats" / "oops-null-deref-6.1-qemu.log").read_text()
    guest_files(tmp_path, "ok 2 40.0", REPORT_5_4, dmesg=notice + oops)
    verdict, summary, _ = judge(tmp_path, PASS)
    assert verdict.exit_code == ExitCode.SPLAT and "oops while kmemleak scanned" in verdict.reason
    assert summary["kmemleak"]["scan_window_splats"][0]["kind"] == "oops"


def test_the_guest_command_wraps_pytest_and_clears_stale_files(tmp_path):
    (tmp_path / kmemleak_guest.STATUS_FILE).write_text("ok 0 1\n")
    (tmp_path / kmemleak_guest.REPORT_FILE).write_text("")
    command = debug_kernel.prepare_guest("cd /s; pytest; echo $? > x", "/venv/bin/python3",
                                         tmp_path)
    script = str(debug_kernel.GUEST_SCRIPT)
    assert command == (f"/venv/bin/python3 {script} clear {tmp_path}; cd /s; pytest; "
                       f"echo $? > x; /venv/bin/python3 {script} collect {tmp_path}")
    assert not (tmp_path / kmemleak_guest.STATUS_FILE).exists()
    assert not (tmp_path / kmemleak_guest.REPORT_FILE).exists()


def test_the_debug_fragment_is_the_projects_and_only_when_asked():
    assert debug_kernel.fragments(False) == []
    assert debug_kernel.fragments(True) == [debug_kernel.DEBUG_FRAGMENT]
    assert "CONFIG_DEBUG_KMEMLEAK=y" in debug_kernel.DEBUG_FRAGMENT.read_text()


def test_the_guest_script_says_nothing_the_splat_scan_would_take_for_a_report(tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setattr(kmemleak_guest, "KMEMLEAK", str(tmp_path / "kmemleak"))
    monkeypatch.setattr(kmemleak_guest, "DEBUGFS", str(tmp_path))
    (tmp_path / "kmemleak").write_text("")
    kmemleak_guest.clear(str(tmp_path))
    assert (tmp_path / kmemleak_guest.STATUS_FILE).read_text() == "cleared\n"
    assert (tmp_path / "kmemleak").read_text() == "clear"
    printed = capsys.readouterr().out
    assert printed and results.find_console_splats(printed) == []


def test_collect_scans_twice_with_the_console_quiet_and_saves_the_report(tmp_path, monkeypatch):
    control = tmp_path / "kmemleak"
    control.write_text(REPORT_5_4)
    printk = tmp_path / "printk"
    printk.write_text("7\t4\t1\t7\n")
    commands: list[tuple[str, str]] = []
    monkeypatch.setattr(kmemleak_guest, "KMEMLEAK", str(control))
    monkeypatch.setattr(kmemleak_guest, "PRINTK", str(printk))
    monkeypatch.setattr(kmemleak_guest, "SETTLE_SECONDS", 0)
    monkeypatch.setattr(kmemleak_guest, "BETWEEN_SCANS_SECONDS", 0)
    monkeypatch.setattr(kmemleak_guest, "_open_kernel_log", lambda: None)
    monkeypatch.setattr(kmemleak_guest, "kmemleak_command",
                        lambda word: commands.append((word, printk.read_text())))
    out = tmp_path / "out"
    out.mkdir()
    kmemleak_guest.collect(str(out))
    assert (out / kmemleak_guest.STATUS_FILE).read_text() == "error: kmemleak was not cleared " \
        "before the suite (missing)\n"
    (out / kmemleak_guest.STATUS_FILE).write_text("cleared\n")
    kmemleak_guest.collect(str(out))
    assert commands == [("scan", "1"), ("scan", "1")]
    assert printk.read_text() == "7"
    assert (out / kmemleak_guest.REPORT_FILE).read_text() == REPORT_5_4
    assert (out / kmemleak_guest.STATUS_FILE).read_text().startswith("ok 2 ")


def test_parse_re_judges_a_debug_kernel_run_with_its_kmemleak_report(tmp_path, capsys):
    from runner.commands import reparse

    junit = FIXTURES / "runner" / "junit-guest-6.1.xml"  # 2 passed, 1 skipped
    # A guest may only skip for the kernel's age or config: give the skip its category.
    (tmp_path / "junit.xml").write_text(junit.read_text().replace(
        "fixture skip reason", "[kernel config] fixture skip reason"))
    (tmp_path / "pytest-exitcode").write_text("0\n")
    (tmp_path / "console.log").write_text("")
    (tmp_path / "summary.json").write_text(
        '{"schema_version": 2, "boot": {"status": "exited"}, "kmemleak": {}}')
    guest_files(tmp_path, "error: kmemleak scan or read failed: busy")
    code = reparse.main(argparse.Namespace(output_dir=tmp_path))
    printed = capsys.readouterr().out
    assert "kmemleak: no report (error: kmemleak scan or read failed: busy)" in printed
    assert code == ExitCode.INFRASTRUCTURE
    # The same files without the kmemleak key (a normal run) are a pass.
    (tmp_path / "summary.json").write_text('{"schema_version": 2, "boot": {"status": "exited"}}')
    assert reparse.main(argparse.Namespace(output_dir=tmp_path)) == ExitCode.PASS
