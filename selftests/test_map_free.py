"""Storage cleanup when the map goes away while the sockets that hold its storage live on.

The map is the "type" of the storage; freeing it must walk every socket that has an
element of it, unlink the element and give back the memory charged to the socket.
The map dies when its last reference goes: its fd, and a program that uses it (here a
cgroup_skb egress program that gives each sending socket a packet counter).  Its id
leaves BPF_MAP_GET_NEXT_ID at once, but the program's references drop only after an
RCU grace period and the elements are freed from a workqueue, so each check is a
bounded wait that fails with the last value seen.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from bpfkit import cgroup, charges, elements, maps, probes, prog, sockdiag, syscall
from bpfkit.asm import (
    ADD,
    DW,
    JEQ,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R10,
    W,
    alu64_imm,
    assemble,
    atomic_add,
    call,
    exit_insn,
    jmp_imm,
    label,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
)

pytestmark = pytest.mark.map_free

CLEANUP_TIMEOUT = float(os.environ.get("SK_STORAGE_CLEANUP_TIMEOUT", "30"))
SKB_SK = 168  # offsetof(struct __sk_buff, sk)
COUNTER_SIZE = 8
PAIRS = 4
CONNECTIONS = 2
DATAGRAMS = 3


def egress_counter(map_fd: int) -> bytes:
    """cgroup_skb egress: count each full socket's packets in its storage (created on demand)."""
    return assemble([
        mov64_reg(R6, R1),                  # r6 = skb
        ldx_mem(DW, R1, R6, SKB_SK),        # r1 = skb->sk, may be NULL
        jmp_imm(JEQ, R1, 0, "out"),
        call("sk_fullsock"),                # r0 = full socket or NULL
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_reg(R7, R0),
        st_mem(DW, R10, -8, 0),             # init value: 0 packets
        ld_map_fd(R1, map_fd),
        mov64_reg(R2, R7),
        mov64_reg(R3, R10),
        alu64_imm(ADD, R3, -8),             # r3 = &init
        mov64_imm(R4, syscall.BPF_SK_STORAGE_GET_F_CREATE),
        call("sk_storage_get"),             # r0 = the socket's counter or NULL
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_imm(R1, 1),
        atomic_add(W, R0, R1, 0),           # counter->packets += 1
        label("out"),
        mov64_imm(R0, 1),                   # let every packet through
        exit_insn(),
    ])


def wait_until(predicate, timeout: float, describe):
    """Poll predicate() until true; on timeout fail with describe() of the last state."""
    reached, _ = elements.wait_for(lambda: int(bool(predicate())), 1, timeout)
    assert reached, f"after {timeout:g} s: {describe()}"


TCP_INFO_SEGS_OUT = 136  # offsetof(struct tcp_info, tcpi_segs_out), 4.2+


def tcp_segs_out(sock: socket.socket) -> int | None:
    """Segments a TCP socket has sent, ACKs and retransmissions included; None for UDP."""
    if sock.type != socket.SOCK_STREAM:
        return None
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SEGS_OUT + 4)
    return struct.unpack_from("=I", info, TCP_INFO_SEGS_OUT)[0]


def optmems(sockets: list[socket.socket]) -> list[int]:
    return [sockdiag.socket_record(sock).optmem for sock in sockets]


def exchange(sender: socket.socket, receiver: socket.socket, payload: bytes) -> bytes:
    """Send payload one way and return what arrived (UDP datagram or TCP bytes)."""
    sender.sendall(payload) if sender.type == socket.SOCK_STREAM else sender.send(payload)
    receiver.settimeout(5)
    return receiver.recv(len(payload) + 16)


def make_traffic(pairs, connections, rounds: int) -> None:
    """Every socket sends: UDP senders to receivers and back, TCP both ways."""
    for i in range(rounds):
        for sender, receiver in pairs:
            receiver.connect(sender.getsockname())
            assert exchange(sender, receiver, b"to receiver %d" % i) == b"to receiver %d" % i
            assert exchange(receiver, sender, b"to sender %d" % i) == b"to sender %d" % i
        for conn in connections:
            assert exchange(conn.client, conn.accepted, b"c%d" % i) == b"c%d" % i
            assert exchange(conn.accepted, conn.client, b"a%d" % i) == b"a%d" % i


