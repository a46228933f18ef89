"""What bpf_sk_storage_get/delete return to the program, for every branch a program can see.

A cgroup_skb egress program calls one helper for the sending UDP socket on every
datagram and writes what it got into an array map: delete's integer return, or
for get whether a pointer came back and the first 8 bytes it points to. The
kernel side (net/core/bpf_sk_storage.c): delete returns 0 or -ENOENT; get returns
NULL for flags above BPF_SK_STORAGE_GET_F_CREATE before it even looks, the
existing value for flags 0 or F_CREATE, and creates only with F_CREATE, giving
NULL when the creation fails (optmem exhausted).
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from bpfkit import cgroup, charges, maps, prog, syscall, sysctl
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
    R8,
    R9,
    R10,
    W,
    alu64_imm,
    assemble,
    atomic_add,
    call,
    exit_insn,
    jmp_imm,
    label,
    ld_imm64,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
    stx_mem,
)

pytestmark = [pytest.mark.prog, pytest.mark.helpers]

SKB_SK = 168  # offsetof(struct __sk_buff, sk)
EGRESS = syscall.BPF_CGROUP_INET_EGRESS
F_CREATE = syscall.BPF_SK_STORAGE_GET_F_CREATE
VALUE_SIZE = 8
# struct result { __s64 ret; __u64 calls; __u64 first8; }: the helper's last answer
RESULT = struct.Struct("=qQQ")


def helper_program(map_fd: int, results_fd: int, helper: str, flags: int = 0) -> bytes:
    """On egress, call `helper` for the sending socket and record what came back."""
    if helper == "sk_storage_delete":
        call_and_keep = [
            ld_map_fd(R1, map_fd),
            mov64_reg(R2, R7),                  # r2 = sk
            call("sk_storage_delete"),
            mov64_reg(R8, R0),                  # r8 = 0 or -errno
            mov64_imm(R9, 0),
        ]
    else:
        call_and_keep = [
            ld_map_fd(R1, map_fd),
            mov64_reg(R2, R7),                  # r2 = sk
            mov64_imm(R3, 0),                   # r3 = no init value (zeroes)
            ld_imm64(R4, flags),                # r4 = flags (64-bit: high bits too)
            call("sk_storage_get"),
            mov64_imm(R8, 0),                   # r8 = 0 for NULL...
            mov64_imm(R9, 0),
            jmp_imm(JEQ, R0, 0, "record"),
            mov64_imm(R8, 1),                   # ...1 for a pointer,
            ldx_mem(DW, R9, R0, 0),             # r9 = the value it points to
        ]
    return assemble([
        mov64_reg(R6, R1),                      # r6 = skb
        ldx_mem(DW, R1, R6, SKB_SK),            # r1 = skb->sk or NULL
        jmp_imm(JEQ, R1, 0, "out"),
        call("sk_fullsock"),
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_reg(R7, R0),                      # r7 = the full socket
    ] + call_and_keep + [
        label("record"),
        st_mem(W, R10, -4, 0),                  # key 0 at fp-4
        ld_map_fd(R1, results_fd),
        mov64_reg(R2, R10),
        alu64_imm(ADD, R2, -4),
        call("map_lookup_elem"),
        jmp_imm(JEQ, R0, 0, "out"),
        stx_mem(DW, R0, R8, 0),                 # result.ret = r8
        stx_mem(DW, R0, R9, 16),                # result.first8 = r9
        mov64_imm(R1, 1),
        atomic_add(DW, R0, R1, 8),              # result.calls += 1
        label("out"),
        mov64_imm(R0, 1),                       # let the packet through
        exit_insn(),
    ])


class HelperRig:
    """A UDP pair inside a cgroup whose egress program calls one helper per datagram."""

    def __init__(self, map_fd: int, results_fd: int, sender: socket.socket,
                 receiver: socket.socket) -> None:
        self.map_fd, self.results_fd = map_fd, results_fd
        self.sender, self.receiver = sender, receiver

    def send_one(self) -> tuple[int, int, int]:
        """Send one datagram (received, so it surely left); (ret, calls, first8) after it."""
        self.sender.send(b"x")
        self.receiver.settimeout(5)
        self.receiver.recv(16)
        return RESULT.unpack(maps.lookup_elem(self.results_fd, struct.pack("=I", 0),
                                              RESULT.size))


@pytest.fixture
def rig(request, new_storage_map, closing, test_cgroup, cgroup_fd, socks):
    """Factory: rig(helper, flags) -> a HelperRig with the program attached and joined."""
    import contextlib

    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)

    def make(helper: str, flags: int = 0) -> HelperRig:
        map_fd = new_storage_map(VALUE_SIZE)
        results = closing(maps.create_map(syscall.BPF_MAP_TYPE_ARRAY, 4, RESULT.size, 1))
        prog_fd = closing(prog.load_program(
            syscall.BPF_PROG_TYPE_CGROUP_SKB, helper_program(map_fd, results, helper, flags),
            expected_attach_type=EGRESS))
        stack.enter_context(prog.attached(prog_fd, cgroup_fd, EGRESS))
        stack.enter_context(cgroup.joined(test_cgroup))
        # A socket belongs to the cgroup it was created in: make them after joining.
        sender, receiver = socks.udp_pair(socket.AF_INET)
        return HelperRig(map_fd, results, sender, receiver)

    return make


def lookup_errno(map_fd: int, sock: socket.socket) -> int:
    """The errno of a lookup that must fail."""
    with pytest.raises(syscall.BpfError) as raised:
        maps.lookup(map_fd, sock.fileno(), VALUE_SIZE)
    return raised.value.errno


def test_delete_returns_zero_then_enoent(rig, new_storage_map):
    """bpf_sk_storage_delete returns 0 when it removed the value, -ENOENT when there was none."""
    r = rig("sk_storage_delete")
    other = new_storage_map(VALUE_SIZE)
    maps.update(r.map_fd, r.sender.fileno(), struct.pack("=Q", 41))
    maps.update(other, r.sender.fileno(), struct.pack("=Q", 42))
    assert r.send_one()[:2] == (0, 1)
    assert lookup_errno(r.map_fd, r.sender) == errno.ENOENT
    # The socket still has storage (the other map's): only this map's value was missing.
    assert r.send_one()[:2] == (-errno.ENOENT, 2)
    assert maps.lookup(other, r.sender.fileno(), VALUE_SIZE) == struct.pack("=Q", 42)


def test_delete_on_a_bare_socket_is_enoent(rig):
    """On a socket that never had storage, delete returns -ENOENT."""
    r = rig("sk_storage_delete")
    assert r.send_one()[:2] == (-errno.ENOENT, 1)


def test_get_without_create_on_a_bare_socket_is_null_and_creates_nothing(rig):
    """Flags 0 on a socket without storage: NULL, and no value and no charge appear."""
    r = rig("sk_storage_get", 0)
    baseline = charges.optmem(r.sender)
    assert r.send_one()[:2] == (0, 1)
    assert lookup_errno(r.map_fd, r.sender) == errno.ENOENT
    assert charges.optmem(r.sender) == baseline


@pytest.mark.parametrize("flags", [0, F_CREATE])
def test_get_returns_the_existing_value(flags, rig):
    """Flags 0 or F_CREATE on a socket with a value: that very value comes back."""
    r = rig("sk_storage_get", flags)
    maps.update(r.map_fd, r.sender.fileno(), struct.pack("=Q", 0xC0FFEE))
    assert r.send_one() == (1, 1, 0xC0FFEE)


@pytest.mark.parametrize("flags", [2, F_CREATE | 2, 1 << 40])
def test_get_with_unknown_flags_is_null_even_with_a_value(flags, rig):
    """Flag bits above F_CREATE give NULL before any lookup, also when a value exists."""
    r = rig("sk_storage_get", flags)
    maps.update(r.map_fd, r.sender.fileno(), struct.pack("=Q", 7))
    assert r.send_one()[:2] == (0, 1)
    assert maps.lookup(r.map_fd, r.sender.fileno(), VALUE_SIZE) == struct.pack("=Q", 7)


def test_get_create_that_cannot_be_charged_is_null(rig):
    """F_CREATE when optmem_max leaves no room: NULL, nothing created, nothing charged."""
    r = rig("sk_storage_get", F_CREATE)
    baseline = charges.optmem(r.sender)
    with sysctl.temporarily("net.core.optmem_max", baseline):
        assert r.send_one()[:2] == (0, 1)
    assert lookup_errno(r.map_fd, r.sender) == errno.ENOENT
    assert charges.optmem(r.sender) == baseline
    # The control: with the limit back, the same call creates a zeroed value.
    assert r.send_one() == (1, 2, 0)
    assert maps.lookup(r.map_fd, r.sender.fileno(), VALUE_SIZE) == bytes(VALUE_SIZE)
