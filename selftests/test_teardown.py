"""Storage cleanup when sockets go away: nothing of a closed socket stays in the map.

A closed socket has no fd and no sock_diag record, so what it left behind is read from
the map itself (bpfkit.elements: the project patch's fdinfo count or a bpf_iter program).
A socket's storage is freed when the socket is destroyed, which for TCP can come after
close() (FIN handshake, RCU-deferred free), so every "it is gone" is a bounded wait
that fails with the last value seen.  Memory is read where the kernel charges it:
sk_omem_alloc, reported as SK_MEMINFO_OPTMEM by sock_diag.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from bpfkit import (
    asm,
    btf_layout,
    charges,
    elements,
    maps,
    probes,
    sockdiag,
    sockets,
    syscall,
    sysctl,
    tracing,
)

pytestmark = pytest.mark.teardown

# Generous: a wait ends as soon as the expected value is seen, and under TCG emulation
# an RCU grace period plus a TCP FIN exchange can take seconds.
CLEANUP_TIMEOUT = float(os.environ.get("SK_STORAGE_CLEANUP_TIMEOUT", "30"))
SOCKETS_PER_KIND = 6
VALUE_SIZE = 8


@pytest.fixture
def count_elements() -> Iterator:
    """Factory: an ElementCounter for a map (without the fdinfo patch: bpf_iter, required)."""
    counters: list[elements.ElementCounter] = []

    def make(map_fd: int) -> elements.ElementCounter:
        if elements.fdinfo_count(map_fd) is None:
            probes.require("sk_storage_iter")
        counter = elements.ElementCounter(map_fd)
        counters.append(counter)
        return counter

    yield make
    for counter in counters:
        counter.close()


def value_for(index: int) -> bytes:
    """A value that names its socket, so a mix-up between sockets shows."""
    return struct.pack("=Q", 0x5EED_0000_0000 + index)


def lookup_errno(map_fd: int, sock: socket.socket) -> int:
    """The errno of a lookup that must fail (it returning a value fails the test)."""
    with pytest.raises(syscall.BpfError) as raised:
        maps.lookup(map_fd, sock.fileno(), VALUE_SIZE)
    return raised.value.errno


def optmem(sock: socket.socket) -> int:
    """sk_omem_alloc of a live socket, as sock_diag reports it."""
    return sockdiag.socket_record(sock).optmem


def storage_charges() -> charges.StorageCharges:
    """This kernel's element and header charges (from its BTF); skips without kernel BTF."""
    probes.require("kernel_btf")
    return charges.kernel_charges()


def families() -> list[int]:
    """IPv4, and IPv6 when ::1 is usable here."""
    return [socket.AF_INET, socket.AF_INET6] if sockets.ipv6_available() else [socket.AF_INET]


def sockets_of_every_kind(socks, family: int) -> list[socket.socket]:
    """UDP sockets, a TCP listener, connected clients and their accepted children."""
    made = [socks.bound(family, socket.SOCK_DGRAM) for _ in range(SOCKETS_PER_KIND)]
    listener = socks.tcp_listener(family)
    made.append(listener)
    for _ in range(SOCKETS_PER_KIND):
        conn = socks.tcp_connection(family, listener)
        made += [conn.client, conn.accepted]
    return made


def test_closed_sockets_leave_no_storage_in_the_map(storage_map, socks, count_elements):
    """Every kind of socket, v4 and v6: after close() the map's element count returns to 0."""
    counter = count_elements(storage_map)
    assert counter.count() == 0
    everything = [s for family in families() for s in sockets_of_every_kind(socks, family)]
    for index, sock in enumerate(everything):
        maps.update(storage_map, sock.fileno(), value_for(index))
    assert counter.count() == len(everything)
    for index, sock in enumerate(everything):
        assert maps.lookup(storage_map, sock.fileno(), VALUE_SIZE) == value_for(index)

    socks.close_all()
    reached, last = elements.wait_for_count(counter, 0, CLEANUP_TIMEOUT)
    assert reached, (f"{last} of {len(everything)} elements still in the map "
                     f"{CLEANUP_TIMEOUT:g} s after their sockets closed ({counter.method})")

    # The map outlives the sockets and serves new ones.
    fresh = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    maps.update(storage_map, fresh.fileno(), value_for(999))
    assert maps.lookup(storage_map, fresh.fileno(), VALUE_SIZE) == value_for(999)
    assert counter.count() == 1
    maps.delete(storage_map, fresh.fileno())
    assert counter.count() == 0


