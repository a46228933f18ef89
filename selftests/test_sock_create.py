"""bpf_sk_storage_get from a cgroup/sock_create program, whose context is the new socket.

For BPF_PROG_TYPE_CGROUP_SOCK the helper has its own proto
(bpf_sk_storage_get_cg_sock_proto) taking the context itself as the socket, so a
program can give every socket created in its cgroup storage before user space
has even seen the fd.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from bpfkit import cgroup, maps, probes, prog, syscall
from bpfkit.asm import (
    JEQ,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    W,
    assemble,
    call,
    exit_insn,
    jmp_imm,
    label,
    ld_map_fd,
    mov64_imm,
    mov64_reg,
    st_mem,
)

pytestmark = [pytest.mark.prog, pytest.mark.hooks]

BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_CGROUP_INET_SOCK_CREATE = 2
MARK = 0x50C4C2EA


def sock_create_program(map_fd: int) -> bytes:
    """get(map, ctx, NULL, F_CREATE) and write MARK into the new value; allow the socket."""
    return assemble([
        mov64_reg(R6, R1),
        ld_map_fd(R1, map_fd),
        mov64_reg(R2, R6),                      # r2 = ctx: the socket being created
        mov64_imm(R3, 0),
        mov64_imm(R4, syscall.BPF_SK_STORAGE_GET_F_CREATE),
        call("sk_storage_get"),
        jmp_imm(JEQ, R0, 0, "out"),
        st_mem(W, R0, 0, MARK),
        label("out"),
        mov64_imm(R0, 1),                       # 1 = let the socket be created
        exit_insn(),
    ])


def load(program: bytes, closing) -> int:
    try:
        return closing(prog.load_program(BPF_PROG_TYPE_CGROUP_SOCK, program,
                                          expected_attach_type=BPF_CGROUP_INET_SOCK_CREATE))
    except syscall.BpfError as err:
        if err.errno == errno.EINVAL and "unknown func bpf_sk_storage_get" in err.detail:
            probes.absent("bpf_sk_storage_get in cgroup/sock programs", "5.11",
                          "the verifier does not know the helper there")
        raise


def mark_of(map_fd: int, sock: socket.socket) -> int | None:
    """The first u32 of the socket's value, None without one."""
    raw = maps.lookup_or_none(map_fd, sock.fileno(), 8)
    return None if raw is None else struct.unpack("=II", raw)[0]


@pytest.mark.parametrize("sock_type", [socket.SOCK_DGRAM, socket.SOCK_STREAM],
                         ids=["udp", "tcp"])
def test_sock_create_program_gives_every_new_socket_storage(sock_type, storage_map, closing,
                                                            test_cgroup, cgroup_fd, socks):
    """Sockets created in the cgroup have the program's value at once; others have none."""
    prog_fd = load(sock_create_program(storage_map), closing)
    outsider = socks.plain(socket.AF_INET, sock_type)
    with prog.attached(prog_fd, cgroup_fd, BPF_CGROUP_INET_SOCK_CREATE), \
            cgroup.joined(test_cgroup):
        insiders = [socks.plain(socket.AF_INET, sock_type) for _ in range(3)]
    assert [mark_of(storage_map, s) for s in insiders] == [MARK] * 3
    assert mark_of(storage_map, outsider) is None
    # Created after the program was detached: no storage.
    with cgroup.joined(test_cgroup):
        late = socks.plain(socket.AF_INET, sock_type)
    assert mark_of(storage_map, late) is None
