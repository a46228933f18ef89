"""The user-space element API of sk storage maps, keyed by socket fd, on every socket kind.

bpf_fd_sk_storage_{lookup,update,delete}_elem turn the key into a socket with
sockfd_lookup(): a bad fd is EBADF, a non-socket is ENOTSOCK. The storage itself follows
the usual map rules: NOEXIST on an existing element is EEXIST, EXIST on a missing one is
ENOENT, and a missing element is ENOENT for lookup and delete. The storage hangs off
`struct sock`, so AF_UNIX sockets take storage through this API exactly like inet ones.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
from bpfkit import maps, probes, syscall

pytestmark = pytest.mark.fd_ops

VALUE_SIZE = 8
OLD = b"old-valu"
NEW = b"new-valu"

SOCKET_KINDS = {
    "tcp-ipv4": (socket.AF_INET, socket.SOCK_STREAM),
    "tcp-ipv6": (socket.AF_INET6, socket.SOCK_STREAM),
    "udp-ipv4": (socket.AF_INET, socket.SOCK_DGRAM),
    "udp-ipv6": (socket.AF_INET6, socket.SOCK_DGRAM),
    "unix-stream": (socket.AF_UNIX, socket.SOCK_STREAM),
    "unix-dgram": (socket.AF_UNIX, socket.SOCK_DGRAM),
}


@pytest.fixture(params=list(SOCKET_KINDS), ids=list(SOCKET_KINDS))
def sock(request, socks) -> socket.socket:
    """A fresh socket of each kind in turn."""
    family, sock_type = SOCKET_KINDS[request.param]
    if family == socket.AF_INET6:
        probes.require_ipv6()
    return socks.plain(family, sock_type)


def failure(call, *args) -> syscall.BpfError:
    """The BpfError a call must raise (the test fails if it succeeds)."""
    with pytest.raises(syscall.BpfError) as caught:
        call(*args)
    return caught.value


def stored(map_fd: int, sock: socket.socket) -> bytes | None:
    """The socket's value, or None when the kernel says ENOENT."""
    return maps.lookup_or_none(map_fd, sock.fileno(), VALUE_SIZE)


def test_update_lookup_delete_round_trip(storage_map, sock):
    """The control: ANY creates, EXIST replaces, lookup reads back, delete removes."""
    maps.update(storage_map, sock.fileno(), OLD, syscall.BPF_ANY)
    assert stored(storage_map, sock) == OLD
    maps.update(storage_map, sock.fileno(), NEW, syscall.BPF_EXIST)
    assert stored(storage_map, sock) == NEW
    maps.delete(storage_map, sock.fileno())
    assert stored(storage_map, sock) is None


def test_noexist_on_existing_is_eexist_and_keeps_value(storage_map, sock):
    """BPF_NOEXIST on a socket that has storage fails with EEXIST and changes nothing."""
    maps.update(storage_map, sock.fileno(), OLD, syscall.BPF_NOEXIST)
    err = failure(maps.update, storage_map, sock.fileno(), NEW, syscall.BPF_NOEXIST)
    assert (err.command, err.errno) == ("BPF_MAP_UPDATE_ELEM", errno.EEXIST)
    assert stored(storage_map, sock) == OLD


def test_exist_on_missing_is_enoent_and_creates_nothing(storage_map, sock):
    """BPF_EXIST on a socket without storage fails with ENOENT and creates nothing."""
    err = failure(maps.update, storage_map, sock.fileno(), NEW, syscall.BPF_EXIST)
    assert (err.command, err.errno) == ("BPF_MAP_UPDATE_ELEM", errno.ENOENT)
    assert stored(storage_map, sock) is None


def test_lookup_without_storage_is_enoent(storage_map, sock):
    """Lookup on a socket that never had storage in this map is ENOENT."""
    err = failure(maps.lookup, storage_map, sock.fileno(), VALUE_SIZE)
    assert (err.command, err.errno) == ("BPF_MAP_LOOKUP_ELEM", errno.ENOENT)


def test_delete_without_storage_is_enoent(storage_map, sock):
    """Delete on a socket without storage is ENOENT, and so is a second delete."""
    err = failure(maps.delete, storage_map, sock.fileno())
    assert (err.command, err.errno) == ("BPF_MAP_DELETE_ELEM", errno.ENOENT)
    maps.update(storage_map, sock.fileno(), OLD)
    maps.delete(storage_map, sock.fileno())
    err = failure(maps.delete, storage_map, sock.fileno())
    assert err.errno == errno.ENOENT


