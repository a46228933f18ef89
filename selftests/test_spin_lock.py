"""bpf_spin_lock inside sk storage values, from user space (BPF_F_LOCK) and from a program.

Value layout for these tests: struct { struct bpf_spin_lock lock; __u32 fields[N]; }, the
lock first. The kernel never copies the lock word between user space and the stored value
(copy_map_value skips it); if it did, a lock word written as "taken" would make the next
BPF_F_LOCK access spin forever. That access therefore runs in a child process under a
deadline, so a regression fails one test instead of wedging the suite.
"""

from __future__ import annotations

import errno
import socket
import struct
import time

import pytest
from bpfkit import cgroup, child, maps, probes, prog, sockdiag, syscall, sysctl
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
    W,
    alu64_imm,
    assemble,
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

pytestmark = pytest.mark.spin_lock

F_LOCK = syscall.BPF_F_LOCK
LOCK_SIZE = 4
OPTMEM_SYSCTL = "net.core.optmem_max"
# The deadline for a BPF_F_LOCK access that must not block; normally it takes microseconds.
LOCK_DEADLINE = 10.0


@pytest.fixture(autouse=True)
def _needs_spin_lock_values():
    probes.require("spin_lock_value")


def pack_value(lock_word: int, fields: list[int]) -> bytes:
    """A value as user space passes it: the lock word then the u32 fields."""
    return struct.pack(f"=I{len(fields)}I", lock_word, *fields)


def unpack_value(raw: bytes) -> tuple[int, list[int]]:
    """(lock word, fields) of a value read back from the kernel."""
    count = (len(raw) - LOCK_SIZE) // 4
    lock_word, *fields = struct.unpack(f"=I{count}I", raw)
    return lock_word, fields


def test_locked_update_and_lookup_round_trip(new_storage_map, socks):
    """BPF_F_LOCK update then BPF_F_LOCK lookup return the fields, lock word reading 0."""
    map_fd = new_storage_map(16, spin_lock=True)
    sock = socks.plain(socket.AF_INET, socket.SOCK_STREAM)
    maps.update(map_fd, sock.fileno(), pack_value(0, [1, 2, 3]), syscall.BPF_ANY | F_LOCK)
    assert unpack_value(maps.lookup(map_fd, sock.fileno(), 16, F_LOCK)) == (0, [1, 2, 3])
    maps.update(map_fd, sock.fileno(), pack_value(0, [4, 5, 6]), syscall.BPF_EXIST | F_LOCK)
    assert unpack_value(maps.lookup(map_fd, sock.fileno(), 16, F_LOCK)) == (0, [4, 5, 6])


def test_f_lock_without_spin_lock_is_einval(new_storage_map, socks):
    """BPF_F_LOCK on a value with no bpf_spin_lock is EINVAL for update and lookup."""
    map_fd = new_storage_map(16)
    sock = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
    maps.update(map_fd, sock.fileno(), bytes(range(16)))
    with pytest.raises(syscall.BpfError) as caught:
        maps.update(map_fd, sock.fileno(), bytes(16), F_LOCK)
    assert (caught.value.command, caught.value.errno) == ("BPF_MAP_UPDATE_ELEM", errno.EINVAL)
    with pytest.raises(syscall.BpfError) as caught:
        maps.lookup(map_fd, sock.fileno(), 16, F_LOCK)
    assert (caught.value.command, caught.value.errno) == ("BPF_MAP_LOOKUP_ELEM", errno.EINVAL)
    # The refused update changed nothing.
    assert maps.lookup(map_fd, sock.fileno(), 16) == bytes(range(16))


@pytest.mark.parametrize("update_flags", [syscall.BPF_ANY, syscall.BPF_ANY | F_LOCK],
                         ids=["plain-update", "locked-update"])
