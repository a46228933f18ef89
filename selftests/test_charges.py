"""Exact sk storage accounting in sk_omem_alloc, read back through sock_diag SKMEMINFO.

Every element charges smap->elem_size = offsetof(struct bpf_local_storage_elem,
sdata.data[value_size]) and a socket's first element also charges the storage
header, sizeof(struct bpf_local_storage) (bpf_selem_alloc, bpf_local_storage_alloc).
bpf_sk_storage_charge() admits a charge only while sk_omem_alloc + size stays
strictly below net.core.optmem_max. The constants come from the kernel's own BTF
(bpfkit.charges), so every number below is pinned to the byte.
"""

from __future__ import annotations

import errno
import socket

import pytest
from bpfkit import charges, maps, probes, syscall, sysctl

pytestmark = [pytest.mark.teardown, pytest.mark.charges]

OPTMEM_MAX = "net.core.optmem_max"


@pytest.fixture(scope="module")
def layout() -> charges.StorageCharges:
    """This kernel's element overhead and header size."""
    probes.require("kernel_btf")
    return charges.kernel_charges()


def fill(value_size: int, seed: int) -> bytes:
    """A recognisable value of value_size bytes."""
    return bytes((seed + i) & 0xFF for i in range(value_size))


def update_errno(map_fd: int, sock: socket.socket, value: bytes, flags: int) -> int:
    """The errno of an update that must fail."""
    with pytest.raises(syscall.BpfError) as raised:
        maps.update(map_fd, sock.fileno(), value, flags)
    return raised.value.errno


@pytest.mark.parametrize("value_size", [1, 8, 100, 1024])
def test_first_and_second_element_charge_exactly(value_size, layout, new_storage_map, socks):
    """The first element charges header + elem_size, a second map's element elem_size only."""
    first, second = new_storage_map(value_size), new_storage_map(value_size + 8)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = charges.optmem(sock)

    maps.update(first, sock.fileno(), fill(value_size, 1))
    assert charges.optmem(sock) - baseline == layout.first_element(value_size)
    maps.update(second, sock.fileno(), fill(value_size + 8, 2))
    assert charges.optmem(sock) - baseline == (
        layout.first_element(value_size) + layout.element(value_size + 8))

    # Deleting the first element leaves the header with the second one...
    maps.delete(first, sock.fileno())
    assert charges.optmem(sock) - baseline == layout.first_element(value_size + 8)
    # ...and the last one takes the header with it.
    maps.delete(second, sock.fileno())
    assert charges.optmem(sock) == baseline


def test_replacing_a_value_keeps_the_charge(layout, new_storage_map, socks):
    """Updating an existing value (ANY, EXIST) swaps elements and uncharges the old one."""
    map_fd = new_storage_map(64)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = charges.optmem(sock)
    maps.update(map_fd, sock.fileno(), fill(64, 1))
    for round_, flags in enumerate([syscall.BPF_ANY, syscall.BPF_EXIST] * 3):
        maps.update(map_fd, sock.fileno(), fill(64, 10 + round_), flags)
        assert maps.lookup(map_fd, sock.fileno(), 64) == fill(64, 10 + round_)
        assert charges.optmem(sock) - baseline == layout.first_element(64), round_


def test_refused_updates_give_back_every_byte(layout, new_storage_map, socks):
    """EEXIST and ENOENT found after the element was allocated leave the charge unchanged."""
    held, other = new_storage_map(32), new_storage_map(32)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = charges.optmem(sock)
    maps.update(held, sock.fileno(), fill(32, 1))
    charged = baseline + layout.first_element(32)
    assert charges.optmem(sock) == charged

    # The socket has storage, so both refusals come from the locked re-check in
    # bpf_local_storage_update(), after a new element was allocated and charged.
    assert update_errno(held, sock, fill(32, 2), syscall.BPF_NOEXIST) == errno.EEXIST
    assert charges.optmem(sock) == charged
    assert update_errno(other, sock, fill(32, 3), syscall.BPF_EXIST) == errno.ENOENT
    assert charges.optmem(sock) == charged
    assert maps.lookup(held, sock.fileno(), 32) == fill(32, 1)


