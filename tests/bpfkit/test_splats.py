"""The splat catalogue against real kernel logs (tests/fixtures/splats/README.md says where each is from)."""

from __future__ import annotations

import pytest
from bpfkit.splats import MAX_EXCERPT_LINES, Splat, describe, find_splats
from conftest import TESTS

FIXTURES = TESTS / "fixtures" / "splats"

# Every fixture and exactly the reports it holds: (kind, 0-based trigger line).
EXPECTED = {
    "clean-boot-host-6.18.log": [],
    "oops-null-deref-6.1-qemu.log": [("oops", 0)],
    "oops-boot-prefixed-trace-6.6.log": [("oops", 0)],
    "warning-mptcp-5.19.log": [("WARNING", 1)],
    "warning-panic-on-warn-syzkaller-5.6.log": [("WARNING", 15), ("panic", 16)],
    "kasan-slab-uaf-mptcp-6.5.log": [("KASAN", 1)],
    "kasan-uaf-dst-destroy-5.18.log": [("KASAN", 1)],
    "lockdep-circular-scx-6.6.log": [("lockdep", 1)],
    "lockdep-circular-dmesg-continuation-5.10.log": [("lockdep", 1)],
    "rcu-stall-twice-tetragon-ci.log": [("RCU stall", 0), ("RCU stall", 19)],
    "rcu-expedited-stall-systemd-console.log": [("RCU stall", 4)],
    "warning-tail-then-rcu-self-stall-riscv.log": [("orphan trace", 3), ("RCU stall", 4)],
    "soft-lockup-qemu-tcg-6.8.log": [("soft lockup", 12)],
    "hung-task-dmesg-T-4.16.log": [("hung task", 0)],
    "hung-task-repeated-4.19.log": [("hung task", 0), ("hung task", 3), ("hung task", 6)],
    "kmemleak-report-5.4.log": [("kmemleak", 0), ("kmemleak", 22)],
    "orphan-trace-tail-ci-clock.log": [("orphan trace", 9)],
}


def read(name: str) -> str:
    return (FIXTURES / name).read_text()


def kinds_and_lines(splats: list[Splat]) -> list[tuple[str, int]]:
    return [(splat.kind, splat.line) for splat in splats]


def test_every_fixture_has_an_expectation():
    on_disk = {path.name for path in FIXTURES.glob("*.log")}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_reports(name):
    assert kinds_and_lines(find_splats(read(name))) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e))
def test_excerpt_starts_at_its_trigger_line(name):
    lines = read(name).splitlines()
    for splat in find_splats(read(name)):
        assert splat.excerpt.splitlines()[0] == lines[splat.line]


def test_oops_die_line_belongs_to_the_null_deref_report():
    (splat,) = find_splats(read("oops-null-deref-6.1-qemu.log"))
    assert "Oops: 0000 [#1] PREEMPT SMP NOPTI" in splat.excerpt
    assert splat.excerpt.splitlines()[-1].endswith("EFLAGS: 00010082")


def test_trace_line_with_console_garbage_stays_in_its_report():
    (splat,) = find_splats(read("oops-boot-prefixed-trace-6.6.log"))
    assert "Warning: [    0.112106] Call Trace:" in splat.excerpt
    assert splat.excerpt.splitlines()[-1].endswith("__bad_area_nosemaphore+0x4b/0x180")


def test_warning_ends_where_panic_on_warn_begins():
    warning, panic = find_splats(read("warning-panic-on-warn-syzkaller-5.6.log"))
    assert warning.excerpt.endswith("usb_submit_urb+0x1188/0x1460")
    assert len(warning.excerpt.splitlines()) == 1
    assert panic.excerpt.startswith("[   30.515546][   T81] Kernel panic - not syncing")
    assert "invalid_op+0x23/0x30" in panic.excerpt


def test_kasan_excerpt_leaves_out_the_opening_separator():
    (splat,) = find_splats(read("kasan-slab-uaf-mptcp-6.5.log"))
    assert "=====" not in splat.excerpt
    assert "Read of size 8 at addr ffff88800853aa88 by task ip/14140" in splat.excerpt


