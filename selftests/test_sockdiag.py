"""sock_diag storage requests (INET_DIAG_REQ_SK_BPF_STORAGES): errors, references, dump shapes.

bpf_sk_storage_diag_alloc() turns the request's nest of SK_DIAG_BPF_STORAGE_REQ_MAP_FD
attributes into map references: EPERM without CAP_BPF, EINVAL for a map-fd attribute
that is not 4 bytes or names a map of another type, EBADF for a bad fd, EEXIST for
the same map twice; other attribute types are skipped; an empty nest asks for every
storage of each socket. The references are dropped when the dump ends, or at once
when the request fails. Replies are read on TCP sockets (see bpfkit.sockdiag).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest
from bpfkit import child, maps, probes, sockdiag, syscall, sysctl

pytestmark = [pytest.mark.fd_ops, pytest.mark.sock_diag]

# A freed map leaves the id table in deferred work; under TCG that can take a while.
FREE_TIMEOUT = float(os.environ.get("SK_STORAGE_CLEANUP_TIMEOUT", "30"))
MAP_FD = sockdiag.SK_DIAG_BPF_STORAGE_REQ_MAP_FD


@pytest.fixture(autouse=True)
def _needs_diag_storages():
    probes.require("diag_storages")


def fd_attr(fd: int) -> bytes:
    """One SK_DIAG_BPF_STORAGE_REQ_MAP_FD attribute."""
    return sockdiag.pack_attribute(MAP_FD, struct.pack("=I", fd))


def request_errno(sock: socket.socket, nest: bytes) -> int:
    """The errno of a storage request that must be refused (a reply fails the test)."""
    with pytest.raises(OSError) as raised:
        sockdiag.socket_record(sock, meminfo=False, storages_nest=nest)
    return raised.value.errno


def wait_map_gone(map_id: int) -> None:
    """Wait until no map has map_id any more: its last reference was dropped."""
    deadline = time.monotonic() + FREE_TIMEOUT
    while map_id in maps.map_ids():
        if time.monotonic() > deadline:
            pytest.fail(f"map {map_id} still exists {FREE_TIMEOUT:g} s after its last fd "
                        "closed: something still holds a reference")
        time.sleep(0.05)


@pytest.fixture
def listener(socks) -> socket.socket:
    """A TCP listener: a socket whose record carries storages on every kernel."""
    return socks.tcp_listener(socket.AF_INET)


def test_unprivileged_storage_request_is_eperm(storage_map, listener):
    """A caller without CAP_BPF naming a valid map fd is refused with EPERM."""
    maps.update(storage_map, listener.fileno(), b"secret!!")
    # The control: root reads the value.
    assert sockdiag.socket_record(listener, map_fds=[storage_map]).storages == {
        maps.map_info(storage_map).id: b"secret!!"}

    def as_nobody() -> int | str:
        try:
            sockdiag.socket_record(listener, map_fds=[storage_map])
        except OSError as err:
            return err.errno
        return "the request was answered"

    assert child.run_in_child(as_nobody, timeout=30, unprivileged=True) == errno.EPERM


@pytest.mark.parametrize("length", [8, 2, 0])
def test_map_fd_attribute_of_wrong_length_is_einval(length, storage_map, listener):
    """A map-fd attribute whose payload is not exactly 4 bytes is EINVAL.

    Only the length differs from an answered request: the 8-byte payload starts with
    the same valid map fd (zeros after it), so a kernel that read the first 4 bytes of
    a longer attribute would answer it instead of refusing it.
    """
    maps.update(storage_map, listener.fileno(), b"12345678")
    fd_bytes = struct.pack("=I", storage_map)
    answered = sockdiag.socket_record(listener, meminfo=False, storages_nest=fd_attr(storage_map))
    assert answered.storages == {maps.map_info(storage_map).id: b"12345678"}
    payload = (fd_bytes + b"\0" * 4)[:length]
    assert request_errno(listener, sockdiag.pack_attribute(MAP_FD, payload)) == errno.EINVAL


def unused_fd() -> int:
    """An fd number far above any the test opens (a just-closed one would be reused by the
    netlink socket of the request itself)."""
    fd = 4000
    while True:
        try:
            os.fstat(fd)
        except OSError:
            return fd
        fd += 1


def test_bad_map_fd_is_ebadf(storage_map, listener):
    """A map-fd attribute naming no open fd is EBADF."""
    assert request_errno(listener, fd_attr(unused_fd())) == errno.EBADF


def test_map_of_another_type_is_einval(closing, listener):
    """A map-fd attribute naming an array map is EINVAL."""
    array = closing(maps.create_map(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 1))
    assert request_errno(listener, fd_attr(array)) == errno.EINVAL


def test_same_map_twice_is_eexist(storage_map, listener):
    """The same map named twice, even through a second fd, is EEXIST."""
    dup = os.dup(storage_map)
    try:
        assert request_errno(listener, fd_attr(storage_map) + fd_attr(dup)) == errno.EEXIST
    finally:
        os.close(dup)


def test_other_attribute_types_in_the_nest_are_ignored(storage_map, listener):
    """Attributes of other types between map fds are skipped, whatever their length."""
    maps.update(storage_map, listener.fileno(), b"ignored!")
    nest = (sockdiag.pack_attribute(MAP_FD + 1, b"\xff" * 9) + fd_attr(storage_map)
            + sockdiag.pack_attribute(MAP_FD + 7, b""))
    record = sockdiag.socket_record(listener, meminfo=False, storages_nest=nest)
    assert record.storages == {maps.map_info(storage_map).id: b"ignored!"}


@pytest.mark.parametrize("outcome", ["answered", "refused-later-fd", "refused-wrong-type"])
def test_request_releases_its_map_references(outcome, new_storage_map, listener, closing):
    """Maps named by a request, answered or refused, are freed once their own fds close."""
    doomed = maps.create_sk_storage_map(8)
    doomed_id = maps.map_info(doomed).id
    try:
        maps.update(doomed, listener.fileno(), b"refcount")
        if outcome == "answered":
            record = sockdiag.socket_record(listener, map_fds=[doomed])
            assert record.storages == {doomed_id: b"refcount"}
        elif outcome == "refused-later-fd":
            assert request_errno(listener, fd_attr(doomed) + fd_attr(unused_fd())) == \
                errno.EBADF
        else:
            other = maps.create_map(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 1)
            other_id = maps.map_info(other).id
            try:
                assert request_errno(listener, fd_attr(doomed) + fd_attr(other)) == errno.EINVAL
            finally:
                os.close(other)
            wait_map_gone(other_id)
    finally:
        os.close(doomed)
    wait_map_gone(doomed_id)


def test_empty_nest_dumps_every_storage_of_the_socket(new_storage_map, listener, socks):
    """An empty request nest (ss --bpf-maps) returns each socket's values in every map."""
    first, second, unused = new_storage_map(8), new_storage_map(24), new_storage_map(8)
    maps.update(first, listener.fileno(), b"first...")
    maps.update(second, listener.fileno(), bytes(range(24)))
    bare = socks.tcp_listener(socket.AF_INET)

    record = sockdiag.socket_record(listener, meminfo=False, storages_nest=b"")
    assert record.storages == {maps.map_info(first).id: b"first...",
                               maps.map_info(second).id: bytes(range(24))}
    assert maps.map_info(unused).id not in record.storages
    # A socket without storage gets no storage attribute at all, not an empty one.
    bare_record = sockdiag.socket_record(bare, meminfo=False, storages_nest=b"")
    assert sockdiag.INET_DIAG_SK_BPF_STORAGES not in bare_record.attributes