@pytest.mark.parametrize("spare", [0, 1])
def test_first_element_admitted_only_below_optmem_max(spare, layout, new_storage_map, socks):
    """sk_omem_alloc + charge must stay below optmem_max: at the limit ENOMEM, one byte more fits."""
    map_fd = new_storage_map(16)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = charges.optmem(sock)
    needed = baseline + layout.first_element(16)
    with sysctl.temporarily(OPTMEM_MAX, needed + spare):
        if spare:
            maps.update(map_fd, sock.fileno(), fill(16, 1))
            assert charges.optmem(sock) == needed
        else:
            assert update_errno(map_fd, sock, fill(16, 1), syscall.BPF_ANY) == errno.ENOMEM
            # The element was charged before the header failed: both are given back.
            assert charges.optmem(sock) == baseline
            with pytest.raises(syscall.BpfError) as raised:
                maps.lookup(map_fd, sock.fileno(), 16)
            assert raised.value.errno == errno.ENOENT


@pytest.mark.parametrize("spare", [0, 1])
def test_second_element_admitted_only_below_optmem_max(spare, layout, new_storage_map, socks):
    """On a socket with storage, an element fits only if the total stays below optmem_max."""
    first, second = new_storage_map(8), new_storage_map(40)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    maps.update(first, sock.fileno(), fill(8, 1))
    charged = charges.optmem(sock)
    with sysctl.temporarily(OPTMEM_MAX, charged + layout.element(40) + spare):
        if spare:
            maps.update(second, sock.fileno(), fill(40, 2))
            assert charges.optmem(sock) == charged + layout.element(40)
        else:
            assert update_errno(second, sock, fill(40, 2), syscall.BPF_ANY) == errno.ENOMEM
            assert charges.optmem(sock) == charged
    assert maps.lookup(first, sock.fileno(), 8) == fill(8, 1)


def test_locked_update_in_place_charges_nothing(layout, new_storage_map, socks):
    """BPF_F_LOCK on an existing value copies in place: no new element, no new charge."""
    probes.require("spin_lock_value")
    map_fd = new_storage_map(16, spin_lock=True)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = charges.optmem(sock)
    maps.update(map_fd, sock.fileno(), bytes(16), syscall.BPF_F_LOCK)
    assert charges.optmem(sock) - baseline == layout.first_element(16)
    # With optmem_max at the current charge no new element could be allocated, so only
    # the in-place copy can succeed.
    with sysctl.temporarily(OPTMEM_MAX, charges.optmem(sock)):
        maps.update(map_fd, sock.fileno(), bytes(4) + fill(12, 7), syscall.BPF_F_LOCK)
    assert maps.lookup(map_fd, sock.fileno(), 16, syscall.BPF_F_LOCK) == bytes(4) + fill(12, 7)
    assert charges.optmem(sock) - baseline == layout.first_element(16)


def test_locked_exist_update_checks_its_flags_before_charging(layout, new_storage_map, socks):
    """BPF_EXIST|BPF_F_LOCK of a missing value is ENOENT even when no element could be
    charged: its flags are checked before anything is allocated. BPF_ANY|BPF_F_LOCK, which
    must allocate, is ENOMEM at the same limit."""
    probes.require("spin_lock_value")
    other, map_fd = new_storage_map(8), new_storage_map(16, spin_lock=True)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    maps.update(other, sock.fileno(), fill(8, 1))
    charged = charges.optmem(sock)
    with sysctl.temporarily(OPTMEM_MAX, charged):
        assert update_errno(map_fd, sock, bytes(16),
                            syscall.BPF_ANY | syscall.BPF_F_LOCK) == errno.ENOMEM
        assert update_errno(map_fd, sock, bytes(16),
                            syscall.BPF_EXIST | syscall.BPF_F_LOCK) == errno.ENOENT
    assert charges.optmem(sock) == charged


def test_storage_is_recreated_after_the_last_delete(layout, new_storage_map, socks):
    """Deleting a socket's last value frees its storage; the next value builds a new one.

    The socket's storage pointer must be reset when the last element goes, or the next
    creation finds it set and loses the publish race it can never win (EAGAIN).
    """
    map_fd = new_storage_map(24)
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = charges.optmem(sock)
    for round_ in range(3):
        maps.update(map_fd, sock.fileno(), fill(24, round_))
        assert charges.optmem(sock) - baseline == layout.first_element(24), round_
        maps.delete(map_fd, sock.fileno())
        assert charges.optmem(sock) == baseline, round_