def test_storage_of_one_map_is_invisible_to_another(new_storage_map, sock):
    """Two maps are two storage types: a value in one is ENOENT in the other."""
    first, second = new_storage_map(VALUE_SIZE), new_storage_map(VALUE_SIZE)
    maps.update(first, sock.fileno(), OLD)
    assert stored(second, sock) is None
    assert stored(first, sock) == OLD


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(syscall.BPF_NOEXIST | syscall.BPF_EXIST, id="NOEXIST|EXIST"),
        pytest.param(1 << 10, id="bit-10"),
        pytest.param(1 << 40, id="bit-40"),
    ],
)
def test_update_with_unknown_flags_is_einval(storage_map, sock, flags):
    """Update flags outside ANY/NOEXIST/EXIST(|F_LOCK) are EINVAL and leave the value alone."""
    maps.update(storage_map, sock.fileno(), OLD)
    err = failure(maps.update, storage_map, sock.fileno(), NEW, flags)
    assert err.errno == errno.EINVAL
    assert stored(storage_map, sock) == OLD


@pytest.mark.parametrize("flags", [1 << 10, 1 << 40], ids=["bit-10", "bit-40"])
def test_lookup_with_unknown_flags_is_einval(storage_map, sock, flags):
    """Lookup flags other than BPF_F_LOCK are EINVAL even when the value exists."""
    maps.update(storage_map, sock.fileno(), OLD)
    err = failure(maps.lookup, storage_map, sock.fileno(), VALUE_SIZE, flags)
    assert (err.command, err.errno) == ("BPF_MAP_LOOKUP_ELEM", errno.EINVAL)


def test_delete_with_flags_is_einval(storage_map, sock):
    """BPF_MAP_DELETE_ELEM has no flags: a non-zero flags field is EINVAL, nothing deleted."""
    maps.update(storage_map, sock.fileno(), OLD)
    err = failure(maps.delete_elem, storage_map, maps.sock_key(sock.fileno()), 1)
    assert (err.command, err.errno) == ("BPF_MAP_DELETE_ELEM", errno.EINVAL)
    assert stored(storage_map, sock) == OLD


@pytest.fixture
def closed_fd() -> int:
    """An fd number that is not open in this process."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


@pytest.fixture(params=["pipe", "regular-file", "bpf-map"])
def non_socket_fd(request, closing, new_storage_map) -> int:
    """An open fd that is not a socket: a pipe, a file, another BPF map."""
    if request.param == "pipe":
        read_end, write_end = os.pipe()
        closing(write_end)
        return closing(read_end)
    if request.param == "regular-file":
        return closing(os.open("/proc/self/status", os.O_RDONLY))
    return new_storage_map(VALUE_SIZE)


def _all_ops(map_fd: int, key_fd: int):
    return [
        ("BPF_MAP_LOOKUP_ELEM", lambda: maps.lookup(map_fd, key_fd, VALUE_SIZE)),
        ("BPF_MAP_UPDATE_ELEM", lambda: maps.update(map_fd, key_fd, NEW)),
        ("BPF_MAP_DELETE_ELEM", lambda: maps.delete(map_fd, key_fd)),
    ]


def test_invalid_fd_is_ebadf(storage_map, closed_fd):
    """A key that is no open fd is EBADF for lookup, update and delete."""
    for command, op in _all_ops(storage_map, closed_fd):
        err = failure(op)
        assert (err.command, err.errno) == (command, errno.EBADF)
    err = failure(lambda: maps.lookup(storage_map, -1, VALUE_SIZE))
    assert err.errno == errno.EBADF


def test_non_socket_fd_is_enotsock(storage_map, non_socket_fd):
    """A key that is an open fd but no socket is ENOTSOCK for lookup, update and delete."""
    for command, op in _all_ops(storage_map, non_socket_fd):
        err = failure(op)
        assert (err.command, err.errno) == (command, errno.ENOTSOCK)


def test_values_follow_the_socket_not_the_fd_number(storage_map, socks):
    """A dup()ed fd reaches the same storage; a new socket on a reused number has none."""
    sock = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
    maps.update(storage_map, sock.fileno(), OLD)
    dup_fd = os.dup(sock.fileno())
    try:
        assert maps.lookup(storage_map, dup_fd, VALUE_SIZE) == OLD
    finally:
        os.close(dup_fd)
    number = sock.fileno()
    sock.close()
    fresh = socks.plain(socket.AF_INET, socket.SOCK_DGRAM)
    assert fresh.fileno() == number, "the kernel did not reuse the lowest free fd"
    assert stored(storage_map, fresh) is None
