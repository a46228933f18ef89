"""bpf_sk_storage_get/delete from tracing programs (fentry, fexit, tp_btf) and the deadlock guard.

Tracing programs get their own helper protos (bpf_sk_storage_get_tracing): a socket
pointer typed from BTF, possibly NULL at run time (the helper checks), and an
`allowed` hook, bpf_sk_storage_tracing_allowed(): fentry/fexit programs may use the
helpers unless they trace a function whose name starts with "bpf_sk_storage" (a
program there could re-enter the storage code it interrupted, holding its locks);
iterators and tp_btf programs may always. The verifier refuses the call with EINVAL
("helper call is not allowed in probe").
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from bpfkit import btf, btf_layout, maps, probes, prog, syscall, tracing
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
    R10,
    W,
    alu64_imm,
    assemble,
    atomic_add,
    call,
    exit_insn,
    ja,
    jmp_imm,
    label,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
    stx_mem,
)

pytestmark = [pytest.mark.prog, pytest.mark.tracing]

F_CREATE = syscall.BPF_SK_STORAGE_GET_F_CREATE
MARK = 0xACCE7ED
BPF_TRACE_RAW_TP = 23
# struct slots { __u64 nulls; __s64 delete_ret; __u64 runs; }
SLOTS = struct.Struct("=QqQ")


@pytest.fixture(autouse=True)
def _needs_tracing_helpers():
    probes.require("sk_storage_tracing_helpers")


def results_map(closing) -> int:
    """A one-slot array holding SLOTS."""
    return closing(maps.create_map(syscall.BPF_MAP_TYPE_ARRAY, 4, SLOTS.size, 1))


def read_slots(results_fd: int) -> tuple[int, int, int]:
    return SLOTS.unpack(maps.lookup_elem(results_fd, struct.pack("=I", 0), SLOTS.size))


def slot_pointer(results_fd: int) -> list:
    """r0 = &results[0] or jump to "out"."""
    return [
        st_mem(W, R10, -4, 0),
        ld_map_fd(R1, results_fd),
        mov64_reg(R2, R10),
        alu64_imm(ADD, R2, -4),
        call("map_lookup_elem"),
        jmp_imm(JEQ, R0, 0, "out"),
    ]


def mark_program(map_fd: int, results_fd: int, sk_ctx_offset: int) -> bytes:
    """get(map, ctx[sk], NULL, F_CREATE): write MARK into a new value, count NULL answers."""
    return assemble([
        mov64_reg(R6, R1),                      # r6 = ctx (the traced function's u64 args)
        ldx_mem(DW, R2, R6, sk_ctx_offset),     # r2 = the socket, possibly NULL
        ld_map_fd(R1, map_fd),
        mov64_imm(R3, 0),
        mov64_imm(R4, F_CREATE),
        call("sk_storage_get"),
        jmp_imm(JEQ, R0, 0, "null"),
        st_mem(W, R0, 0, MARK),                 # value.mark = MARK
        ja("out"),
        label("null"),
    ] + slot_pointer(results_fd) + [
        mov64_imm(R1, 1),
        atomic_add(DW, R0, R1, 0),              # nulls += 1
        label("out"),
        mov64_imm(R0, 0),
        exit_insn(),
    ])


def delete_program(map_fd: int, results_fd: int) -> bytes:
    """delete(map, ctx[0]) and record its return value and the number of runs."""
    return assemble([
        mov64_reg(R6, R1),
        ldx_mem(DW, R2, R6, 0),                 # r2 = sk, the first argument
        ld_map_fd(R1, map_fd),
        call("sk_storage_delete"),
        stx_mem(DW, R10, R0, -16),              # keep the result across the lookup
    ] + slot_pointer(results_fd) + [
        ldx_mem(DW, R1, R10, -16),
        stx_mem(DW, R0, R1, 8),                 # delete_ret = r0 of the helper
        mov64_imm(R1, 1),
        atomic_add(DW, R0, R1, 16),             # runs += 1
        label("out"),
        mov64_imm(R0, 0),
        exit_insn(),
    ])


def attached(prog_fd: int, closing) -> None:
    """Attach a loaded tracing program until the test ends."""
    closing(tracing.attach(prog_fd))


def mark_of(map_fd: int, sock: socket.socket) -> int | None:
    """The socket's value's mark, None without a value."""
    raw = maps.lookup_or_none(map_fd, sock.fileno(), 8)
    return None if raw is None else struct.unpack("=Q", raw)[0]


def test_fexit_on_accept_gives_storage_to_the_accepted_socket(storage_map, closing, socks):
    """fexit of inet_csk_accept: the returned child gets storage; a NULL return gets NULL.

    inet_csk_accept() returns NULL when nothing is pending (EAGAIN): the helper must
    answer NULL for a NULL socket instead of touching it.
    """
    results = results_map(closing)
    ret_offset = 8 * btf_layout.kernel_layout().param_count(tracing.func_id("inet_csk_accept"))
    prog_fd = closing(tracing.load(mark_program(storage_map, results, ret_offset),
                                   "inet_csk_accept", tracing.BPF_TRACE_FEXIT))
    attached(prog_fd, closing)
    listener = socks.tcp_listener(socket.AF_INET)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert read_slots(results)[0] == 1
    conn = socks.tcp_connection(socket.AF_INET, listener)
    assert mark_of(storage_map, conn.accepted) == MARK
    assert mark_of(storage_map, conn.listener) is None
    assert mark_of(storage_map, conn.client) is None
    assert read_slots(results)[0] == 1


def test_fentry_delete_returns_zero_then_enoent(storage_map, closing, socks):
    """fentry of tcp_close deleting the closing socket's value: 0 with a value, -ENOENT without."""
    results = results_map(closing)
    prog_fd = closing(tracing.load(delete_program(storage_map, results), "tcp_close",
                                   tracing.BPF_TRACE_FENTRY))
    attached(prog_fd, closing)
    with_value = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    maps.update(storage_map, with_value.fileno(), struct.pack("=Q", 5))
    with_value.close()
    assert read_slots(results)[1:] == (0, 1)
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    assert read_slots(results)[1:] == (-errno.ENOENT, 2)


