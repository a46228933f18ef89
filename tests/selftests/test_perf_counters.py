"""The benchmark's perf_event_open counters, opened for real on this machine.

Whether hardware events exist depends on the machine (a VM without a virtual PMU has
none); either way every event must come back counted or with the kernel's errno, and the
software task clock must count a busy loop.
"""

from __future__ import annotations

import os
import struct
import sys
import time

from conftest import REPO

SELFTESTS = REPO / "selftests"
if str(SELFTESTS) not in sys.path:
    sys.path.insert(0, str(SELFTESTS))

from bench import perf_counters


def test_the_attribute_counts_this_process_and_its_children_from_disabled():
    attr = perf_counters._attr(perf_counters.PERF_TYPE_HARDWARE, 3)
    assert len(attr) == perf_counters.ATTR_SIZE == 112
    event_type, size, config, period, sample_type, read_format, flags = struct.unpack_from(
        "=IIQQQQQ", attr)
    assert (event_type, size, config, period, sample_type, read_format) == (0, 112, 3, 0, 0, 0)
    assert flags == (perf_counters.FLAG_DISABLED | perf_counters.FLAG_INHERIT
                     | perf_counters.FLAG_EXCLUDE_HV)
    assert attr[struct.calcsize("=IIQQQQQ"):] == bytes(112 - struct.calcsize("=IIQQQQQ"))


def test_every_event_is_counted_or_refused_with_its_errno():
    with perf_counters.counting() as counts:
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
    names = {name for name, _, _ in perf_counters.EVENTS}
    assert set(counts.values) | set(counts.unavailable) == names
    assert not set(counts.values) & set(counts.unavailable)
    for why in counts.unavailable.values():
        assert why.split(":")[0].startswith("E"), why
    if "task_clock_ns" in counts.unavailable:
        # Only the kernel's perf policy refuses the software clock, and never to root.
        assert os.geteuid() != 0
        assert counts.unavailable["task_clock_ns"].startswith("EACCES"), counts.unavailable
        return
    # The software clock needs no PMU: it saw the 50 ms busy loop.
    assert counts.values["task_clock_ns"] >= 40_000_000
    if "cycles" in counts.values:
        assert counts.values["cycles"] > 0
