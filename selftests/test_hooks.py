"""sk storage from more program hooks: sock_ops, cgroup_skb ingress, cgroup sockopt, sched_cls.

A sock_ops program sees ctx->sk (a full socket or NULL) at each TCP callback; giving
the socket storage at ACTIVE_ESTABLISHED (the connecting side) and
PASSIVE_ESTABLISHED (the accepted child) pins which socket each callback runs for.
On cgroup_skb ingress, skb->sk is the receiving socket.

cgroup sockopt programs follow upstream's sockopt_inherit test: setsockopt() on a
listener with a private level stores a byte in one of three maps (two BPF_F_CLONE,
one plain) through the helper, and getsockopt() on the accepted child reads it back
the same way: the clone maps' values were copied, the plain map's was not.

A sched_cls program gets skb->sk as a sock_common or NULL. BPF_PROG_TEST_RUN gives
the packet a socket of its own (sk_alloc) and frees it afterwards (sk_free), so
storage the program creates there must be freed with that socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from bpfkit import cgroup, elements, maps, prog, syscall
from bpfkit.asm import (
    ADD,
    DW,
    JEQ,
    JGT,
    JNE,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    B,
    W,
    alu64_imm,
    assemble,
    atomic_add,
    call,
    exit_insn,
    ja,
    jmp32_imm,
    jmp_imm,
    jmp_reg,
    label,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    stx_mem,
)

pytestmark = [pytest.mark.prog, pytest.mark.hooks]

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
    raw = maps.lookup_or_none(map_fd, sock.fileno(), 8)
    return None if raw is None else struct.unpack("=II", raw)[0]


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


# --- cgroup sockopt: upstream's sockopt_inherit ---------------------------------------------

SOL_CUSTOM = 0xDEADBEEF
SOL_CUSTOM_SIGNED = SOL_CUSTOM - (1 << 32)  # setsockopt(2) takes the level as an int
INHERIT1, INHERIT2, LISTENER_ONLY = 0, 1, 2
# struct bpf_sockopt
SOCKOPT_SK, SOCKOPT_OPTVAL, SOCKOPT_OPTVAL_END = 0, 8, 16
SOCKOPT_LEVEL, SOCKOPT_OPTNAME, SOCKOPT_OPTLEN, SOCKOPT_RETVAL = 24, 28, 32, 36
KEEP_GOING, REFUSE = 1, 0  # cgroup sockopt verdicts: 0 makes the call fail with EPERM


def sockopt_program(maps_by_optname: dict[int, int], fallback_map: int, setting: bool) -> bytes:
    """At level SOL_CUSTOM, the byte at optval goes to (set) or comes from (get) the storage
    of ctx->sk in the map its optname picks; other levels go on to the kernel."""
    pick = []
    for optname, map_fd in maps_by_optname.items():
        pick += [jmp_imm(JNE, R9, optname, f"not{optname}"),
                 ld_map_fd(R1, map_fd), ja("get"), label(f"not{optname}")]
    if setting:
        # storage->val = optval[0]; optlen -1: the kernel's own handler is skipped.
        use = [ldx_mem(B, R1, R7, 0), stx_mem(B, R0, R1, 0),
               mov64_imm(R1, -1), stx_mem(W, R6, R1, SOCKOPT_OPTLEN)]
    else:
        # optval[0] = storage->val, one byte long, and the call succeeds.
        # (The verifier takes only register stores into the context.)
        use = [ldx_mem(B, R1, R0, 0), stx_mem(B, R7, R1, 0),
               mov64_imm(R1, 1), stx_mem(W, R6, R1, SOCKOPT_OPTLEN),
               mov64_imm(R1, 0), stx_mem(W, R6, R1, SOCKOPT_RETVAL)]
    return assemble([
        mov64_reg(R6, R1),
        ldx_mem(W, R2, R6, SOCKOPT_LEVEL),
        jmp32_imm(JNE, R2, SOL_CUSTOM, "kernel"),
        ldx_mem(DW, R7, R6, SOCKOPT_OPTVAL),
        ldx_mem(DW, R8, R6, SOCKOPT_OPTVAL_END),
        mov64_reg(R2, R7),
        alu64_imm(ADD, R2, 1),
        jmp_reg(JGT, R2, R8, "refuse"),             # optval + 1 > optval_end
        ldx_mem(W, R9, R6, SOCKOPT_OPTNAME),
        *pick,
        ld_map_fd(R1, fallback_map),
        label("get"),
        ldx_mem(DW, R2, R6, SOCKOPT_SK),            # r2 = ctx->sk, never NULL here
        mov64_imm(R3, 0),
        mov64_imm(R4, F_CREATE),
        call("sk_storage_get"),
        jmp_imm(JEQ, R0, 0, "refuse"),
        *use,
        label("kernel"),
        mov64_imm(R0, KEEP_GOING),
        exit_insn(),
        label("refuse"),
        mov64_imm(R0, REFUSE),
        exit_insn(),
    ])


def test_sockopt_programs_see_clone_maps_inherited_and_the_plain_map_not(
    inet_family, new_storage_map, closing, test_cgroup, cgroup_fd, socks,
):
    """Bytes a setsockopt program stored on the listener come back from the child's getsockopt
    program for both clone maps; the plain map's storage is created empty for the child."""
    clone_flags = syscall.BPF_F_NO_PREALLOC | syscall.BPF_F_CLONE
    by_optname = {INHERIT1: new_storage_map(4, map_flags=clone_flags, name="cloned1"),
                  INHERIT2: new_storage_map(4, map_flags=clone_flags, name="cloned2")}
    listener_only = new_storage_map(4, name="listener_only")
    setter, getter = (closing(prog.load_program(
        syscall.BPF_PROG_TYPE_CGROUP_SOCKOPT, sockopt_program(by_optname, listener_only, setting),
        expected_attach_type=attach_type))
        for setting, attach_type in ((True, syscall.BPF_CGROUP_SETSOCKOPT),
                                     (False, syscall.BPF_CGROUP_GETSOCKOPT)))
    with prog.attached(setter, cgroup_fd, syscall.BPF_CGROUP_SETSOCKOPT), \
            prog.attached(getter, cgroup_fd, syscall.BPF_CGROUP_GETSOCKOPT), \
            cgroup.joined(test_cgroup):
        listener = socks.tcp_listener(inet_family)
        for optname, byte in ((INHERIT1, 0x11), (INHERIT2, 0x22), (LISTENER_ONLY, 0x33)):
            listener.setsockopt(SOL_CUSTOM_SIGNED, optname, bytes([byte]))
        conn = socks.tcp_connection(inet_family, listener)
        # The helper wrote the listener's storage: the syscall side sees the same bytes.
        assert [maps.lookup(m, listener.fileno(), 4)[0]
                for m in (*by_optname.values(), listener_only)] == [0x11, 0x22, 0x33]
        assert [listener.getsockopt(SOL_CUSTOM_SIGNED, n, 1)
                for n in (INHERIT1, INHERIT2, LISTENER_ONLY)] == [b"\x11", b"\x22", b"\x33"]
        # The child: clone maps copied at accept time, the plain map created empty now.
        with pytest.raises(syscall.BpfError) as raised:
            maps.lookup(listener_only, conn.accepted.fileno(), 4)
        assert raised.value.errno == errno.ENOENT
        assert [conn.accepted.getsockopt(SOL_CUSTOM_SIGNED, n, 1)
                for n in (INHERIT1, INHERIT2, LISTENER_ONLY)] == [b"\x11", b"\x22", b"\x00"]
        # The client never touched SOL_CUSTOM and was never a listener: nothing of its own.
        for map_fd in (*by_optname.values(), listener_only):
            with pytest.raises(syscall.BpfError) as raised:
                maps.lookup(map_fd, conn.client.fileno(), 4)
            assert raised.value.errno == errno.ENOENT


