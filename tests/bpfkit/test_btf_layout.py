"""bpfkit.btf_layout: member offsets and sizes read back from BTF blobs built by hand.

The blobs come from bpfkit.btf.BtfBuilder, so every expected offset is the one written
into the member records; anonymous unions/structs, typedefs, qualifiers, arrays and
pointers are looked through the way C lays them out.
"""

from __future__ import annotations

import pytest
from bpfkit import btf, btf_layout


def sock_like_blob() -> bytes:
    """struct common { union { u64 pair; struct { u32 a; u32 b; }; }; atomic64_t cookie; };
    struct sk { struct common c; char pad[20]; atomic_t omem; void *p; u8 bits:3; }."""
    b = btf.BtfBuilder()
    u8 = b.add_int("unsigned char", 1)
    u32 = b.add_int("unsigned int", 4)
    s32 = b.add_int("int", 4, signed=True)
    u64 = b.add_int("unsigned long long", 8)
    s64 = b.add_int("long long", 8, signed=True)
    atomic = b.add_struct("atomic_t", 4, [btf.Member("counter", s32)])
    atomic64 = b.add_struct("atomic64_t", 8, [btf.Member("counter", s64)])
    pair = b.add_struct("", 8, [btf.Member("a", u32, 0), btf.Member("b", u32, 32)])
    anon = b.add_union("", 8, [btf.Member("pair", u64, 0), btf.Member("", pair, 0)])
    common = b.add_struct("common", 16, [btf.Member("", anon, 0),
                                         btf.Member("cookie", atomic64, 64)])
    volatile_common = b.add_raw("", btf.type_info(btf.BTF_KIND_VOLATILE), common)
    typedef_atomic = b.add_typedef("my_atomic_t", atomic)
    pad = b.add_array(u8, u32, 20)
    ptr = b.add_ptr(0)
    b.add_struct("sk", 64, [
        btf.Member("c", volatile_common, 0),
        btf.Member("pad", pad, 128),
        btf.Member("omem", typedef_atomic, 288),
        btf.Member("p", ptr, 320),
        btf.Member("bits", u8, 384, bitfield_size=3),
    ])
    return b.encode()


@pytest.fixture(scope="module")
def layout() -> btf_layout.BtfLayout:
    return btf_layout.BtfLayout(sock_like_blob())


@pytest.mark.parametrize("path, offset, size", [
    ("c", 0, 16),
    ("c.pair", 0, 8),
    ("c.a", 0, 4),                 # through the anonymous union, then the anonymous struct
    ("c.b", 4, 4),
    ("c.cookie", 8, 8),
    ("c.cookie.counter", 8, 8),
    ("pad", 16, 20),
    ("omem", 36, 4),               # a typedef'd struct
    ("omem.counter", 36, 4),
    ("p", 40, 8),
])
def test_member_offsets_and_sizes(layout, path, offset, size):
    assert layout.member("sk", path) == btf_layout.Field(offset, size)


def test_unknown_member_and_struct_are_lookup_errors(layout):
    with pytest.raises(LookupError, match="no member 'c.nope'"):
        layout.member("sk", "c.nope")
    with pytest.raises(LookupError, match="no struct 'missing'"):
        layout.member("missing", "x")
    with pytest.raises(LookupError, match="non-struct"):
        layout.member("sk", "p.x")


def test_bitfield_has_no_byte_offset(layout):
    with pytest.raises(ValueError, match="bitfield"):
        layout.member("sk", "bits")


def test_not_btf_is_rejected():
    with pytest.raises(ValueError, match="not a BTF blob"):
        btf_layout.BtfLayout(bytes(24))