def test_accepted_child_inherits_only_clone_maps(inet_family, new_storage_map, socks,
                                                 count_elements):
    """A listener's storage reaches its accepted child in a BPF_F_CLONE map only, as a copy."""
    probes.require("clone_flag")
    clone_map = new_storage_map(
        VALUE_SIZE, map_flags=syscall.BPF_F_NO_PREALLOC | syscall.BPF_F_CLONE)
    plain_map = new_storage_map(VALUE_SIZE)
    listener = socks.tcp_listener(inet_family)
    maps.update(clone_map, listener.fileno(), value_for(1))
    maps.update(plain_map, listener.fileno(), value_for(2))

    conn = socks.tcp_connection(inet_family, listener)

    assert maps.lookup(clone_map, conn.accepted.fileno(), VALUE_SIZE) == value_for(1)
    assert lookup_errno(plain_map, conn.accepted) == errno.ENOENT
    # The connecting side is not a clone of anything.
    assert lookup_errno(clone_map, conn.client) == errno.ENOENT
    assert lookup_errno(plain_map, conn.client) == errno.ENOENT
    # The child got its own element, not a view of the listener's.
    maps.update(clone_map, conn.accepted.fileno(), value_for(3))
    assert maps.lookup(clone_map, listener.fileno(), VALUE_SIZE) == value_for(1)
    assert count_elements(clone_map).count() == 2
    assert count_elements(plain_map).count() == 1


def test_closing_the_child_keeps_the_listeners_storage(inet_family, new_storage_map, socks,
                                                       count_elements):
    """The child's cloned element goes with the child; the listener keeps value and optmem."""
    probes.require("clone_flag")
    clone_map = new_storage_map(
        VALUE_SIZE, map_flags=syscall.BPF_F_NO_PREALLOC | syscall.BPF_F_CLONE)
    listener = socks.tcp_listener(inet_family)
    maps.update(clone_map, listener.fileno(), value_for(7))
    listener_optmem = optmem(listener)
    counter = count_elements(clone_map)

    conn = socks.tcp_connection(inet_family, listener)
    assert counter.count() == 2
    # The peer closes first, so the child is destroyed by the peer's last ACK (LAST_ACK ->
    # tcp_done()). Closed first, the child would sit orphaned in FIN_WAIT1; when the peer's
    # ACK is then processed from the socket backlog (sock_owned_by_user() in
    # tcp_rcv_state_process()) the kernel arms the 60 s FIN_WAIT2 timer instead of going
    # to time-wait, and the child and its element outlive CLEANUP_TIMEOUT: the flake
    # once seen on Debian 6.1.176 over IPv6.
    conn.client.close()
    assert conn.accepted.recv(1) == b""  # the child has the FIN: it is in CLOSE_WAIT
    conn.accepted.close()
    reached, last = elements.wait_for_count(counter, 1, CLEANUP_TIMEOUT)
    assert reached, f"{last} elements after the child closed, expected the listener's 1"

    assert maps.lookup(clone_map, listener.fileno(), VALUE_SIZE) == value_for(7)
    assert optmem(listener) == listener_optmem
    # The listener still clones into the next child.
    again = socks.tcp_connection(inet_family, listener)
    assert maps.lookup(clone_map, again.accepted.fileno(), VALUE_SIZE) == value_for(7)


SOCKET_KINDS = ["udp", "tcp_listener", "tcp_client", "tcp_accepted"]


def socket_of_kind(socks, family: int, kind: str) -> socket.socket:
    """One live socket of the named kind."""
    if kind == "udp":
        return socks.bound(family, socket.SOCK_DGRAM)
    if kind == "tcp_listener":
        return socks.tcp_listener(family)
    conn = socks.tcp_connection(family)
    return conn.client if kind == "tcp_client" else conn.accepted


