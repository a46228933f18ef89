"""sk storage from more program hooks: sock_ops callbacks and the cgroup_skb ingress path.

A sock_ops program sees ctx->sk (a full socket or NULL) at each TCP callback; giving
the socket storage at ACTIVE_ESTABLISHED (the connecting side) and
PASSIVE_ESTABLISHED (the accepted child) pins which socket each callback runs for.
On cgroup_skb ingress, skb->sk is the receiving socket.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from bpfkit import cgroup, maps, prog, syscall
from bpfkit.asm import (
    DW,
    JEQ,
    JNE,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    W,
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
    stx_mem,
)

pytestmark = pytest.mark.prog

BPF_PROG_TYPE_SOCK_OPS = 13
BPF_CGROUP_SOCK_OPS = 3
SOCK_OPS_OP = 0        # offsetof(struct bpf_sock_ops, op)
SOCK_OPS_SK = 184      # offsetof(struct bpf_sock_ops, sk)
ACTIVE_ESTABLISHED = 4
PASSIVE_ESTABLISHED = 5
SKB_SK = 168
F_CREATE = syscall.BPF_SK_STORAGE_GET_F_CREATE


def sock_ops_program(map_fd: int) -> bytes:
    """At either ESTABLISHED callback, store the callback's op in the socket's storage."""
    return assemble([
        mov64_reg(R6, R1),
        ldx_mem(W, R7, R6, SOCK_OPS_OP),        # r7 = op
        jmp_imm(JEQ, R7, ACTIVE_ESTABLISHED, "store"),
        jmp_imm(JNE, R7, PASSIVE_ESTABLISHED, "out"),
        label("store"),
        ldx_mem(DW, R2, R6, SOCK_OPS_SK),       # r2 = ctx->sk or NULL
        jmp_imm(JEQ, R2, 0, "out"),
        ld_map_fd(R1, map_fd),
        mov64_imm(R3, 0),
        mov64_imm(R4, F_CREATE),
        call("sk_storage_get"),
        jmp_imm(JEQ, R0, 0, "out"),
        stx_mem(W, R0, R7, 0),                  # value.op = op
        label("out"),
        mov64_imm(R0, 1),
        exit_insn(),
    ])


def ingress_program(map_fd: int) -> bytes:
    """Count every packet received by a full socket in its storage."""
    return assemble([
        mov64_reg(R6, R1),
        ldx_mem(DW, R1, R6, SKB_SK),
        jmp_imm(JEQ, R1, 0, "out"),
        call("sk_fullsock"),
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_reg(R2, R0),
        ld_map_fd(R1, map_fd),
        mov64_imm(R3, 0),
        mov64_imm(R4, F_CREATE),
        call("sk_storage_get"),
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_imm(R1, 1),
        atomic_add(W, R0, R1, 0),
        label("out"),
        mov64_imm(R0, 1),
        exit_insn(),
    ])


def first_word(map_fd: int, sock: socket.socket) -> int | None:
    """The first u32 of the socket's value, None without one."""
    try:
        return struct.unpack("=II", maps.lookup(map_fd, sock.fileno(), 8))[0]
    except syscall.BpfError as err:
        if err.errno == errno.ENOENT:
            return None
        raise


def test_sock_ops_established_callbacks_give_each_side_its_storage(
    inet_family, storage_map, closing, test_cgroup, cgroup_fd, socks,
):
    """ACTIVE_ESTABLISHED runs for the client, PASSIVE_ESTABLISHED for the accepted child."""
    prog_fd = closing(prog.load_program(BPF_PROG_TYPE_SOCK_OPS, sock_ops_program(storage_map),
                                        expected_attach_type=BPF_CGROUP_SOCK_OPS))
    with prog.attached(prog_fd, cgroup_fd, BPF_CGROUP_SOCK_OPS), cgroup.joined(test_cgroup):
        conn = socks.tcp_connection(inet_family)
    assert first_word(storage_map, conn.client) == ACTIVE_ESTABLISHED
    assert first_word(storage_map, conn.accepted) == PASSIVE_ESTABLISHED
    assert first_word(storage_map, conn.listener) is None


def test_ingress_counts_each_received_datagram(inet_family, storage_map, closing,
                                               test_cgroup, cgroup_fd, socks):
    """On ingress, the receiving socket's storage counts exactly the datagrams it got."""
    prog_fd = closing(prog.load_program(syscall.BPF_PROG_TYPE_CGROUP_SKB,
                                        ingress_program(storage_map),
                                        expected_attach_type=syscall.BPF_CGROUP_INET_INGRESS))
    with prog.attached(prog_fd, cgroup_fd, syscall.BPF_CGROUP_INET_INGRESS), \
            cgroup.joined(test_cgroup):
        sender, receiver = socks.udp_pair(inet_family)
        receiver.settimeout(5)
        for i in range(6):
            sender.send(b"%d" % i)
            receiver.recv(8)
    assert first_word(storage_map, receiver) == 6
    assert first_word(storage_map, sender) is None