def test_tp_btf_program_may_use_the_helpers(storage_map, closing, socks):
    """A tp_btf program on inet_sock_set_state gives storage to sockets changing state."""
    results = results_map(closing)
    try:
        target = btf.kernel_btf().find("btf_trace_inet_sock_set_state", btf.BTF_KIND_TYPEDEF)
    except LookupError:
        # The tracepoint is 4.16's; tp_btf programs (5.5) always see it in the kernel's BTF.
        probes.absent("a BTF-typed inet_sock_set_state tracepoint", "5.5",
                      "kernel BTF has no btf_trace_inet_sock_set_state")
    # The tracepoint's arguments start with the socket.
    prog_fd = closing(prog.load_program(
        syscall.BPF_PROG_TYPE_TRACING, mark_program(storage_map, results, 0),
        expected_attach_type=BPF_TRACE_RAW_TP, attach_btf_id=target))
    attached(prog_fd, closing)
    conn = socks.tcp_connection(socket.AF_INET)
    # CLOSE -> SYN_SENT -> ESTABLISHED on the client; the listener went to LISTEN before.
    assert mark_of(storage_map, conn.client) == MARK
    assert mark_of(storage_map, conn.accepted) == MARK


@pytest.mark.parametrize("target", ["bpf_sk_storage_free", "bpf_sk_storage_clone"])
@pytest.mark.parametrize("helper", ["sk_storage_get", "sk_storage_delete"])
def test_tracing_a_storage_function_cannot_use_the_helpers(target, helper, storage_map, closing):
    """fentry on a bpf_sk_storage* function calling get or delete is refused, EINVAL.

    The control is the same program on tcp_close (the feature probe loads it).
    """
    try:
        tracing.func_id(target)
    except LookupError:
        probes.absent(f"the function {target} in kernel BTF", "5.5",
                      f"kernel BTF has no FUNC {target}")
    results = results_map(closing)
    program = (mark_program(storage_map, results, 0) if helper == "sk_storage_get"
               else delete_program(storage_map, results))
    closing(tracing.load(program, "tcp_close", tracing.BPF_TRACE_FENTRY))
    try:
        fd = tracing.load(program, target, tracing.BPF_TRACE_FENTRY)
    except syscall.BpfError as err:
        assert (err.command, err.errno) == ("BPF_PROG_LOAD", errno.EINVAL)
        assert "helper call is not allowed in probe" in err.detail, err.detail
    else:
        os.close(fd)
        pytest.fail(f"an fentry program on {target} may call bpf_{helper}")