# --- sched_cls on BPF_PROG_TEST_RUN's own socket -------------------------------------------

SCHED_CLS_NO_SOCKET, SCHED_CLS_NO_STORAGE, SCHED_CLS_STORED = 2, 3, 1
# Ethernet (to/from zero MACs, IPv4) + a minimal IPv4 header + 26 bytes of payload.
TEST_PACKET = (bytes(12) + b"\x08\x00" + bytes([0x45, 0, 0, 46]) + bytes(16) + bytes(26))


def sched_cls_program(map_fd: int, null_check: bool = True) -> bytes:
    """Count runs in the storage of skb->sk; the return value says how far it got."""
    return assemble([
        mov64_reg(R6, R1),
        ldx_mem(DW, R2, R6, SKB_SK),                    # r2 = skb->sk: sock_common or NULL
        *([jmp_imm(JNE, R2, 0, "has_socket"),
           mov64_imm(R0, SCHED_CLS_NO_SOCKET), exit_insn(),
           label("has_socket")] if null_check else []),
        ld_map_fd(R1, map_fd),
        mov64_imm(R3, 0),
        mov64_imm(R4, F_CREATE),
        call("sk_storage_get"),
        jmp_imm(JNE, R0, 0, "stored"),
        mov64_imm(R0, SCHED_CLS_NO_STORAGE),
        exit_insn(),
        label("stored"),
        mov64_imm(R1, 1),
        atomic_add(W, R0, R1, 0),
        mov64_imm(R0, SCHED_CLS_STORED),
        exit_insn(),
    ])


@pytest.mark.parametrize("repeat", [1, 5])
def test_sched_cls_storage_on_the_test_run_socket_is_freed_with_it(
    storage_map, closing, repeat,
):
    """Storage a tc program gives BPF_PROG_TEST_RUN's socket is freed by its sk_free()."""
    prog_fd = closing(prog.load_program(syscall.BPF_PROG_TYPE_SCHED_CLS,
                                        sched_cls_program(storage_map)))
    counter = elements.ElementCounter(storage_map)
    try:
        assert counter.count() == 0
        # Every repetition reuses the one socket of the test run: the storage's counter
        # would reach `repeat`, and the element is gone once the run returns.
        assert prog.run_on_packet(prog_fd, TEST_PACKET, repeat) == SCHED_CLS_STORED
        assert counter.count() == 0
        assert prog.run_on_packet(prog_fd, TEST_PACKET, repeat) == SCHED_CLS_STORED
        assert counter.count() == 0
    finally:
        counter.close()


def test_sched_cls_must_check_skb_sk_for_null(storage_map):
    """skb->sk is sock_common-or-NULL in tc: passing it unchecked is refused (EACCES)."""
    with pytest.raises(syscall.BpfError) as raised:
        fd = prog.load_program(syscall.BPF_PROG_TYPE_SCHED_CLS,
                               sched_cls_program(storage_map, null_check=False))
        os.close(fd)
    assert raised.value.errno == errno.EACCES
    assert "R2 type=sock_common_or_null" in str(raised.value)
