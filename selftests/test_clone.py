"""BPF_F_CLONE: what an accepted child copies from its listener, what it pays, how it fails.

bpf_sk_storage_clone() walks the listener's storage and copies every element of a
BPF_F_CLONE map into the child (plain maps are skipped), each copy charged to the
child as a new element, the first one with the storage header. If a copy cannot be
charged the clone fails with ENOMEM: sk_clone_lock() frees the half-made child
(bpf_sk_storage_free() takes the copies already made back out of their maps) and
the listener counts a drop, its own storage untouched.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from bpfkit import charges, elements, maps, probes, sockdiag, syscall, sysctl

pytestmark = [pytest.mark.teardown, pytest.mark.clone]

CLONE = syscall.BPF_F_NO_PREALLOC | syscall.BPF_F_CLONE
WAIT = float(os.environ.get("SK_STORAGE_CLEANUP_TIMEOUT", "30"))


@pytest.fixture(autouse=True)
def _needs_clone():
    probes.require("clone_flag")


@pytest.fixture
def layout() -> charges.StorageCharges:
    """This kernel's element overhead and header size."""
    probes.require("kernel_btf")
    return charges.kernel_charges()


def fill(size: int, seed: int) -> bytes:
    """A recognisable value."""
    return bytes((seed * 13 + i) & 0xFF for i in range(size))


def lookup_errno(map_fd: int, sock: socket.socket, size: int) -> int:
    """The errno of a lookup that must fail."""
    with pytest.raises(syscall.BpfError) as raised:
        maps.lookup(map_fd, sock.fileno(), size)
    return raised.value.errno


def drops(sock: socket.socket) -> int:
    """sk_drops of a listener: one per child it failed to create."""
    return sockdiag.socket_record(sock).meminfo[sockdiag.SK_MEMINFO_DROPS]


def settle(counters, expected: int) -> None:
    """Wait until each counted map holds `expected` elements (no-op without counters)."""
    for counter in counters or ():
        reached, last = elements.wait_for_count(counter, expected, WAIT)
        assert reached, f"{last} elements in a clone map, expected {expected} within {WAIT:g} s"


def counters_for(*map_fds: int) -> list[elements.ElementCounter] | None:
    """Element counters for the maps, None when this kernel cannot count (no fdinfo line,
    iterators refused): the test then checks everything but the counts."""
    try:
        return [elements.ElementCounter(fd) for fd in map_fds]
    except LookupError:
        return None
    except syscall.BpfError as err:
        if err.errno != errno.EPERM:  # a host that refuses iterator programs to root
            raise
        return None


def test_every_clone_map_is_copied_and_no_plain_map(inet_family, layout, new_storage_map,
                                                    socks):
    """Two clone maps and two plain maps: the child gets both clone values, exactly charged."""
    sizes = {"clone_a": 8, "plain_a": 16, "clone_b": 200, "plain_b": 8}
    fds = {name: new_storage_map(size, map_flags=CLONE if name.startswith("clone") else
                                 syscall.BPF_F_NO_PREALLOC) for name, size in sizes.items()}
    listener = socks.tcp_listener(inet_family)
    # Interleaved, so the copy loop meets plain maps between clone maps.
    for seed, name in enumerate(["clone_a", "plain_a", "clone_b", "plain_b"]):
        maps.update(fds[name], listener.fileno(), fill(sizes[name], seed))
    listener_optmem = charges.optmem(listener)

    child = socks.tcp_connection(inet_family, listener).accepted
    for seed, name in enumerate(["clone_a", "plain_a", "clone_b", "plain_b"]):
        if name.startswith("clone"):
            assert maps.lookup(fds[name], child.fileno(), sizes[name]) == \
                fill(sizes[name], seed), name
        else:
            assert lookup_errno(fds[name], child, sizes[name]) == errno.ENOENT, name
    # The child pays for its own copies: a header and two elements, to the byte.
    charged = charges.optmem(child)
    maps.delete(fds["clone_a"], child.fileno())
    maps.delete(fds["clone_b"], child.fileno())
    assert charged - charges.optmem(child) == (
        layout.first_element(sizes["clone_a"]) + layout.element(sizes["clone_b"]))
    # The listener paid nothing for its child.
    assert charges.optmem(listener) == listener_optmem
    assert maps.lookup(fds["clone_b"], listener.fileno(), sizes["clone_b"]) == fill(200, 2)


