"""bpfkit.btf blob layout, byte for byte, against the format in include/uapi/linux/btf.h.

Header (24 bytes): u16 magic 0xeb9f, u8 version 1, u8 flags, u32 hdr_len 24, u32 type_off,
u32 type_len, u32 str_off, u32 str_len; offsets count from the end of the header. Each type
is struct btf_type {u32 name_off; u32 info; u32 size_or_type} plus its kind's data; info
holds vlen in bits 0-15, kind in bits 24-28 and kind_flag in bit 31.
"""

from __future__ import annotations

import struct

import pytest
from bpfkit import btf, maps


def hexbytes(text: str) -> bytes:
    """Bytes from a hex dump with spaces."""
    return bytes.fromhex(text.replace(" ", ""))


def header(type_len: int, str_len: int) -> bytes:
    """The expected header for a blob with the type section first, strings right after."""
    return hexbytes("9feb 01 00 18000000 00000000") + struct.pack(
        "<III", type_len, type_len, str_len
    )


def test_empty_blob_is_header_plus_empty_string():
    assert btf.BtfBuilder().encode() == hexbytes(
        "9feb 01 00 18000000"  # magic, version 1, flags 0, hdr_len 24
        "00000000 00000000"    # type_off 0, type_len 0
        "00000000 01000000"    # str_off 0, str_len 1
        "00"                   # the string section: just ""
    )


def test_signed_int():
    builder = btf.BtfBuilder()
    assert builder.add_int("int", 4, signed=True) == 1
    assert builder.encode() == header(16, 5) + hexbytes(
        "01000000"   # name_off 1 ("int")
        "00000001"   # info: kind INT (1) << 24
        "04000000"   # size 4
        "20000001"   # encoding SIGNED (1) << 24 | offset 0 << 16 | nr_bits 32
    ) + b"\0int\0"


def test_int_with_bits_and_offset():
    builder = btf.BtfBuilder()
    builder.add_int("odd", 4, bits=24, bit_offset=8)
    blob = builder.encode()
    # The INT data word: encoding 0, offset 8 in bits 16-23 (third byte), nr_bits 24 in
    # bits 0-7 (first byte).
    assert blob[24 + 12: 24 + 16] == hexbytes("18 00 08 00")


def test_pointer_typedef_and_array():
    builder = btf.BtfBuilder()
    int_id = builder.add_int("int", 4, signed=True)        # id 1
    assert builder.add_ptr(int_id) == 2
    assert builder.add_typedef("fd_t", int_id) == 3
    assert builder.add_array(int_id, int_id, 5) == 4
    blob = builder.encode()
    types = blob[24: 24 + 16 + 12 + 12 + 24]
    assert types[16:] == hexbytes(
        "00000000 00000002 01000000"            # PTR: anonymous, kind 2, type 1
        "05000000 00000008 01000000"            # TYPEDEF "fd_t" (name_off 5), kind 8, type 1
        "00000000 00000003 00000000"            # ARRAY: anonymous, kind 3, size 0...
        "01000000 01000000 05000000"            # ...elem type 1, index type 1, nelems 5
    )
    assert blob[24 + len(types):] == b"\0int\0fd_t\0"


def test_struct_members_and_plain_offsets():
    builder = btf.BtfBuilder()
    u32 = builder.add_int("u32", 4)                         # id 1, name_off 1
    builder.add_struct("pair", 8, [btf.Member("a", u32, 0), btf.Member("b", u32, 32)])
    blob = builder.encode()
    assert blob[24 + 16:] == hexbytes(
        "05000000 02000004 08000000"            # "pair" at 5; kind STRUCT 4, vlen 2; size 8
        "0a000000 01000000 00000000"            # member "a" (10): type 1, bit offset 0
        "0c000000 01000000 20000000"            # member "b" (12): type 1, bit offset 32
    ) + b"\0u32\0pair\0a\0b\0"


def test_bitfield_members_use_kind_flag_encoding():
    builder = btf.BtfBuilder()
    u32 = builder.add_int("u32", 4)
    builder.add_struct("flags", 4, [
        btf.Member("lo", u32, 0, bitfield_size=3),
        btf.Member("hi", u32, 3, bitfield_size=29),
    ])
    blob = builder.encode()
    info = struct.unpack_from("<I", blob, 24 + 16 + 4)[0]
    assert info == 0x84000002                   # kind_flag | STRUCT << 24 | vlen 2
    # Members start after the int (16 bytes) and the struct header (12); each member is
    # (name_off, type, offset), so the offset words sit 8 bytes into each 12-byte member.
    first = struct.unpack_from("<I", blob, 24 + 16 + 12 + 8)[0]
    second = struct.unpack_from("<I", blob, 24 + 16 + 12 + 12 + 8)[0]
    # offset word: bitfield_size << 24 | bit_offset
    assert (first, second) == (3 << 24 | 0, 29 << 24 | 3)


