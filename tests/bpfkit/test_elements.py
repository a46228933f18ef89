"""Element counting: the fdinfo line of the project patch (parsed offline) and the live counter."""

from __future__ import annotations

import os
import socket

import pytest
from bpfkit import elements

# /proc/self/fdinfo of an sk storage map fd on the development machine (kernel 6.18):
# the generic lines bpf_map_show_fdinfo() prints, without the project patch.
UNPATCHED = (
    "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1039\nmap_type:\t24\nkey_size:\t4\n"
    "value_size:\t8\nmax_entries:\t0\nmap_flags:\t0x1\nmap_extra:\t0x0\nmemlock:\t480\n"
    "map_id:\t984\nfrozen:\t0\n"
)
# kernel_patches/0001-bpf-report-sk-storage-element-count-in-fdinfo.patch appends
# seq_printf(m, "sk_storage_elems:\t%ld\n", ...) after the generic lines.
PATCHED = UNPATCHED + "sk_storage_elems:\t37\n"


def test_unpatched_fdinfo_has_no_count():
    assert elements.parse_fdinfo_count(UNPATCHED) is None


def test_patched_fdinfo_count():
    assert elements.parse_fdinfo_count(PATCHED) == 37


def test_count_program_is_whole_instructions_ending_in_exit():
    program = elements.counting_program()
    assert len(program) % 8 == 0
    assert program[-8] == 0x95  # BPF_JMP | BPF_EXIT


def test_wait_for_reports_the_last_value_on_timeout():
    readings = iter([5, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    reached, last = elements.wait_for(lambda: next(readings), 0, timeout=0.05, interval=0.01)
    assert (reached, last) == (False, 3)


def test_wait_for_stops_as_soon_as_the_value_is_seen():
    readings = iter([2, 1, 0])
    assert elements.wait_for(lambda: next(readings), 0, timeout=5, interval=0) == (True, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs root")
def test_live_counter_counts_exactly():
    from bpfkit import maps, syscall

    map_fd = maps.create_sk_storage_map(8)
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        try:
            counter = elements.ElementCounter(map_fd)
        except syscall.PolicyRefused as err:
            # This host's kernel is not under test: its policy only takes the iterator away.
            pytest.skip(f"[environment] this host refused the counting iterator to root: {err}")
        with counter:
            assert counter.method in (elements.FDINFO, elements.ITERATOR)
            assert counter.count() == 0
            for sock in sockets:
                maps.update(map_fd, sock.fileno(), b"12345678")
            assert counter.count() == 5
            maps.delete(map_fd, sockets[0].fileno())
            assert counter.count() == 4
            sockets[1].close()
            assert elements.wait_for_count(counter, 3, timeout=10) == (True, 3)
    finally:
        for sock in sockets:
            sock.close()
        os.close(map_fd)