def test_cloned_spin_lock_value_copies_fields_not_lock(inet_family, new_storage_map, socks):
    """A clone map value with a bpf_spin_lock: the child's fields equal, its lock word free."""
    probes.require("spin_lock_value")
    map_fd = new_storage_map(16, spin_lock=True, map_flags=CLONE)
    listener = socks.tcp_listener(inet_family)
    value = struct.pack("=IIII", 0, 0xAAAA, 0xBBBB, 0xCCCC)
    maps.update(map_fd, listener.fileno(), value, syscall.BPF_F_LOCK)
    child = socks.tcp_connection(inet_family, listener).accepted
    assert maps.lookup(map_fd, child.fileno(), 16, syscall.BPF_F_LOCK) == value
    # The child's lock is its own: a locked update there leaves the listener alone.
    changed = struct.pack("=IIII", 0, 1, 2, 3)
    maps.update(map_fd, child.fileno(), changed, syscall.BPF_EXIST | syscall.BPF_F_LOCK)
    assert maps.lookup(map_fd, child.fileno(), 16, syscall.BPF_F_LOCK) == changed
    assert maps.lookup(map_fd, listener.fileno(), 16, syscall.BPF_F_LOCK) == value


def test_clone_that_cannot_charge_its_second_copy_frees_the_child(inet_family, layout,
                                                                  new_storage_map, socks):
    """optmem_max fits the first copy but not the second: no child, no copy left in a map.

    The first copy is linked into its map before the second fails, so freeing the
    half-made child must take it back out; the listener keeps its values and charge.
    Once the limit is back, the client's next segment makes the child after all.
    """
    first, second = new_storage_map(8, map_flags=CLONE), new_storage_map(512, map_flags=CLONE)
    listener = socks.tcp_listener(inet_family)
    maps.update(first, listener.fileno(), fill(8, 1))
    maps.update(second, listener.fileno(), fill(512, 2))
    counters = counters_for(first, second)
    before = sockdiag.socket_record(listener)
    # A child starts with no optmem. The listener's list holds its newest element first:
    # the 512-byte copy and the header fit below the limit, the 8-byte copy would reach it.
    limit = layout.first_element(8) + layout.element(512)
    client = socks.plain(inet_family, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        with sysctl.temporarily("net.core.optmem_max", limit):
            client.connect(listener.getsockname())
            drops_before = before.meminfo[sockdiag.SK_MEMINFO_DROPS]
            # Every retransmitted ACK retries (and fails) the clone: count at least one.
            reached, _ = elements.wait_for(lambda: int(drops(listener) > drops_before), 1,
                                           WAIT)
            assert reached, f"listener drops stayed at {drops_before}: no clone failed"
            # The half-made child is destroyed after an RCU grace period (and a retransmitted
            # SYN-ACK may start another attempt): wait for its copy to leave the map.
            settle(counters, 1)
        assert maps.lookup(first, listener.fileno(), 8) == fill(8, 1)
        assert maps.lookup(second, listener.fileno(), 512) == fill(512, 2)
        assert charges.optmem(listener) == before.optmem

        client.sendall(b"again")
        listener.settimeout(10)
        child, _ = listener.accept()
        with child:
            child.settimeout(5)
            assert child.recv(16) == b"again"
            assert maps.lookup(second, child.fileno(), 512) == fill(512, 2)
            settle(counters, 2)
    finally:
        for counter in counters or ():
            counter.close()
