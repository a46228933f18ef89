"""BTF: build raw type blobs (also deliberately wrong ones), load them, read the kernel's own.

Layout (include/uapi/linux/btf.h): a 24-byte header, then the type section (each type a
12-byte `struct btf_type` followed by kind-specific data), then the string section, which
starts with the empty string. Type ids count from 1 in the order types are added; 0 is void.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from . import syscall

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
BTF_HEADER_LEN = 24

BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_FWD = 7
BTF_KIND_TYPEDEF = 8
BTF_KIND_VOLATILE = 9
BTF_KIND_CONST = 10
BTF_KIND_RESTRICT = 11
BTF_KIND_FUNC = 12
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_FLOAT = 16
BTF_KIND_DECL_TAG = 17
BTF_KIND_TYPE_TAG = 18
BTF_KIND_ENUM64 = 19

# Bits of the INT encoding word.
BTF_INT_SIGNED = 1 << 0
BTF_INT_CHAR = 1 << 1
BTF_INT_BOOL = 1 << 2

# FUNC linkage (stored in vlen).
BTF_FUNC_STATIC = 0
BTF_FUNC_GLOBAL = 1

# Size of the kind-specific data after the 12-byte btf_type: (fixed, per vlen entry).
_KIND_TAIL = {
    BTF_KIND_INT: (4, 0),
    BTF_KIND_PTR: (0, 0),
    BTF_KIND_ARRAY: (12, 0),
    BTF_KIND_STRUCT: (0, 12),
    BTF_KIND_UNION: (0, 12),
    BTF_KIND_ENUM: (0, 8),
    BTF_KIND_FWD: (0, 0),
    BTF_KIND_TYPEDEF: (0, 0),
    BTF_KIND_VOLATILE: (0, 0),
    BTF_KIND_CONST: (0, 0),
    BTF_KIND_RESTRICT: (0, 0),
    BTF_KIND_FUNC: (0, 0),
    BTF_KIND_FUNC_PROTO: (0, 8),
    BTF_KIND_VAR: (4, 0),
    BTF_KIND_DATASEC: (0, 12),
    BTF_KIND_FLOAT: (0, 0),
    BTF_KIND_DECL_TAG: (4, 0),
    BTF_KIND_TYPE_TAG: (0, 0),
    BTF_KIND_ENUM64: (0, 12),
}

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"


def type_info(kind: int, vlen: int = 0, kind_flag: bool = False) -> int:
    """The btf_type.info word: vlen in bits 0-15, kind in bits 24-28, kind_flag in bit 31."""
    return (int(kind_flag) << 31) | (kind << 24) | vlen


def int_encoding(nr_bits: int, bit_offset: int = 0, encoding: int = 0) -> int:
    """The u32 after an INT type: encoding bits 24-27, offset bits 16-23, nr_bits bits 0-7."""
    return (encoding << 24) | (bit_offset << 16) | nr_bits


@dataclass(frozen=True)
class Member:
    """A struct/union member; bitfield_size > 0 makes it a bitfield (kind_flag encoding)."""

    name: str
    type_id: int
    bit_offset: int = 0
    bitfield_size: int = 0


class BtfBuilder:
    """Accumulates types and strings; each add_* returns the new type's id."""

    def __init__(self) -> None:
        self._types: list[bytes] = []
        self._strings = bytearray(b"\0")
        self._string_offsets: dict[str, int] = {"": 0}

    def string(self, text: str) -> int:
        """Offset of text in the string section, adding it once."""
        if text not in self._string_offsets:
            self._string_offsets[text] = len(self._strings)
            self._strings += text.encode() + b"\0"
        return self._string_offsets[text]

    def add_raw(self, name: str, info: int, size_or_type: int, tail: bytes = b"") -> int:
        """Append any btf_type verbatim, e.g. a deliberately malformed one for negative tests."""
        self._types.append(struct.pack("<III", self.string(name), info, size_or_type) + tail)
        return len(self._types)

    def add_int(
        self, name: str, size: int, *, bits: int | None = None, bit_offset: int = 0,
        signed: bool = False, encoding: int | None = None,
    ) -> int:
        """An INT of `size` bytes, by default using all its bits."""
        enc = encoding if encoding is not None else (BTF_INT_SIGNED if signed else 0)
        nr_bits = size * 8 if bits is None else bits
        tail = struct.pack("<I", int_encoding(nr_bits, bit_offset, enc))
        return self.add_raw(name, type_info(BTF_KIND_INT), size, tail)

    def add_ptr(self, type_id: int) -> int:
        """A pointer to type_id (pointers are anonymous)."""
        return self.add_raw("", type_info(BTF_KIND_PTR), type_id)

    def add_array(self, elem_type: int, index_type: int, nelems: int) -> int:
        """elem_type[nelems], indexed by an INT type (arrays are anonymous, size 0)."""
        tail = struct.pack("<III", elem_type, index_type, nelems)
        return self.add_raw("", type_info(BTF_KIND_ARRAY), 0, tail)

    def _add_composite(self, kind: int, name: str, size: int, members: Sequence[Member]) -> int:
        bitfields = any(m.bitfield_size for m in members)
        self.string(name)  # the type's own name first, as compilers emit it
        tail = b""
        for m in members:
            offset = (m.bitfield_size << 24) | m.bit_offset if bitfields else m.bit_offset
            tail += struct.pack("<III", self.string(m.name), m.type_id, offset)
        return self.add_raw(name, type_info(kind, len(members), bitfields), size, tail)

    def add_struct(self, name: str, size: int, members: Sequence[Member]) -> int:
        """A struct of `size` bytes; uses the kind_flag encoding when a member is a bitfield."""
        return self._add_composite(BTF_KIND_STRUCT, name, size, members)

    def add_union(self, name: str, size: int, members: Sequence[Member]) -> int:
        """A union of `size` bytes."""
        return self._add_composite(BTF_KIND_UNION, name, size, members)

    def add_typedef(self, name: str, type_id: int) -> int:
        """typedef type_id name."""
        return self.add_raw(name, type_info(BTF_KIND_TYPEDEF), type_id)

    def add_func_proto(self, return_type: int, params: Sequence[tuple[str, int]]) -> int:
        """A function prototype; params are (name, type id)."""
        tail = b"".join(struct.pack("<II", self.string(n), t) for n, t in params)
        return self.add_raw("", type_info(BTF_KIND_FUNC_PROTO, len(params)), return_type, tail)

    def add_func(self, name: str, proto: int, linkage: int = BTF_FUNC_GLOBAL) -> int:
        """A function of prototype `proto`."""
        return self.add_raw(name, type_info(BTF_KIND_FUNC, linkage), proto)

    def add_spin_lock(self) -> int:
        """struct bpf_spin_lock { __u32 val; } as the kernel expects it by name and size."""
        u32 = self.add_int("unsigned int", 4)
        return self.add_struct("bpf_spin_lock", 4, [Member("val", u32)])

    def encode(
        self, *, magic: int = BTF_MAGIC, version: int = BTF_VERSION, flags: int = 0,
        hdr_len: int = BTF_HEADER_LEN, type_off: int = 0, str_off: int | None = None,
    ) -> bytes:
        """The blob; the keyword overrides exist to produce deliberately broken headers."""
        types = b"".join(self._types)
        strings = bytes(self._strings)
        if str_off is None:
            str_off = type_off + len(types)
        header = struct.pack(
            "<HBBIIIII", magic, version, flags, hdr_len, type_off, len(types), str_off, len(strings)
        )
        return header + types + strings


