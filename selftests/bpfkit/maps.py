"""BPF maps from user space, centred on sk storage: create, element ops keyed by socket fd, info.

For BPF_MAP_TYPE_SK_STORAGE the syscall key is a socket fd (an int, key_size 4); the map
itself is only the "type" of the storage, the data hangs off each socket.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from . import btf, syscall

KEY_SIZE = 4


@dataclass(frozen=True)
class StorageBtf:
    """A loaded BTF object holding an `int` key and a value struct for an sk storage map."""

    fd: int
    key_type_id: int
    value_type_id: int


def storage_btf_blob(value_size: int, spin_lock: bool = False) -> tuple[bytes, int, int]:
    """BTF for key `int` and `struct value { [struct bpf_spin_lock lock;] u8 data[]; }`.

    Returns (blob, key type id, value type id); value type size is exactly value_size.
    """
    builder = btf.BtfBuilder()
    key_id = builder.add_int("int", 4, signed=True)
    u8 = builder.add_int("unsigned char", 1)
    members = []
    data_offset = 0
    if spin_lock:
        members.append(btf.Member("lock", builder.add_spin_lock(), 0))
        data_offset = 4
    data_len = value_size - data_offset
    if data_len > 0:
        array = builder.add_array(u8, key_id, data_len)
        members.append(btf.Member("data", array, data_offset * 8))
    value_id = builder.add_struct("value", value_size, members)
    return builder.encode(), key_id, value_id


def load_storage_btf(value_size: int, spin_lock: bool = False) -> StorageBtf:
    """Load the BTF of storage_btf_blob(); the caller closes .fd."""
    blob, key_id, value_id = storage_btf_blob(value_size, spin_lock)
    return StorageBtf(btf.load_btf(blob), key_id, value_id)


def create_map(
    map_type: int, key_size: int, value_size: int, max_entries: int, map_flags: int = 0, *,
    btf_fd: int = 0, btf_key_type_id: int = 0, btf_value_type_id: int = 0, name: str = "",
) -> int:
    """BPF_MAP_CREATE with exactly these attributes; returns the map fd."""
    attr = syscall.MapCreateAttr(
        map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
        map_flags=map_flags, map_name=name.encode()[: syscall.BPF_OBJ_NAME_LEN - 1],
        btf_fd=btf_fd, btf_key_type_id=btf_key_type_id, btf_value_type_id=btf_value_type_id,
    )
    return syscall.bpf(syscall.BPF_MAP_CREATE, attr)


def create_sk_storage_map(
    value_size: int = 8, *, spin_lock: bool = False,
    map_flags: int = syscall.BPF_F_NO_PREALLOC, name: str = "",
) -> int:
    """The canonical sk storage map with its own BTF; returns the map fd (the map pins the BTF)."""
    ids = load_storage_btf(value_size, spin_lock)
    try:
        return create_map(
            syscall.BPF_MAP_TYPE_SK_STORAGE, KEY_SIZE, value_size, 0, map_flags,
            btf_fd=ids.fd, btf_key_type_id=ids.key_type_id, btf_value_type_id=ids.value_type_id,
            name=name,
        )
    finally:
        os.close(ids.fd)


def _elem_attr(map_fd: int, key: ctypes.Array, value: ctypes.Array | None, flags: int):
    return syscall.MapElemAttr(
        map_fd=map_fd, key=ctypes.addressof(key),
        value=syscall.buffer_address(value), flags=flags,
    )


def lookup_elem(map_fd: int, key: bytes, value_size: int, flags: int = 0) -> bytes:
    """BPF_MAP_LOOKUP_ELEM: the value stored under key."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value_size)
    syscall.bpf(syscall.BPF_MAP_LOOKUP_ELEM, _elem_attr(map_fd, key_buf, value_buf, flags))
    return value_buf.raw