@pytest.mark.parametrize("holder", ["fd", "fd_and_program"])
def test_freeing_the_map_releases_storage_of_live_sockets(
    holder, inet_family, socks, test_cgroup, cgroup_fd, closing,
):
    """Drop the map's last reference: its id goes, optmem returns, sockets work, no data leaks."""
    map_fd = maps.create_sk_storage_map(COUNTER_SIZE, name="doomed")
    map_id = maps.map_info(map_fd).id
    prog_fd = None
    try:
        with cgroup.joined(test_cgroup):
            pairs = [socks.udp_pair(inet_family) for _ in range(PAIRS)]
            connections = [socks.tcp_connection(inet_family) for _ in range(CONNECTIONS)]
        every = [s for pair in pairs for s in pair] + [
            s for conn in connections for s in (conn.client, conn.accepted)]
        baselines = optmems(every)

        if holder == "fd_and_program":
            prog_fd = prog.load_program(
                syscall.BPF_PROG_TYPE_CGROUP_SKB, egress_counter(map_fd),
                expected_attach_type=syscall.BPF_CGROUP_INET_EGRESS)
            segs_before = [tcp_segs_out(sock) for sock in every]
            with prog.attached(prog_fd, cgroup_fd, syscall.BPF_CGROUP_INET_EGRESS):
                make_traffic(pairs, connections, DATAGRAMS)
            for sock, before in zip(every, segs_before):
                packets, = struct.unpack("=Q", maps.lookup(map_fd, sock.fileno(), COUNTER_SIZE))
                # A UDP socket sent its datagrams; a TCP socket its data and its ACKs.
                sent = DATAGRAMS if before is None else tcp_segs_out(sock) - before
                assert packets == sent, f"{sock}: {packets} egress passes for {sent} packets"
        else:
            for index, sock in enumerate(every):
                maps.update(map_fd, sock.fileno(), struct.pack("=Q", index + 1))
        charged = optmems(every)
        # Each socket holds exactly one element of this map, its first.
        element = charges.kernel_charges().first_element(COUNTER_SIZE)
        assert [now - before for now, before in zip(charged, baselines)] == (
            [element] * len(every)), (baselines, charged)

        os.close(map_fd)
        map_fd = None
        if prog_fd is not None:
            # The program still holds the map: it must not be freed yet.
            assert map_id in maps.map_ids()
            os.close(prog_fd)
            prog_fd = None
    finally:
        for fd in (map_fd, prog_fd):
            if fd is not None:
                os.close(fd)

    wait_until(lambda: map_id not in maps.map_ids(), CLEANUP_TIMEOUT,
               lambda: f"map id {map_id} is still listed by BPF_MAP_GET_NEXT_ID")
    wait_until(lambda: optmems(every) == baselines, CLEANUP_TIMEOUT,
               lambda: f"optmem {optmems(every)} did not return to {baselines}")

    # Outside the cgroup now: the sockets carry on as if storage had never existed.
    make_traffic(pairs, connections, 1)

    fresh_map = closing(maps.create_sk_storage_map(COUNTER_SIZE, name="successor"))
    for sock in every:
        with pytest.raises(syscall.BpfError) as raised:
            maps.lookup(fresh_map, sock.fileno(), COUNTER_SIZE)
        assert raised.value.errno == errno.ENOENT
    # ...and it works for them: a stale per-socket cache slot would show up here.
    for index, sock in enumerate(every):
        maps.update(fresh_map, sock.fileno(), struct.pack("=Q", 1000 + index))
    for index, sock in enumerate(every):
        assert maps.lookup(fresh_map, sock.fileno(), COUNTER_SIZE) == struct.pack(
            "=Q", 1000 + index)


def test_open_iterator_keeps_its_map_alive(socks, closing):
    """An sk storage map iterator fd holds the map: it outlives its fd and the link.

    BPF_ITER_CREATE's fd references the program but not the link, so it must take its own
    reference on the map (.init_seq_private) and drop it when closed (.fini_seq_private):
    until then the map id stays listed and reading visits the elements; after it the map
    is freed and the socket's optmem returns. Regression: 3c5f6e698b5c.
    """
    probes.require("sk_storage_iter")
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    [baseline] = optmems([sock])
    map_fd = maps.create_sk_storage_map(COUNTER_SIZE, name="iterated")
    map_id = maps.map_info(map_fd).id
    iter_fd = None
    try:
        maps.update(map_fd, sock.fileno(), struct.pack("=Q", 42))
        assert optmems([sock])[0] > baseline
        prog_fd = closing(prog.load_sk_storage_iterator(elements.counting_program(),
                                                        name="count_elems"))
        link_fd = prog.link_create(prog_fd, 0, syscall.BPF_TRACE_ITER, iter_map_fd=map_fd)
        try:
            iter_fd = prog.iter_create(link_fd)
        finally:
            os.close(link_fd)
        os.close(map_fd)
        map_fd = None

        # Only the iterator fd refers to the map now.
        assert map_id in maps.map_ids(), "the map was freed under an open iterator fd"
        chunks = []
        while True:
            chunk = os.read(iter_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        assert b"".join(chunks) == bytes([elements.ELEMENT_MARK])
        assert map_id in maps.map_ids(), "the map was freed while the iterator was read"
    finally:
        for fd in (iter_fd, map_fd):
            if fd is not None:
                os.close(fd)

    wait_until(lambda: map_id not in maps.map_ids(), CLEANUP_TIMEOUT,
               lambda: f"map id {map_id} is still listed after its iterator fd closed")
    wait_until(lambda: optmems([sock])[0] == baseline, CLEANUP_TIMEOUT,
               lambda: f"optmem {optmems([sock])} did not return to {baseline}")
