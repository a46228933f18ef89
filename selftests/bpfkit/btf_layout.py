"""Struct layouts from a BTF blob: where a member of a kernel struct sits, and its size.

bpfkit.btf.KernelBtf knows names, kinds and ids only. A tracing program reading a
kernel object (say `sk->sk_omem_alloc` at fexit of bpf_sk_storage_free) needs the
member's byte offset in *this* kernel's build, which only the kernel's own BTF knows.

A member is named by a dotted path ("__sk_common.skc_cookie"); members of anonymous
structs and unions are found as if they belonged to the enclosing struct, as in C.
Typedefs and qualifiers are looked through. Bitfields have no byte offset: asking for
one raises ValueError.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from . import btf

# Kinds whose size_or_type field is a type id to follow for the size.
_REFERENCE_KINDS = {
    btf.BTF_KIND_TYPEDEF, btf.BTF_KIND_VOLATILE, btf.BTF_KIND_CONST,
    btf.BTF_KIND_RESTRICT, btf.BTF_KIND_TYPE_TAG,
}
# Kinds whose size_or_type field is the size in bytes.
_SIZED_KINDS = {
    btf.BTF_KIND_INT, btf.BTF_KIND_STRUCT, btf.BTF_KIND_UNION, btf.BTF_KIND_ENUM,
    btf.BTF_KIND_FLOAT, btf.BTF_KIND_ENUM64, btf.BTF_KIND_DATASEC,
}
_COMPOSITE_KINDS = {btf.BTF_KIND_STRUCT, btf.BTF_KIND_UNION}
POINTER_SIZE = 8


@dataclass(frozen=True)
class Field:
    """A member's place in its outermost struct: byte offset and size in bytes."""

    offset: int
    size: int


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    kind_flag: bool
    size_or_type: int
    tail: bytes
    vlen: int


class BtfLayout:
    """Every type of a BTF blob, enough to compute member offsets and type sizes.

    It reads types through btf.KernelBtf's index (where each type starts, which string
    names it) and decodes one when first asked: a kernel has 40,000-130,000 types, and
    decoding them all costs seconds in a TCG guest, while a test looks up a handful.
    """

    def __init__(self, blob: bytes | btf.KernelBtf) -> None:
        self._index = blob if isinstance(blob, btf.KernelBtf) else btf.KernelBtf(blob)
        self._decoded: dict[int, _Type] = {}

    def _type(self, type_id: int) -> _Type:
        starts = self._index.starts
        if not 0 < type_id < len(starts):
            raise LookupError(f"BTF has no type id {type_id}")
        found = self._decoded.get(type_id)
        if found is None:
            pos, blob = starts[type_id], self._index.blob
            name_off, info, size_or_type = struct.unpack_from("<III", blob, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            fixed, per_entry = btf._KIND_TAIL[kind]
            found = _Type(kind, self._index.name_at(name_off) if name_off else "", bool(info >> 31),
                          size_or_type, blob[pos + 12: pos + 12 + fixed + per_entry * vlen],
                          vlen)
            self._decoded[type_id] = found
        return found

    def struct_id(self, name: str) -> int:
        """Id of the struct called `name`; LookupError when there is none."""
        found = self._index.find_id(name, btf.BTF_KIND_STRUCT)
        if found is None:
            raise LookupError(f"BTF has no struct {name!r}")
        return found

    def resolve(self, type_id: int) -> int:
        """type_id with typedefs and qualifiers looked through."""
        while self._type(type_id).kind in _REFERENCE_KINDS:
            type_id = self._type(type_id).size_or_type
        return type_id

    def size_of(self, type_id: int) -> int:
        """Size in bytes of a type."""
        t = self._type(self.resolve(type_id))
        if t.kind in _SIZED_KINDS:
            return t.size_or_type
        if t.kind == btf.BTF_KIND_PTR:
            return POINTER_SIZE
        if t.kind == btf.BTF_KIND_ARRAY:
            elem_type, _index_type, nelems = struct.unpack_from("<III", t.tail)
            return nelems * self.size_of(elem_type)
        raise ValueError(f"BTF type {type_id} (kind {t.kind}) has no size")

    def _members(self, type_id: int) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of a struct or union's members."""
        t = self._type(type_id)
        members = []
        for i in range(t.vlen):
            name_off, member_type, offset = struct.unpack_from("<III", t.tail, 12 * i)
            bits, bitfield = (offset & 0xFFFFFF, offset >> 24) if t.kind_flag else (offset, 0)
            members.append((self._index.name_at(name_off) if name_off else "", member_type,
                            bits, bitfield))
        return members

    def _find_member(self, type_id: int, name: str) -> tuple[int, int, int] | None:
        """(bit offset, type id, bitfield size) of `name` in a struct/union, looking into
        anonymous members; None when absent."""
        for member_name, member_type, bits, bitfield in self._members(type_id):
            if member_name == name:
                return bits, member_type, bitfield
            inner = self.resolve(member_type)
            if not member_name and self._type(inner).kind in _COMPOSITE_KINDS:
                found = self._find_member(inner, name)
                if found is not None:
                    return bits + found[0], found[1], found[2]
        return None

    def param_count(self, func_type_id: int) -> int:
        """Number of parameters of a FUNC: where an fexit program finds the return value."""
        func = self._type(func_type_id)
        if func.kind != btf.BTF_KIND_FUNC:
            raise ValueError(f"BTF type {func_type_id} is not a FUNC (kind {func.kind})")
        return self._type(func.size_or_type).vlen

    def member(self, struct_name: str, path: str) -> Field:
        """Offset (from the start of struct_name) and size of a dotted member path."""
        type_id, bits, size = self.struct_id(struct_name), 0, 0
        for name in path.split("."):
            composite = self.resolve(type_id)
            if self._type(composite).kind not in _COMPOSITE_KINDS:
                raise LookupError(f"{struct_name}.{path}: {name!r} is looked up in a non-struct")
            found = self._find_member(composite, name)
            if found is None:
                raise LookupError(f"BTF struct {struct_name!r} has no member {path!r}")
            member_bits, type_id, bitfield = found
            if bitfield:
                raise ValueError(f"{struct_name}.{path} is a bitfield: it has no byte offset")
            bits += member_bits
            size = self.size_of(type_id)
        if bits % 8:
            raise ValueError(f"{struct_name}.{path} starts at bit {bits}, not on a byte")
        return Field(bits // 8, size)


@functools.lru_cache(maxsize=1)
def kernel_layout(path: str = btf.VMLINUX_BTF) -> BtfLayout:
    """The running kernel's struct layouts; FileNotFoundError without CONFIG_DEBUG_INFO_BTF.

    Built on kernel_btf()'s index: the file is read and indexed once per run.
    """
    return BtfLayout(btf.kernel_btf(path))
