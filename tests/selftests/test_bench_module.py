"""The guest-side benchmark's pure parts: statistics, expected counts, checks, programs.

The module lives in selftests/bench and is imported the way the guest imports it, with
selftests/ on sys.path.  One real run on this kernel is at the end, root only and small:
it checks that the counters verify, never how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import REPO

SELFTESTS = REPO / "selftests"
if str(SELFTESTS) not in sys.path:
    sys.path.insert(0, str(SELFTESTS))

from bench import egress_counter, stats
from bpfkit import asm


def test_summarize_gives_median_extremes_and_relative_spread():
    summary = stats.summarize([120.0, 100.0, 110.0, 300.0, 105.0])
    assert summary["n"] == 5
    assert summary["median"] == 110.0
    assert (summary["min"], summary["max"]) == (100.0, 300.0)
    assert summary["spread"] == pytest.approx(200.0 / 110.0)
    assert summary["mean"] == pytest.approx(147.0)


def test_summarize_one_value_has_no_spread():
    summary = stats.summarize([66.0])
    assert (summary["median"], summary["stdev"], summary["spread"]) == (66.0, 0.0, 0.0)


def test_summarize_nothing_is_an_error():
    with pytest.raises(ValueError):
        stats.summarize([])


def test_ratio_summary_pairs_repeats_in_order():
    # The seed's 66/152 as repeat 0, then a repeat where both variants ran slower.
    ratio = stats.ratio_summary([66.0, 80.0, 70.0], [152.0, 160.0, 140.0])
    assert ratio["of_medians"] == pytest.approx(70.0 / 152.0)
    assert ratio["paired_min"] == pytest.approx(66.0 / 152.0)
    assert ratio["paired_max"] == pytest.approx(0.5)
    assert ratio["paired_median"] == pytest.approx(0.5)


def test_ratio_summary_needs_equal_repeats():
    with pytest.raises(ValueError):
        stats.ratio_summary([1.0], [1.0, 2.0])


def test_expected_counts_round_robin_after_one_warmup_round():
    assert egress_counter.expected_counts(4, 10) == [4, 4, 3, 3]
    assert sum(egress_counter.expected_counts(4096, 200_000)) == 4096 + 200_000


class _CountingSocket:
    """Stands in for a connected socket: counts what send_bursts() sends on it."""

    def __init__(self, log: list[int], index: int) -> None:
        self.log, self.index, self.sent = log, index, 0

    def send(self, payload: bytes) -> int:
        self.sent += 1
        self.log.append(self.index)
        return len(payload)


@pytest.mark.parametrize("sockets, packets, burst", [
    (4, 10, 1), (4, 10, 3), (3, 7, 8), (5, 100, 7), (64, 640, 1),
])
def test_expected_counts_match_what_send_bursts_sends(sockets, packets, burst):
    order: list[int] = []
    fake = [_CountingSocket(order, i) for i in range(sockets)]
    egress_counter.send_bursts(fake, packets, burst)
    assert [s.sent + 1 for s in fake] == egress_counter.expected_counts(sockets, packets, burst)
    # Bursts really are consecutive: the socket changes only every `burst` datagrams.
    changes = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert changes == len(list(egress_counter.burst_schedule(sockets, packets, burst))) - 1


def test_every_socket_sends_at_least_once_in_the_measured_phase():
    assert egress_counter.packets_for(4096, 100) == 4096
    assert egress_counter.packets_for(64, 100) == 100


def test_counter_mismatches_name_missing_and_wrong_counters():
    assert egress_counter.counter_mismatches([2, 2, 3], [2, 2, 3]) == []
    problems = egress_counter.counter_mismatches([2, 2, 3], [2, None, 4])
    assert problems == ["socket 1: counter missing, sent 2", "socket 2: counter 4, sent 3"]


def test_counter_mismatches_are_capped_with_a_count_of_the_rest():
    problems = egress_counter.counter_mismatches([1] * 10, [0] * 10, limit=3)
    assert len(problems) == 4
    assert problems[-1] == "... and 7 more sockets"


def test_counter_mismatches_catch_a_missing_socket():
    assert egress_counter.counter_mismatches([1, 1], [1]) == ["1 counters read for 2 sockets"]


def test_hash_map_holds_every_socket():
    assert egress_counter.hash_max_entries(4096) == 8192  # the seed's size
    assert egress_counter.hash_max_entries(16384) == 16384


def test_socket_counts_beyond_the_fd_limit_are_dropped():
    kept, dropped = egress_counter.socket_counts_within([64, 4096, 16384], 5000)
    assert (kept, dropped) == ([64, 4096], [16384])


def test_parse_socket_counts_sorts_and_deduplicates():
    assert egress_counter.parse_socket_counts("4096,64,64") == [64, 4096]
    for bad in ("x", "0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            egress_counter.parse_socket_counts(bad)


def _decode(program: bytes) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) per slot."""
    out = []
    for i in range(0, len(program), 8):
        code, regs, off, imm = struct.unpack_from("<BBhi", program, i)
        out.append((code, regs & 0xF, regs >> 4, off, imm))
    return out


def _helpers(program: bytes) -> list[int]:
    return [imm for code, _, _, _, imm in _decode(program) if code == asm.BPF_JMP | asm.CALL]


def _check_jumps_land_inside(program: bytes) -> None:
    slots = _decode(program)
    for index, (code, _, _, off, _) in enumerate(slots):
        if code & 0x07 in (asm.BPF_JMP, asm.BPF_JMP32) and code & 0xF0 not in (asm.CALL, asm.EXIT):
            assert 0 <= index + 1 + off < len(slots)


def test_hash_program_keys_by_cookie_and_creates_missing_counters():
    program = egress_counter.hash_program(map_fd=7)
    h = asm.HELPERS
    assert _helpers(program) == [h["get_socket_cookie"], h["map_lookup_elem"],
                                 h["map_update_elem"], h["map_lookup_elem"]]
    atomic = asm.BPF_STX | asm.W | asm.BPF_ATOMIC
    assert any(code == atomic for code, *_ in _decode(program))
    _check_jumps_land_inside(program)


def test_sk_storage_program_uses_the_full_socket_and_create_flag():
    program = egress_counter.sk_storage_program(map_fd=7)
    h = asm.HELPERS
    assert _helpers(program) == [h["sk_fullsock"], h["sk_storage_get"]]
    # r4 = BPF_SK_STORAGE_GET_F_CREATE right before the call.
    movs = [imm for code, dst, _, _, imm in _decode(program)
            if code == asm.BPF_ALU64 | asm.MOV | asm.BPF_K and dst == asm.R4]
    assert movs == [1]
    _check_jumps_land_inside(program)


@pytest.mark.skipif(os.geteuid() != 0, reason="a real benchmark run needs root (bpf(2))")
def test_small_real_run_verifies_every_counter(tmp_path):
    """64 sockets, 640 datagrams, one repeat: exit 0 and run_cnt equal to the traffic."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--sockets", "64", "--packets", "640", "--repeat", "1",
         "--quiet", "--output", str(out)],
        check=False, cwd=SELFTESTS, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [m["variant"] for m in result["measurements"]] == ["hash", "sk_storage"]
    assert all(m["run_cnt"] == 640 and m["warmup_run_cnt"] == 64
               for m in result["measurements"])