@pytest.mark.parametrize("kind", SOCKET_KINDS)
def test_optmem_returns_to_baseline_after_delete(inet_family, kind, new_storage_map, socks):
    """Each element charges sk_omem_alloc; deleting them gives every byte back."""
    first, second = new_storage_map(VALUE_SIZE), new_storage_map(64)
    sock = socket_of_kind(socks, inet_family, kind)
    baseline = optmem(sock)

    maps.update(first, sock.fileno(), value_for(1))
    with_first = optmem(sock)
    maps.update(second, sock.fileno(), bytes(range(64)))
    with_both = optmem(sock)
    # The first element also pays for the socket's storage header, the second only for
    # itself: both to the byte of this kernel's layout.
    layout = storage_charges()
    assert with_first - baseline == layout.first_element(VALUE_SIZE)
    assert with_both - with_first == layout.element(64)

    maps.delete(second, sock.fileno())
    assert optmem(sock) == with_first
    maps.delete(first, sock.fileno())
    assert optmem(sock) == baseline
    assert lookup_errno(first, sock) == errno.ENOENT


@pytest.mark.parametrize("kind", ["tcp_client", "tcp_accepted"])
def test_sock_diag_reports_storage_until_delete(inet_family, kind, new_storage_map, socks):
    """The storage dump of a TCP socket shows each map's value, and nothing once deleted."""
    probes.require("diag_storages")
    first, second = new_storage_map(VALUE_SIZE), new_storage_map(64)
    sock = socket_of_kind(socks, inet_family, kind)
    maps.update(first, sock.fileno(), value_for(5))
    maps.update(second, sock.fileno(), bytes(range(64)))
    ids = maps.map_info(first).id, maps.map_info(second).id

    record = sockdiag.socket_record(sock, map_fds=[first, second])
    assert record.storages == {ids[0]: value_for(5), ids[1]: bytes(range(64))}
    maps.delete(first, sock.fileno())
    assert sockdiag.socket_record(sock, map_fds=[first, second]).storages == {
        ids[1]: bytes(range(64))}
    maps.delete(second, sock.fileno())
    assert sockdiag.socket_record(sock, map_fds=[first, second]).storages == {}


def test_update_beyond_optmem_max_is_enomem(new_storage_map, socks):
    """An element that would take sk_omem_alloc past net.core.optmem_max is refused, ENOMEM."""
    map_fd = new_storage_map(VALUE_SIZE)
    # What one first element costs, measured on a socket of the same kind.
    probe = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    probe_baseline = optmem(probe)
    maps.update(map_fd, probe.fileno(), value_for(0))
    cost = optmem(probe) - probe_baseline
    assert cost == storage_charges().first_element(VALUE_SIZE)

    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = optmem(sock)
    original = sysctl.read("net.core.optmem_max")
    with sysctl.temporarily("net.core.optmem_max", baseline + cost - 1):
        with pytest.raises(syscall.BpfError) as raised:
            maps.update(map_fd, sock.fileno(), value_for(1))
        assert raised.value.errno == errno.ENOMEM
        # Nothing half-made: no element, no charge left behind.
        assert lookup_errno(map_fd, sock) == errno.ENOENT
        assert optmem(sock) == baseline
    assert sysctl.read("net.core.optmem_max") == original

    maps.update(map_fd, sock.fileno(), value_for(1))
    assert maps.lookup(map_fd, sock.fileno(), VALUE_SIZE) == value_for(1)
    assert optmem(sock) == baseline + cost


# --- the dying socket's optmem, seen from inside bpf_sk_storage_free() ------------------

# struct { __u32 calls; __s32 omem; }: per watched socket cookie, how often
# bpf_sk_storage_free() returned for it and sk->sk_omem_alloc when it last did.
DESTROY_RECORD = struct.Struct("=Ii")