def test_kasan_report_ends_at_its_closing_separator():
    text = read("kasan-uaf-dst-destroy-5.18.log") + (
        "[ 1021.400000][    C1] ==================================================================\n"
        "[ 1021.500000][    C1] Disabling lock debugging due to kernel taint\n"
    )
    (splat,) = find_splats(text)
    assert splat.excerpt.splitlines()[-1].endswith("=" * 66)


def test_lockdep_dmesg_continuation_lines_stay_in_the_report():
    (splat,) = find_splats(read("lockdep-circular-dmesg-continuation-5.10.log"))
    assert "               but task is already holding lock:" in splat.excerpt
    assert splat.excerpt.splitlines()[-1].endswith("bch2_mount+0x673/0x8e0 [bcachefs]")


def test_console_user_space_lines_end_a_report():
    (splat,) = find_splats(read("rcu-expedited-stall-systemd-console.log"))
    assert splat.excerpt.splitlines()[-1].endswith("</TASK>")
    assert "Permit User Sessions" not in splat.excerpt


def test_stack_trace_inside_a_report_is_not_an_orphan():
    splats = find_splats(read("rcu-stall-twice-tetragon-ci.log"))
    assert "Call Trace:" in splats[0].excerpt
    assert all(splat.kind != "orphan trace" for splat in splats)


def test_kmemleak_objects_are_split_per_object():
    first, second = find_splats(read("kmemleak-report-5.4.log"))
    assert first.excerpt.startswith("unreferenced object 0xb5971f00 (size 176):")
    assert first.excerpt.splitlines()[-1].endswith("rest_init+0x9c/0xbc")
    assert second.excerpt.startswith("unreferenced object 0xb5a12300 (size 176):")


# Trigger lines as the 6.1 sources print them (format strings filled in), for
# kinds no fixture above covers.
SOURCE_FORMATS = [
    ("KFENCE", "BUG: KFENCE: use-after-free read in test_use_after_free_read+0xb3/0x143"),
    ("UBSAN", "UBSAN: array-index-out-of-bounds in net/core/filter.c:1234:5"),
    ("hard lockup", "NMI watchdog: Watchdog detected hard LOCKUP on cpu 1"),
    ("kmemleak", "kmemleak: 3 new suspected memory leaks (see /sys/kernel/debug/kmemleak)"),
    ("BUG", "kernel BUG at net/core/sock.c:2030!"),
    ("BUG", "BUG: sleeping function called from invalid context at mm/slab.h:723"),
    ("BUG", "BUG: scheduling while atomic: swapper/0/0/0x00000002"),
    ("BUG", "BUG: some report this catalogue has never heard of"),
    ("lockdep", "WARNING: suspicious RCU usage"),
    ("lockdep", "WARNING: possible recursive locking detected"),
    ("lockdep", "WARNING: inconsistent lock state"),
    ("lockdep", "WARNING: bad unlock balance detected!"),
    ("WARNING", "WARNING: CPU: 0 PID: 1 at kernel/bpf/verifier.c:12345 do_check+0x1/0x2"),
    ("WARNING", "WARNING: at kernel/bpf/syscall.c:100 map_create+0x1/0x2()"),
    ("panic", "Kernel panic - not syncing: Fatal exception in interrupt"),
    ("oops", "general protection fault, probably for non-canonical address 0xdffffc0000000001: 0000 [#1] PREEMPT SMP KASAN"),
    ("oops", "Oops: general protection fault, probably for non-canonical address 0xdffffc0000000001: 0000 [#1] SMP KASAN NOPTI"),
    ("RCU stall", "rcu: INFO: rcu_preempt self-detected stall on CPU"),
]


@pytest.mark.parametrize("kind,message", SOURCE_FORMATS)
def test_source_format_triggers(kind, message):
    (splat,) = find_splats(f"[   42.000001] {message}\n")
    assert (splat.kind, splat.line) == (kind, 0)