def test_no_storage_in_the_named_maps_means_no_storage_attribute(new_storage_map, listener):
    """A socket with storage only in maps the request does not name carries no nest."""
    held, asked = new_storage_map(8), new_storage_map(8)
    maps.update(held, listener.fileno(), b"not this")
    record = sockdiag.socket_record(listener, meminfo=False, map_fds=[asked])
    assert sockdiag.INET_DIAG_SK_BPF_STORAGES not in record.attributes
    # The control: naming the map that holds the value brings the nest.
    record = sockdiag.socket_record(listener, meminfo=False, map_fds=[asked, held])
    assert record.storages == {maps.map_info(held).id: b"not this"}


@pytest.mark.parametrize("request_kind", ["named", "all"])
def test_values_larger_than_a_page_come_back_whole(request_kind, new_storage_map, listener,
                                                   socks):
    """Three 12 KiB values outgrow the default dump buffer; the kernel grows it and sends all.

    A second socket with storage follows in the same dump, so the retry is also seen
    after a record that already filled part of a message.
    """
    size = 12 * 1024
    fds = [new_storage_map(size) for _ in range(3)]
    other = socks.tcp_listener(socket.AF_INET)
    values = {}
    with sysctl.at_least("net.core.optmem_max", 1 << 17):
        for index, map_fd in enumerate(fds):
            value = bytes((index * 7 + i) & 0xFF for i in range(size))
            maps.update(map_fd, listener.fileno(), value)
            maps.update(map_fd, other.fileno(), value[::-1])
            values[maps.map_info(map_fd).id] = value
    kwargs = {"map_fds": fds} if request_kind == "named" else {"storages_nest": b""}
    records = {r.sport: r for r in sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP,
                                                 states=1 << 10, **kwargs)}  # TCP_LISTEN
    assert records[listener.getsockname()[1]].storages == values
    assert records[other.getsockname()[1]].storages == {
        map_id: value[::-1] for map_id, value in values.items()}