def update_elem(map_fd: int, key: bytes, value: bytes, flags: int = syscall.BPF_ANY) -> None:
    """BPF_MAP_UPDATE_ELEM with flags (BPF_ANY/NOEXIST/EXIST, optionally | BPF_F_LOCK)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    syscall.bpf(syscall.BPF_MAP_UPDATE_ELEM, _elem_attr(map_fd, key_buf, value_buf, flags))


def delete_elem(map_fd: int, key: bytes, flags: int = 0) -> None:
    """BPF_MAP_DELETE_ELEM (flags must be 0 for every map type today)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    syscall.bpf(syscall.BPF_MAP_DELETE_ELEM, _elem_attr(map_fd, key_buf, None, flags))


def get_next_key(map_fd: int, key: bytes | None, key_size: int = KEY_SIZE) -> bytes:
    """BPF_MAP_GET_NEXT_KEY after key (None asks for the first key)."""
    next_buf = ctypes.create_string_buffer(key_size)
    key_buf = None if key is None else ctypes.create_string_buffer(key, len(key))
    attr = syscall.MapElemAttr(
        map_fd=map_fd, key=syscall.buffer_address(key_buf), value=ctypes.addressof(next_buf)
    )
    syscall.bpf(syscall.BPF_MAP_GET_NEXT_KEY, attr)
    return next_buf.raw


def sock_key(sock_fd: int) -> bytes:
    """The syscall key of an sk storage map: the socket's fd as a native int."""
    return struct.pack("=i", sock_fd)


def lookup(map_fd: int, sock_fd: int, value_size: int, flags: int = 0) -> bytes:
    """The storage value of the socket behind sock_fd."""
    return lookup_elem(map_fd, sock_key(sock_fd), value_size, flags)


def lookup_or_none(map_fd: int, sock_fd: int, value_size: int) -> bytes | None:
    """The socket's storage value, or None when the kernel says it has none (ENOENT)."""
    try:
        return lookup(map_fd, sock_fd, value_size)
    except syscall.BpfError as err:
        if err.errno == errno.ENOENT:
            return None
        raise


def update(map_fd: int, sock_fd: int, value: bytes, flags: int = syscall.BPF_ANY) -> None:
    """Create or replace the storage of the socket behind sock_fd."""
    update_elem(map_fd, sock_key(sock_fd), value, flags)


def delete(map_fd: int, sock_fd: int) -> None:
    """Remove the storage of the socket behind sock_fd."""
    delete_elem(map_fd, sock_key(sock_fd))


@dataclass(frozen=True)
class MapInfo:
    """What BPF_OBJ_GET_INFO_BY_FD reports about a map."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str
    btf_id: int
    btf_key_type_id: int
    btf_value_type_id: int


def map_info(map_fd: int) -> MapInfo:
    """The kernel's own record of the map behind map_fd."""
    raw = syscall.obj_info(map_fd, syscall.MapInfoStruct())
    return MapInfo(
        type=raw.type, id=raw.id, key_size=raw.key_size, value_size=raw.value_size,
        max_entries=raw.max_entries, map_flags=raw.map_flags,
        name=raw.name.decode(errors="replace"), btf_id=raw.btf_id,
        btf_key_type_id=raw.btf_key_type_id, btf_value_type_id=raw.btf_value_type_id,
    )


def map_ids() -> list[int]:
    """Ids of every map alive in the kernel, via BPF_MAP_GET_NEXT_ID."""
    ids: list[int] = []
    current = 0
    while True:
        nxt = syscall.next_id(syscall.BPF_MAP_GET_NEXT_ID, current)
        if nxt is None:
            return ids
        ids.append(nxt)
        current = nxt


def map_fd_by_id(map_id: int) -> int:
    """A new fd for the map with this id (BPF_MAP_GET_FD_BY_ID); ENOENT once it is gone."""
    return syscall.bpf(syscall.BPF_MAP_GET_FD_BY_ID, syscall.GetIdAttr(start_id=map_id))