def load_btf(blob: bytes, log_size: int = 1 << 16) -> int:
    """BPF_BTF_LOAD the blob and return its fd; on failure the kernel's BTF log is in the error."""
    data = ctypes.create_string_buffer(blob, len(blob))
    attr = syscall.BtfLoadAttr(btf=ctypes.addressof(data), btf_size=len(blob))
    try:
        return syscall.bpf(syscall.BPF_BTF_LOAD, attr)
    except syscall.BpfError as first:
        # Reload with a log only to explain the failure: the errno that counts is the first.
        log = ctypes.create_string_buffer(log_size)
        attr = syscall.BtfLoadAttr(
            btf=ctypes.addressof(data), btf_size=len(blob),
            btf_log_buf=ctypes.addressof(log), btf_log_size=log_size, btf_log_level=1,
        )
        try:
            syscall.bpf(syscall.BPF_BTF_LOAD, attr)
        except syscall.BpfError:
            pass
        raise syscall.BpfError(first.errno, first.command, log.value.decode(errors="replace"))


class KernelBtf:
    """A BTF blob indexed: type ids by (kind, name), and where each type's record starts.

    Names are compared as string-table offsets, never decoded up front: decoding the
    kernel's 40,000-130,000 names costs seconds in a TCG guest.  btf_layout.BtfLayout
    decodes the few types a test asks about from this same index.
    """

    def __init__(self, blob: bytes) -> None:
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", blob
        )
        if magic != BTF_MAGIC:
            raise ValueError(f"not a BTF blob (magic {magic:#x})")
        self.blob = blob
        self._strings = blob[hdr_len + str_off: hdr_len + str_off + str_len]
        self.starts = [0]  # blob offset of each type's record; id 0 is void
        self._ids: dict[tuple[int, int], int] = {}  # (kind, name offset) -> first id
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<II").unpack_from
        while pos < end:
            name_off, info = unpack(blob, pos)
            kind = (info >> 24) & 0x1F
            if kind not in _KIND_TAIL:
                raise ValueError(f"BTF type {len(self.starts)} has unknown kind {kind}")
            fixed, per_entry = _KIND_TAIL[kind]
            if name_off:
                self._ids.setdefault((kind, name_off), len(self.starts))
            self.starts.append(pos)
            pos += 12 + fixed + per_entry * (info & 0xFFFF)
        self.type_count = len(self.starts) - 1

    def name_at(self, offset: int) -> str:
        """The string at `offset` of the string table."""
        return self._strings[offset: self._strings.index(b"\0", offset)].decode()

    def find_id(self, name: str, kind: int) -> int | None:
        """Id of the first type called `name` of `kind`, None when there is none."""
        needle, start, ids = b"\0" + name.encode() + b"\0", 0, []
        while (at := self._strings.find(needle, start)) != -1:
            if (kind, at + 1) in self._ids:
                ids.append(self._ids[(kind, at + 1)])
            start = at + 1
        return min(ids) if ids else None

    def find(self, name: str, kind: int) -> int:
        """Id of the first type called `name` of `kind`; LookupError when the kernel has none."""
        found = self.find_id(name, kind)
        if found is None:
            raise LookupError(f"kernel BTF has no type {name!r} of kind {kind}")
        return found


def kernel_btf(path: str = VMLINUX_BTF) -> KernelBtf:
    """Parse the running kernel's BTF once; FileNotFoundError when CONFIG_DEBUG_INFO_BTF is off."""
    # Always call the cache with the path itself: kernel_btf() and kernel_btf(path) are
    # one entry, so btf_layout.kernel_layout() shares the index the probes built.
    return _read_kernel_btf(path)


@functools.lru_cache(maxsize=1)
def _read_kernel_btf(path: str) -> KernelBtf:
    with open(path, "rb") as f:
        return KernelBtf(f.read())