def destroy_watch_program(records_fd: int, cookie_off: int, omem_off: int) -> bytes:
    """fexit of bpf_sk_storage_free(struct sock *sk): record sk_omem_alloc of watched sockets.

    A socket is watched when its cookie (sk->__sk_common.skc_cookie, set once user space
    asked SO_COOKIE) is a key of records_fd; every other socket is ignored.
    """
    return asm.assemble([
        asm.ldx_mem(asm.DW, asm.R6, asm.R1, 0),            # r6 = sk (ctx[0], BTF struct sock)
        asm.ldx_mem(asm.DW, asm.R1, asm.R6, cookie_off),   # r1 = sk->sk_cookie
        asm.stx_mem(asm.DW, asm.R10, asm.R1, -8),          # key = cookie at fp-8
        asm.ld_map_fd(asm.R1, records_fd),
        asm.mov64_reg(asm.R2, asm.R10),
        asm.alu64_imm(asm.ADD, asm.R2, -8),                # r2 = &key
        asm.call("map_lookup_elem"),                       # r0 = this socket's record or NULL
        asm.jmp_imm(asm.JEQ, asm.R0, 0, "out"),            # not a watched socket
        asm.ldx_mem(asm.W, asm.R1, asm.R6, omem_off),      # r1 = sk->sk_omem_alloc.counter
        asm.stx_mem(asm.W, asm.R0, asm.R1, 4),             # record->omem = r1
        asm.mov64_imm(asm.R1, 1),
        asm.atomic_add(asm.W, asm.R0, asm.R1, 0),          # lock record->calls += 1
        asm.label("out"),
        asm.mov64_imm(asm.R0, 0),
        asm.exit_insn(),
    ])


class DestroyWatch:
    """An fexit program on bpf_sk_storage_free() reporting the omem of chosen sockets."""

    def __init__(self, closing) -> None:
        layout = btf_layout.kernel_layout()
        cookie = layout.member("sock", "__sk_common.skc_cookie")
        omem = layout.member("sock", "sk_omem_alloc")
        assert (cookie.size, omem.size) == (8, 4), (cookie, omem)
        self.records_fd = closing(maps.create_map(
            syscall.BPF_MAP_TYPE_HASH, 8, DESTROY_RECORD.size, 64))
        self.prog_fd = closing(tracing.load(
            destroy_watch_program(self.records_fd, cookie.offset, omem.offset),
            probes.SK_STORAGE_FREE_FUNC, name="storage_free"))
        self._closing = closing
        self.cookies: dict[str, int] = {}

    def watch(self, name: str, sock: socket.socket) -> None:
        """Record this socket's destruction under `name`."""
        cookie = sockdiag.socket_cookie(sock)
        self.cookies[name] = cookie
        maps.update_elem(self.records_fd, struct.pack("=Q", cookie), DESTROY_RECORD.pack(0, 0))

    def attach(self) -> None:
        """Start running the program (detached when the test's fds are closed)."""
        self._closing(tracing.attach(self.prog_fd))

    def records(self) -> dict[str, tuple[int, int]]:
        """(calls, omem) per watched socket name."""
        return {name: DESTROY_RECORD.unpack(maps.lookup_elem(
                    self.records_fd, struct.pack("=Q", cookie), DESTROY_RECORD.size))
                for name, cookie in self.cookies.items()}


def test_destroyed_socket_has_uncharged_all_its_storage(inet_family, new_storage_map, socks,
                                                        closing):
    """bpf_sk_storage_free() at socket destruction gives back every byte it charged.

    Each element charged sk_omem_alloc when created; when the socket dies, freeing its
    storage must uncharge the elements and the storage header, so at the return of
    bpf_sk_storage_free() sk_omem_alloc of a socket with no other optmem user is 0
    (__sk_destruct() checks exactly that, with a pr_debug only). No interface shows a
    destroyed socket, so an fexit program reads it. Regression: 55d49f750b1c.
    """
    probes.require("sk_storage_fexit")
    watch = DestroyWatch(closing)
    storage_maps = [new_storage_map(VALUE_SIZE), new_storage_map(64)]
    for kind in SOCKET_KINDS:
        sock = socket_of_kind(socks, inet_family, kind)
        assert optmem(sock) == 0, f"{kind}: something else already charges optmem"
        maps.update(storage_maps[0], sock.fileno(), value_for(1))
        maps.update(storage_maps[1], sock.fileno(), bytes(range(64)))
        assert optmem(sock) == storage_charges().first_element(VALUE_SIZE) + \
            storage_charges().element(64), f"{kind}: not the charge of the two elements"
        watch.watch(kind, sock)
    watch.attach()

    socks.close_all()
    reached, _ = elements.wait_for(
        lambda: sum(calls >= 1 for calls, _ in watch.records().values()),
        len(SOCKET_KINDS), CLEANUP_TIMEOUT)
    assert reached, (
        f"bpf_sk_storage_free() did not return for every closed socket within "
        f"{CLEANUP_TIMEOUT:g} s: {watch.records()}")
    assert watch.records() == {kind: (1, 0) for kind in SOCKET_KINDS}