def test_user_lock_word_never_reaches_the_kernel(new_storage_map, socks, update_flags, request):
    """An update carrying a "taken" lock word leaves the kernel's lock free: F_LOCK returns."""
    map_fd = new_storage_map(16, spin_lock=True)
    sock = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
    maps.update(map_fd, sock.fileno(), pack_value(0xFFFFFFFF, [7, 8, 9]), update_flags)
    fd = sock.fileno()

    def locked_accesses() -> list:
        # Both directions take the kernel's lock; either would spin on a copied lock word.
        first = maps.lookup(map_fd, fd, 16, F_LOCK).hex()
        maps.update(map_fd, fd, pack_value(1, [10, 11, 12]), syscall.BPF_EXIST | F_LOCK)
        return [first, maps.lookup(map_fd, fd, 16, F_LOCK).hex()]

    try:
        first, second = child.run_in_child(locked_accesses, LOCK_DEADLINE)
    except child.ChildStuckInKernel as err:
        # A CPU now spins forever with interrupts off; the next locked access would
        # wedge another one and the guest would die without reporting.  Stop here so
        # this failure reaches the JUnit file.
        request.session.shouldstop = "a CPU is wedged in BPF_F_LOCK; stopping the session"
        pytest.fail(f"BPF_F_LOCK access hung: the user's lock word was copied in ({err})")
    except child.ChildTimeout as err:
        pytest.fail(f"BPF_F_LOCK access hung: the user's lock word was copied in ({err})")
    assert unpack_value(bytes.fromhex(first)) == (0, [7, 8, 9])
    assert unpack_value(bytes.fromhex(second)) == (0, [10, 11, 12])


def _write_for(map_fd: int, fd: int, fields: int, patterns: list[int], seconds: float):
    """A child-process body: BPF_F_LOCK-update the value to each pattern in turn for a while."""

    def run() -> int:
        # Prebuilt values: the loop is one syscall per iteration and nothing else.
        values = [bytes(LOCK_SIZE) + struct.pack("=I", p) * fields for p in patterns]
        writes, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            maps.update(map_fd, fd, values[writes % len(values)], syscall.BPF_EXIST | F_LOCK)
            writes += 1
        return writes

    return run


def _read_for(map_fd: int, fd: int, fields: int, seconds: float):
    """A child-process body: BPF_F_LOCK-look the value up for a while, counting torn reads."""

    def run() -> dict:
        size = LOCK_SIZE + 4 * fields
        reads, torn, seen, example = 0, 0, set(), None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            raw = maps.lookup(map_fd, fd, size, F_LOCK)
            reads += 1
            first = raw[LOCK_SIZE:LOCK_SIZE + 4]
            seen.add(first)
            if raw[LOCK_SIZE:] != first * fields:
                torn += 1
                example = example or sorted(set(unpack_value(raw)[1]))[:8]
        return {"reads": reads, "torn": torn, "distinct": len(seen), "example": example}

    return run


def test_concurrent_locked_updates_never_show_a_torn_value(new_storage_map, socks):
    """Writers store values whose fields are all equal; locked readers never see them mixed.

    Writers and readers are separate processes, so their syscalls truly overlap (threads
    would be serialised by the GIL between calls). Without BPF_F_LOCK on the reads this
    setup shows hundreds of torn values per second on a 2-CPU machine.
    """
    fields = 4095  # a 16 KiB value: each copy is long enough to be caught half-done
    map_fd = new_storage_map(LOCK_SIZE + 4 * fields, spin_lock=True)
    sock = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
    fd = sock.fileno()
    seconds = 1.0
    # The element is charged to the socket once, when created: make room for 16 KiB even
    # where optmem_max is smaller (20 KiB before 6.8, less on some configurations).
    with sysctl.at_least(OPTMEM_SYSCTL, 1 << 16):
        maps.update(map_fd, fd, bytes(LOCK_SIZE + 4 * fields), F_LOCK)
    writers = [
        child.RunningChild(_write_for(map_fd, fd, fields, [0x11111111, 0x22222222], seconds)),
        child.RunningChild(_write_for(map_fd, fd, fields, [0x33333333, 0x44444444], seconds)),
    ]
    readers = [child.RunningChild(_read_for(map_fd, fd, fields, seconds)) for _ in range(2)]
    writes = [w.result(seconds + 30) for w in writers]
    reports = [r.result(seconds + 30) for r in readers]
    torn = sum(r["torn"] for r in reports)
    reads = sum(r["reads"] for r in reports)
    example = next((r["example"] for r in reports if r["example"]), None)
    assert torn == 0, f"{torn} torn reads out of {reads}, e.g. fields {example}"
    # The run really overlapped: both writers wrote, the readers saw more than one value.
    assert min(writes) > 0 and reads > 0
    assert max(r["distinct"] for r in reports) > 1, reports