def test_union_func_proto_and_func():
    builder = btf.BtfBuilder()
    int_id = builder.add_int("int", 4, signed=True)
    assert builder.add_union("u", 4, [btf.Member("x", int_id)]) == 2
    proto = builder.add_func_proto(int_id, [("ctx", int_id)])
    func = builder.add_func("prog", proto)
    blob = builder.encode()
    union_info, proto_info, func_info = (
        struct.unpack_from("<I", blob, 24 + off)[0] for off in (16 + 4, 16 + 24 + 4, 16 + 24 + 20 + 4)
    )
    assert union_info == 0x05000001             # UNION 5, vlen 1
    assert proto_info == 0x0D000001             # FUNC_PROTO 13, vlen 1 (one param)
    assert func_info == 0x0C000001              # FUNC 12, vlen = linkage GLOBAL (1)
    assert (proto, func) == (3, 4)


def test_spin_lock_is_the_named_4_byte_struct():
    builder = btf.BtfBuilder()
    lock = builder.add_spin_lock()
    assert lock == 2
    blob = builder.encode()
    assert blob[24 + 16:24 + 16 + 24] == hexbytes(
        "0e000000 01000004 04000000"            # "bpf_spin_lock", STRUCT, vlen 1, size 4
        "1c000000 01000000 00000000"            # "val": type 1 (unsigned int), offset 0
    )
    assert blob.endswith(b"\0unsigned int\0bpf_spin_lock\0val\0")


def test_strings_are_stored_once():
    builder = btf.BtfBuilder()
    builder.add_int("int", 4)
    builder.add_int("int", 4)
    assert builder.encode().endswith(b"\0int\0")
    assert struct.unpack_from("<I", builder.encode(), 20)[0] == 5


def test_header_overrides_make_deliberately_broken_blobs():
    builder = btf.BtfBuilder()
    builder.add_int("int", 4)
    blob = builder.encode(magic=0xBEEF, version=2, str_off=3)
    assert blob[:4] == hexbytes("efbe 02 00")
    assert struct.unpack_from("<I", blob, 16)[0] == 3


def test_add_raw_writes_any_type_verbatim():
    builder = btf.BtfBuilder()
    builder.add_raw("bad", btf.type_info(31, 7, True), 0xDEAD, b"\x01\x02\x03\x04")
    assert builder.encode()[24:24 + 16] == hexbytes("01000000 0700009f adde0000 01020304")


def test_storage_btf_layout():
    blob, key_id, value_id = maps.storage_btf_blob(16, spin_lock=True)
    parsed = btf.KernelBtf(blob)
    assert parsed.find("int", btf.BTF_KIND_INT) == key_id == 1
    assert parsed.find("value", btf.BTF_KIND_STRUCT) == value_id
    lock = parsed.find("bpf_spin_lock", btf.BTF_KIND_STRUCT)
    # struct value: size 16; lock at bit 0, the 12-byte data array (the type added just
    # before the struct) at bit 32.
    type_len = struct.unpack_from("<I", blob, 12)[0]
    strings = blob[24 + type_len:]
    value = blob[24 + type_len - 36:24 + type_len]
    name_off, info, size, m1_name, m1_type, m1_off, m2_name, m2_type, m2_off = struct.unpack(
        "<9I", value)
    assert strings[name_off:].startswith(b"value\0")
    assert (info, size) == (0x04000002, 16)
    assert strings[m1_name:].startswith(b"lock\0") and (m1_type, m1_off) == (lock, 0)
    assert strings[m2_name:].startswith(b"data\0") and (m2_type, m2_off) == (value_id - 1, 32)


def test_kernel_btf_reader_finds_ids_by_name_and_kind():
    builder = btf.BtfBuilder()
    int_id = builder.add_int("thing", 4)
    struct_id = builder.add_struct("thing", 4, [btf.Member("x", int_id)])
    proto = builder.add_func_proto(int_id, [])
    func_id = builder.add_func("bpf_iter_bpf_sk_storage_map", proto)
    parsed = btf.KernelBtf(builder.encode())
    assert parsed.type_count == 4
    assert parsed.find("thing", btf.BTF_KIND_INT) == int_id
    assert parsed.find("thing", btf.BTF_KIND_STRUCT) == struct_id
    assert parsed.find("bpf_iter_bpf_sk_storage_map", btf.BTF_KIND_FUNC) == func_id
    with pytest.raises(LookupError):
        parsed.find("thing", btf.BTF_KIND_TYPEDEF)


def test_kernel_btf_reader_rejects_wrong_magic():
    with pytest.raises(ValueError, match="magic"):
        btf.KernelBtf(btf.BtfBuilder().encode(magic=0x1234))