# --- a clone that fails before it gets its own storage ----------------------------------

SO_ATTACH_FILTER = 26
BPF_RET_K = 0x06            # classic BPF: return k
ACCEPT_WHOLE_PACKET = 0xFFFFFFFF
OPTMEM_SYSCTL = "net.core.optmem_max"


def attach_accept_all_filter(sock: socket.socket) -> None:
    """SO_ATTACH_FILTER a one-insn classic filter ("ret #-1": keep every packet)."""
    insns = ctypes.create_string_buffer(struct.pack("=HBBI", BPF_RET_K, 0, 0,
                                                    ACCEPT_WHOLE_PACKET), 8)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("=H6xQ", 1, ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def drops(sock: socket.socket) -> int:
    """sk_drops of a live socket (a listener counts each child it failed to create)."""
    return sockdiag.socket_record(sock).meminfo[sockdiag.SK_MEMINFO_DROPS]


def test_failed_clone_leaves_the_listeners_storage(inet_family, storage_map, socks,
                                                   count_elements):
    """A child whose clone fails early is freed without touching its listener's storage.

    sk_clone_lock() copies the listener byte for byte, then must forget the copied
    sk_bpf_storage before any early bail-out: with the listener's socket filter
    uncharged-for (net.core.optmem_max 0 makes sk_filter_charge() fail) the clone is
    freed at once, and freeing it must not free the listener's storage. Regression:
    7cbd0c4cebe4.
    """
    listener = socks.tcp_listener(inet_family)
    attach_accept_all_filter(listener)
    filter_only = optmem(listener)
    maps.update(storage_map, listener.fileno(), value_for(11))
    counter = count_elements(storage_map)
    assert counter.count() == 1
    before = sockdiag.socket_record(listener)
    assert before.optmem - filter_only == charges.kernel_charges().first_element(VALUE_SIZE)
    drops_before = before.meminfo[sockdiag.SK_MEMINFO_DROPS]

    client = socks.plain(inet_family, socket.SOCK_STREAM)
    client.settimeout(5)
    with sysctl.temporarily(OPTMEM_SYSCTL, 0):
        # The handshake completes on the client's side; the listener's attempt to make
        # the child from the final ACK fails and counts a drop (tcp_listendrop()).
        client.connect(listener.getsockname())
        reached, _ = elements.wait_for(lambda: int(drops(listener) > drops_before), 1,
                                       CLEANUP_TIMEOUT)
        assert reached, f"the listener's drops stayed at {drops_before}: no clone failed"
        # The failed clone left nothing to accept: an empty accept queue, as the kernel
        # reports it and as a non-blocking accept() finds it.
        assert sockdiag.socket_record(listener).rqueue == 0
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            unexpected, _ = listener.accept()
            unexpected.close()

    assert maps.lookup(storage_map, listener.fileno(), VALUE_SIZE) == value_for(11)
    assert counter.count() == 1
    assert optmem(listener) == before.optmem

    # With optmem_max back, the client's next segment makes the child after all: the
    # listener, its storage and its filter are intact, and the child starts bare.
    client.sendall(b"after the failed clone")
    listener.settimeout(5)
    child, _ = listener.accept()
    with child:
        child.settimeout(5)
        assert child.recv(64) == b"after the failed clone"
        assert lookup_errno(storage_map, child) == errno.ENOENT
    assert maps.lookup(storage_map, listener.fileno(), VALUE_SIZE) == value_for(11)
    assert counter.count() == 1