def locked_counter_program(map_fd: int) -> bytes:
    """Increment value->count under value->lock for every egress packet (a non-atomic RMW)."""
    return assemble([
        mov64_reg(R6, R1),                  # r6 = skb (ctx)
        ldx_mem(DW, R1, R6, 168),           # r1 = skb->sk (offsetof(struct __sk_buff, sk))
        jmp_imm(JEQ, R1, 0, "out"),
        call("sk_fullsock"),                # r0 = the full socket or NULL
        jmp_imm(JEQ, R0, 0, "out"),
        ld_map_fd(R1, map_fd),              # r1 = the sk storage map
        mov64_reg(R2, R0),                  # r2 = sk
        mov64_imm(R3, 0),                   # r3 = no init value: a zeroed value
        mov64_imm(R4, syscall.BPF_SK_STORAGE_GET_F_CREATE),
        call("sk_storage_get"),             # r0 = &value or NULL
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_reg(R7, R0),                  # r7 = &value (callee-saved across the calls)
        mov64_reg(R1, R7),                  # r1 = &value->lock (offset 0)
        call("spin_lock"),
        ldx_mem(W, R1, R7, LOCK_SIZE),      # r1 = value->count
        alu64_imm(ADD, R1, 1),              # r1 += 1
        stx_mem(W, R7, R1, LOCK_SIZE),      # value->count = r1
        mov64_reg(R1, R7),
        call("spin_unlock"),
        label("out"),
        mov64_imm(R0, 1),                   # allow the packet
        exit_insn(),
    ])


def _send_datagrams(sender: socket.socket, target, count: int):
    """A child-process body: sendto() `count` one-byte datagrams on the inherited socket."""

    def run() -> int:
        for _ in range(count):
            sender.sendto(b"x", target)
        return count

    return run


def test_program_counter_under_spin_lock_is_exact(
    new_storage_map, closing, test_cgroup, cgroup_fd, socks,
):
    """Processes sending on one socket at once: the locked counter ends at the exact total.

    The senders are forked children sharing the socket, so the egress program runs on
    several CPUs at the same time; the socket's cgroup (fixed when it was created) decides
    that the program runs, not the sending task's.
    """
    map_fd = new_storage_map(LOCK_SIZE + 4, spin_lock=True)
    prog_fd = closing(prog.load_program(
        syscall.BPF_PROG_TYPE_CGROUP_SKB, locked_counter_program(map_fd),
        expected_attach_type=syscall.BPF_CGROUP_INET_EGRESS,
    ))
    senders, per_sender = 4, 10000
    with prog.attached(prog_fd, cgroup_fd, syscall.BPF_CGROUP_INET_EGRESS):
        with cgroup.joined(test_cgroup):
            sender = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
            # A receiver nobody reads: datagrams past its buffer are dropped after egress,
            # which is all the counter sees.
            sink = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
        running = [
            child.RunningChild(_send_datagrams(sender, sink.getsockname(), per_sender))
            for _ in range(senders)
        ]
        sent = sum(c.result(60) for c in running)
    lock_word, (count,) = unpack_value(maps.lookup(map_fd, sender.fileno(), 8, F_LOCK))
    assert (lock_word, count) == (0, sent) == (0, senders * per_sender)


# Dumps per round: enough for the freed reply buffer of the 0xFF dump to be handed to the
# locked dump on the same CPU at least once, cheap either way.
DIAG_ROUNDS = 20