def test_kasan_range_note_belongs_to_the_gpf():
    text = (
        "[   42.000001] Oops: general protection fault, probably for non-canonical address"
        " 0xdffffc0000000001: 0000 [#1] SMP KASAN NOPTI\n"
        "[   42.000002] KASAN: null-ptr-deref in range [0x0000000000000008-0x000000000000000f]\n"
        "[   42.000003] CPU: 0 PID: 1 Comm: python3 Not tainted 6.1.0 #1\n"
    )
    assert kinds_and_lines(find_splats(text)) == [("oops", 0)]


@pytest.mark.parametrize("noise", [
    # pytest's own output: test ids and captured text mention bugs freely
    "selftests/test_teardown.py::test_BUG: storage[udp4] PASSED                [ 12%]",
    "selftests/test_x.py::test_warns[WARNING: CPU] FAILED",
    "E   AssertionError: expected no BUG: in the map",
    "    BUG: indented user text is not a kernel message",
    "=============================== warnings summary ===============================",
    "WARNING:root:python logging is not the kernel",
    "Warning: Permanently added '10.0.2.15' (ED25519) to the list of known hosts.",
    # kernel lines that mention the words without being reports
    "[    0.000000] Command line: console=ttyS0 panic=-1 oops=panic softlockup_panic=1",
    "[    1.234567] Spectre V2 : WARNING: Unprivileged eBPF is enabled, data leaks possible",
    "[    2.000000] rcu: \tRCU CPU stall warnings timeout set to 100 (rcu_cpu_stall_timeout).",
    "[    3.000000] kmemleak: Kernel memory leak detector initialized (mem pool available: 15723)",
    "[    4.000000] NMI watchdog: Enabled. Permanently consumes one hw-PMU counter.",
    # virtme-ng and QEMU
    "qemu-system-x86_64: warning: TCG doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]",
    "virtme-ng-init: mount devtmpfs failed: BUG: not really",
])
def test_benign_lines_are_not_splats(noise):
    assert find_splats(noise + "\n") == []


@pytest.mark.parametrize("prefix", [
    "",                                      # printk.time=0 console
    "[   12.345678] ",                       # printk stamp
    "[   12.345678][  T123] ",               # with caller id
    "<4>[   12.345678] ",                    # syslog priority
    "4,1234,12345678,-;",                    # raw /dev/kmsg record
    "Apr 13 06:21:17 host kernel: ",         # syslog file
    "2026-05-28T12:21:57.303295+00:00 vm kernel: ",  # journal short-iso
    "01:20:13.304 [   12.345678] ",          # CI clock before the stamp
    "\x1b[0m[   12.345678] ",                # ANSI colour reset
])
def test_noise_prefixes_are_peeled(prefix):
    text = prefix + "BUG: KASAN: slab-out-of-bounds in bpf_sk_storage_get+0x1/0x2\r\n"
    (splat,) = find_splats(text)
    assert splat.kind == "KASAN"
    assert "\r" not in splat.excerpt


def test_crlf_console_log_gives_the_same_reports():
    text = read("warning-panic-on-warn-syzkaller-5.6.log")
    crlf = text.replace("\n", "\r\n")
    assert kinds_and_lines(find_splats(crlf)) == kinds_and_lines(find_splats(text))


def test_report_without_end_is_cut_at_the_bound():
    trace = "".join(f"[   50.{i:06d}]  frame_{i}+0x1/0x2\n" for i in range(MAX_EXCERPT_LINES * 2))
    (splat,) = find_splats("[   49.000000] INFO: task python3:42 blocked for more than 30 seconds.\n" + trace)
    assert len(splat.excerpt.splitlines()) == MAX_EXCERPT_LINES


def test_describe_quotes_every_splat():
    splats = find_splats(read("hung-task-repeated-4.19.log"))
    message = describe(splats)
    assert message.startswith("kernel log gained 3 splat(s):")
    assert message.count("--- hung task at log line") == 3
    assert "INFO: task snmpd:12767 blocked for more than 120 seconds." in message
