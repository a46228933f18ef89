"""BPF_MAP_CREATE for BPF_MAP_TYPE_SK_STORAGE: what is accepted, what is reported, what is refused.

The kernel's rules (kernel/bpf/bpf_local_storage.c, bpf_local_storage_map_alloc_check in 6.1;
net/core/bpf_sk_storage.c in 5.2): key_size 4, value_size > 0, max_entries 0,
BPF_F_NO_PREALLOC set and nothing but NO_PREALLOC|CLONE, BTF key and value ids; EINVAL
for any of that, then EPERM without CAP_BPF, then E2BIG above the value size limit.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
from bpfkit import btf_layout, child, maps, probes, syscall, sysctl

pytestmark = pytest.mark.map_create

SK_STORAGE = syscall.BPF_MAP_TYPE_SK_STORAGE
NO_PREALLOC = syscall.BPF_F_NO_PREALLOC

# The number of per-socket cache slots (BPF_LOCAL_STORAGE_CACHE_SIZE / SK_STORAGE_CACHE_SIZE).
STORAGE_CACHE_SIZE = 16

UNPRIVILEGED_SYSCTL = "kernel.unprivileged_bpf_disabled"


@pytest.fixture
def value_btf(closing):
    """BTF for an 8-byte value; ids and fd for hand-made BPF_MAP_CREATE attributes."""
    ids = maps.load_storage_btf(8)
    closing(ids.fd)
    return ids


def create_attempt(ids: maps.StorageBtf, *, key_size: int = 4, value_size: int = 8,
                   max_entries: int = 0, map_flags: int = NO_PREALLOC,
                   key_type_id: int | None = None) -> int:
    """BPF_MAP_CREATE of an sk storage map with one attribute possibly changed; returns the fd."""
    return maps.create_map(
        SK_STORAGE, key_size, value_size, max_entries, map_flags, btf_fd=ids.fd,
        btf_key_type_id=ids.key_type_id if key_type_id is None else key_type_id,
        btf_value_type_id=ids.value_type_id,
    )


def create_errno(ids: maps.StorageBtf, **attrs) -> int:
    """The errno BPF_MAP_CREATE fails with; a map that gets created anyway fails the test."""
    try:
        fd = create_attempt(ids, **attrs)
    except syscall.BpfError as err:
        assert err.command == "BPF_MAP_CREATE"
        return err.errno
    os.close(fd)
    pytest.fail(f"BPF_MAP_CREATE accepted {attrs}")


def test_canonical_map_reports_its_attributes(closing):
    """The canonical map exists and the kernel reports back exactly what it was created with."""
    ids = maps.load_storage_btf(24)
    closing(ids.fd)
    fd = closing(maps.create_map(
        SK_STORAGE, 4, 24, 0, NO_PREALLOC, btf_fd=ids.fd,
        btf_key_type_id=ids.key_type_id, btf_value_type_id=ids.value_type_id, name="canonical",
    ))
    info = maps.map_info(fd)
    assert info.type == SK_STORAGE == 24
    assert info.key_size == 4
    assert info.value_size == 24
    assert info.max_entries == 0
    assert info.map_flags == NO_PREALLOC
    assert info.name == "canonical"
    assert info.btf_id != 0
    assert info.btf_key_type_id == ids.key_type_id
    assert info.btf_value_type_id == ids.value_type_id
    # The id is live: the kernel lists it and hands out a new fd for it.
    assert info.id in maps.map_ids()
    second = closing(maps.map_fd_by_id(info.id))
    assert maps.map_info(second) == info


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param({"map_flags": 0}, id="without-BPF_F_NO_PREALLOC"),
        pytest.param({"map_flags": NO_PREALLOC | (1 << 30)}, id="unknown-flag-bit-30"),
        # Valid for other map types, outside the sk storage flag mask.
        pytest.param({"map_flags": NO_PREALLOC | syscall.BPF_F_RDONLY}, id="flag-BPF_F_RDONLY"),
        pytest.param({"max_entries": 1}, id="max_entries-1"),
        pytest.param({"key_size": 8}, id="key_size-8"),
        pytest.param({"key_size": 2}, id="key_size-2"),
        pytest.param({"value_size": 0}, id="value_size-0"),
    ],
)
def test_wrong_attribute_is_einval(value_btf, attrs):
    """Each wrong attribute alone makes BPF_MAP_CREATE fail with EINVAL."""
    assert create_errno(value_btf, **attrs) == errno.EINVAL


def _largest_accepted_value_size(closing) -> tuple[int, int]:
    """Bisect the largest value_size BPF_MAP_CREATE accepts; returns (size, map fd of it)."""

    def attempt(size: int) -> int | None:
        ids = maps.load_storage_btf(size)
        try:
            return create_attempt(ids, value_size=size)
        except syscall.BpfError as err:
            # Anything but E2BIG means the probe itself is wrong, not the size.
            assert err.errno == errno.E2BIG, f"value_size {size}: {err}"
            return None
        finally:
            os.close(ids.fd)

    low, high = 1, 1 << 24  # low accepted; high above any limit a kernel has had
    fd = attempt(low)
    assert fd is not None, "a 1-byte value must be accepted"
    closing(fd)
    assert attempt(high) is None, f"value_size {high} was accepted: no limit enforced"
    best_fd = fd
    while high - low > 1:
        mid = (low + high) // 2
        fd = attempt(mid)
        if fd is None:
            high = mid
        else:
            closing(fd)
            low, best_fd = mid, fd
    return low, best_fd


def test_value_size_limit_is_e2big(closing, socks):
    """The largest accepted value_size is usable; one byte more is E2BIG."""
    limit, fd = _largest_accepted_value_size(closing)
    ids = maps.load_storage_btf(limit + 1)
    closing(ids.fd)
    assert create_errno(ids, value_size=limit + 1) == errno.E2BIG
    # The limit keeps a whole element inside the u16 sizes the storage code uses.
    assert limit < 1 << 16
    # A value of the maximum size really fits on a socket: raise optmem_max so the charge
    # to the socket cannot be what fails, then read back exactly what was written.
    sock = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
    value = bytes(i % 251 for i in range(limit))
    with sysctl.temporarily("net.core.optmem_max", 1 << 20):
        maps.update(fd, sock.fileno(), value)
        assert maps.lookup(fd, sock.fileno(), limit) == value
    # And it is the documented limit, BPF_LOCAL_STORAGE_MAX_VALUE_SIZE: U16_MAX less the
    # element's own size (the kmalloc bound is far above it), from the kernel's layout.
    assert limit == documented_max_value_size(), "the value_size limit moved"


def documented_max_value_size() -> int:
    """U16_MAX - sizeof(struct bpf_local_storage_elem) (bpf_sk_storage_elem before 5.10)."""
    layout = btf_layout.kernel_layout()
    for name in ("bpf_local_storage_elem", "bpf_sk_storage_elem"):
        try:
            return 0xFFFF - layout.size_of(layout.struct_id(name))
        except LookupError:
            continue
    raise LookupError("kernel BTF has no sk storage element struct")


def _create_unprivileged(ids: maps.StorageBtf, **attrs):
    """A child-process callable: try the creation as nobody, report the errno (0 on success)."""

    def attempt() -> int:
        try:
            fd = create_attempt(ids, **attrs)
        except syscall.BpfError as err:
            return err.errno
        os.close(fd)
        return 0

    return attempt


def test_unprivileged_caller_is_eperm(value_btf):
    """Without capabilities, a map that root could create is refused with EPERM."""
    # The same attributes work for root: EPERM below is about privilege, nothing else.
    os.close(create_attempt(value_btf))
    result = child.run_in_child(_create_unprivileged(value_btf), timeout=10, unprivileged=True)
    assert result == errno.EPERM, syscall.errno_name(result)


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param({"map_flags": 0}, id="without-BPF_F_NO_PREALLOC"),
        pytest.param({"max_entries": 1}, id="max_entries-1"),
        pytest.param({"key_size": 8}, id="key_size-8"),
        pytest.param({"value_size": 0}, id="value_size-0"),
        # Refused later (BTF) as well, so only the order against EPERM shows this check.
        pytest.param({"key_type_id": 0}, id="no-btf-key-type-id"),
    ],
)
def test_unprivileged_bad_attributes_are_einval_before_eperm(value_btf, attrs):
    """With unprivileged bpf(2) allowed, attribute checks come before the capability check."""
    setting = sysctl.read(UNPRIVILEGED_SYSCTL)
    if setting == "1":
        pytest.skip(f"{probes.ENVIRONMENT} {UNPRIVILEGED_SYSCTL}=1 locks unprivileged "
                    "callers out until reboot")
    # 2 means "disabled, but root may re-enable": open it for this test only.
    with sysctl.temporarily(UNPRIVILEGED_SYSCTL, 0):
        bad = child.run_in_child(_create_unprivileged(value_btf, **attrs), 10, unprivileged=True)
        good = child.run_in_child(_create_unprivileged(value_btf), 10, unprivileged=True)
    assert sysctl.read(UNPRIVILEGED_SYSCTL) == setting
    assert bad == errno.EINVAL, syscall.errno_name(bad)
    # The same caller with correct attributes reaches the capability check.
    assert good == errno.EPERM, syscall.errno_name(good)


def test_clone_flag_is_accepted(new_storage_map):
    """BPF_F_CLONE is a valid sk storage flag and is reported back."""
    probes.require("clone_flag")
    fd = new_storage_map(8, map_flags=NO_PREALLOC | syscall.BPF_F_CLONE)
    assert maps.map_info(fd).map_flags == NO_PREALLOC | syscall.BPF_F_CLONE


def test_get_next_key_is_enotsupp(storage_map, socks):
    """Sk storage maps cannot be walked by key: BPF_MAP_GET_NEXT_KEY gives ENOTSUPP (524)."""
    sock = socks.plain(socket.AF_INET, socket.SOCK_STREAM)
    maps.update(storage_map, sock.fileno(), b"12345678")
    for key in (None, maps.sock_key(sock.fileno())):
        with pytest.raises(syscall.BpfError) as caught:
            maps.get_next_key(storage_map, key)
        assert caught.value.errno == syscall.ENOTSUPP == 524
        assert caught.value.command == "BPF_MAP_GET_NEXT_KEY"


def test_more_maps_than_cache_slots_keep_independent_values(new_storage_map, socks):
    """One socket holds values of more maps than the per-socket cache has slots, each intact."""
    count = STORAGE_CACHE_SIZE + 4
    fds = [new_storage_map(8) for _ in range(count)]
    sock = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
    expected = {fd: i.to_bytes(4, "little") * 2 for i, fd in enumerate(fds)}
    for fd, value in expected.items():
        maps.update(fd, sock.fileno(), value)
    # Read twice in different orders so a stale cache slot would show on one of them.
    for order in (fds, list(reversed(fds))):
        assert {fd: maps.lookup(fd, sock.fileno(), 8) for fd in order} == expected
    # Deleting from one map leaves every other map's value where it was.
    victim = fds[STORAGE_CACHE_SIZE]
    maps.delete(victim, sock.fileno())
    with pytest.raises(syscall.BpfError) as caught:
        maps.lookup(victim, sock.fileno(), 8)
    assert caught.value.errno == errno.ENOENT
    del expected[victim]
    assert {fd: maps.lookup(fd, sock.fileno(), 8) for fd in expected} == expected