def test_sock_diag_dump_zeroes_the_lock_slot(new_storage_map, socks):
    """A sock_diag storage dump of a value with a bpf_spin_lock reads 0 in the lock slot.

    diag_get() copies the value around its lock (copy_map_value*) into a freshly reserved
    netlink attribute, which is not zeroed: the lock slot must be cleared explicitly or it
    carries whatever the reply buffer held before. Each round first dumps the same socket
    through a lock-free map whose value is all 0xFF, so the memory the locked dump reuses
    is dirty. Upstream fix: b5c111f4967b.
    """
    probes.require("diag_storages")
    locked = new_storage_map(16, spin_lock=True)
    dirty = new_storage_map(16)
    locked_id, dirty_id = maps.map_info(locked).id, maps.map_info(dirty).id
    sock = socks.tcp_listener(socket.AF_INET)  # UDP records carry no storage
    maps.update(dirty, sock.fileno(), b"\xff" * 16)
    maps.update(locked, sock.fileno(), pack_value(0, [1, 2, 3]), syscall.BPF_ANY | F_LOCK)

    dumped = []
    for _ in range(DIAG_ROUNDS):
        storages = sockdiag.socket_record(sock, meminfo=False, map_fds=[dirty]).storages
        assert storages == {dirty_id: b"\xff" * 16}
        storages = sockdiag.socket_record(sock, meminfo=False, map_fds=[locked]).storages
        assert set(storages) == {locked_id}
        dumped.append(unpack_value(storages[locked_id]))
    assert [d for d in dumped if d != (0, [1, 2, 3])] == []


# --- BPF_F_LOCK combined with NOEXIST/EXIST ----------------------------------------------

def _update_errno(map_fd: int, sock: socket.socket, value: bytes, flags: int) -> int:
    with pytest.raises(syscall.BpfError) as caught:
        maps.update(map_fd, sock.fileno(), value, flags)
    assert caught.value.command == "BPF_MAP_UPDATE_ELEM"
    return caught.value.errno


@pytest.mark.parametrize("neighbour", [False, True], ids=["alone", "with-other-map"])
def test_noexist_with_f_lock_on_existing_is_eexist(neighbour, new_storage_map, socks):
    """BPF_NOEXIST|BPF_F_LOCK on a value that exists is EEXIST; value and charge unchanged.

    F_LOCK's in-place path is for updates that may replace; with NOEXIST the kernel must
    still refuse, whether or not the socket holds values of other maps.
    """
    map_fd = new_storage_map(16, spin_lock=True)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    if neighbour:
        maps.update(new_storage_map(16, spin_lock=True), sock.fileno(), pack_value(0, [9, 9, 9]))
    maps.update(map_fd, sock.fileno(), pack_value(0, [1, 2, 3]), F_LOCK)
    charged = sockdiag.socket_record(sock).optmem
    assert _update_errno(map_fd, sock, pack_value(0, [4, 5, 6]),
                         syscall.BPF_NOEXIST | F_LOCK) == errno.EEXIST
    assert unpack_value(maps.lookup(map_fd, sock.fileno(), 16, F_LOCK)) == (0, [1, 2, 3])
    assert sockdiag.socket_record(sock).optmem == charged


@pytest.mark.parametrize("neighbour", [False, True], ids=["bare-socket", "with-other-map"])
def test_exist_with_f_lock_on_missing_is_enoent(neighbour, new_storage_map, socks):
    """BPF_EXIST|BPF_F_LOCK where this map has no value is ENOENT and creates nothing."""
    map_fd = new_storage_map(16, spin_lock=True)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    if neighbour:
        maps.update(new_storage_map(16, spin_lock=True), sock.fileno(), pack_value(0, [9, 9, 9]))
    charged = sockdiag.socket_record(sock).optmem
    assert _update_errno(map_fd, sock, pack_value(0, [4, 5, 6]),
                         syscall.BPF_EXIST | F_LOCK) == errno.ENOENT
    with pytest.raises(syscall.BpfError) as caught:
        maps.lookup(map_fd, sock.fileno(), 16, F_LOCK)
    assert caught.value.errno == errno.ENOENT
    assert sockdiag.socket_record(sock).optmem == charged


def test_any_with_f_lock_creates_beside_another_map(new_storage_map, socks):
    """BPF_ANY|BPF_F_LOCK where only another map has a value creates this map's value."""
    map_fd, other = new_storage_map(16, spin_lock=True), new_storage_map(16, spin_lock=True)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    maps.update(other, sock.fileno(), pack_value(0, [9, 9, 9]), F_LOCK)
    maps.update(map_fd, sock.fileno(), pack_value(0, [1, 2, 3]), F_LOCK)
    assert unpack_value(maps.lookup(map_fd, sock.fileno(), 16, F_LOCK)) == (0, [1, 2, 3])
    assert unpack_value(maps.lookup(other, sock.fileno(), 16, F_LOCK)) == (0, [9, 9, 9])
