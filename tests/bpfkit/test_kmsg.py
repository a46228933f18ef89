"""/dev/kmsg record formatting (from captured records) and the live KernelLog (root only)."""

from __future__ import annotations

import os

import pytest
from bpfkit.kmsg import KernelLog, format_record
from bpfkit.splats import find_splats
from conftest import TESTS

RECORDS = [
    bytes.fromhex(line)
    for line in (TESTS / "fixtures" / "splats" / "kmsg-records.hex").read_text()
    .splitlines()
    if line and not line.startswith("#")
]


def record_starting(prefix: bytes) -> bytes:
    (record,) = [r for r in RECORDS if r.startswith(prefix)]
    return record


def test_escaped_tab_is_restored():
    text = format_record(record_starting(b"6,89,"))
    assert text == "[    0.222371] rcu: \tRCU restricting CPUs from NR_CPUS=256 to nr_cpu_ids=2."


def test_device_dictionary_is_not_log_text():
    text = format_record(record_starting(b"6,191,"))
    assert text == ("[    0.280397] acpi PNP0A08:00: _OSC: OS supports "
                    "[ExtendedConfig ASPM ClockPM Segments MSI HPX-Type3]")
    assert "SUBSYSTEM" not in text


def test_user_space_records_are_dropped_unless_asked_for():
    user = record_starting(b"12,")
    assert format_record(user) is None
    assert format_record(user, kernel_only=False) == "[  515.741346] hello from test"


def test_multi_line_record_gets_a_stamp_per_line():
    record = (b"4,900,9000001,-;WARNING: possible circular locking dependency detected\\x0a"
              b"6.1.0 #1 Not tainted\n")
    assert format_record(record) == (
        "[    9.000001] WARNING: possible circular locking dependency detected\n"
        "[    9.000001] 6.1.0 #1 Not tainted")
    assert [s.kind for s in find_splats(format_record(record))] == ["lockdep"]


def test_malformed_record_is_an_error():
    with pytest.raises(ValueError, match="malformed"):
        format_record(b"garbage without header")


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="writing /dev/kmsg needs root")


@root_only
def test_only_records_logged_after_opening_come_back():
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write("bpfkit-test: before opening\n")
    with KernelLog(kernel_only=False) as log:
        assert "before opening" not in log.read_new()
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write("bpfkit-test: first\n")
            kmsg.flush()
            kmsg.write("bpfkit-test: second\n")
        text = log.read_new()
        assert [line.split("] ", 1)[1] for line in text.splitlines()] == [
            "bpfkit-test: first", "bpfkit-test: second"]
        # a second call returns only what came after the first
        assert log.read_new() == ""
        assert log.lost == 0


@root_only
def test_kernel_only_log_ignores_user_space_writes():
    with KernelLog() as log:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write("<0>BUG: written from user space, not by the kernel\n")
        assert "written from user space" not in log.read_new()


@root_only
def test_closed_log_refuses_reads():
    log = KernelLog()
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.read_new()
