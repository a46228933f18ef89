"""BTF enforcement on sk storage maps: BTF is mandatory, the key must be a plain 32-bit int.

The map "enforces BTF for userspace sk dumping" (the feature's commit message): no BTF ids
is EINVAL; the key type must be a 4-byte INT using all 32 bits from bit 0
(bpf_local_storage_map_check_btf); the value type's size must equal value_size
(map_check_btf in kernel/bpf/syscall.c). Every blob here is first proven loadable, so each
EINVAL is the map's verdict, not the BTF loader's.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from bpfkit import btf, maps, probes, syscall

pytestmark = pytest.mark.btf

VALUE_SIZE = 8


def create_with(blob: bytes, key_id: int, value_id: int, closing, value_size: int = VALUE_SIZE):
    """Load blob (must succeed) and create an sk storage map over it; returns the map fd."""
    btf_fd = closing(btf.load_btf(blob))
    return maps.create_map(
        syscall.BPF_MAP_TYPE_SK_STORAGE, 4, value_size, 0, syscall.BPF_F_NO_PREALLOC,
        btf_fd=btf_fd, btf_key_type_id=key_id, btf_value_type_id=value_id,
    )


def creation_errno(blob: bytes, key_id: int, value_id: int, closing, **kw) -> int:
    """The errno of a creation that must fail; a created map fails the test."""
    try:
        fd = create_with(blob, key_id, value_id, closing, **kw)
    except syscall.BpfError as err:
        assert err.command == "BPF_MAP_CREATE"
        return err.errno
    os.close(fd)
    pytest.fail("BPF_MAP_CREATE accepted the map")


def value_struct(builder: btf.BtfBuilder, size: int = VALUE_SIZE) -> int:
    """struct value { unsigned char data[size]; }."""
    u8 = builder.add_int("unsigned char", 1)
    index = builder.add_int("unsigned int", 4)
    array = builder.add_array(u8, index, size)
    return builder.add_struct("value", size, [btf.Member("data", array)])


def test_without_btf_is_einval(closing):
    """No BTF at all (fd 0, both ids 0) is refused."""
    try:
        fd = maps.create_map(
            syscall.BPF_MAP_TYPE_SK_STORAGE, 4, VALUE_SIZE, 0, syscall.BPF_F_NO_PREALLOC
        )
    except syscall.BpfError as err:
        assert err.errno == errno.EINVAL
    else:
        os.close(fd)
        pytest.fail("an sk storage map without BTF was created")


@pytest.mark.parametrize("missing", ["key", "value"])
def test_btf_with_one_id_missing_is_einval(closing, missing):
    """A valid BTF object with the key or the value type id left at 0 is refused."""
    blob, key_id, value_id = maps.storage_btf_blob(VALUE_SIZE)
    key_id, value_id = (0, value_id) if missing == "key" else (key_id, 0)
    assert creation_errno(blob, key_id, value_id, closing) == errno.EINVAL


def test_int_key_is_accepted_and_reported(closing):
    """The control for the key tests below: a signed 32-bit int key works."""
    blob, key_id, value_id = maps.storage_btf_blob(VALUE_SIZE)
    fd = closing(create_with(blob, key_id, value_id, closing))
    info = maps.map_info(fd)
    assert (info.btf_key_type_id, info.btf_value_type_id) == (key_id, value_id)


def test_typedef_of_int_key_is_accepted(closing):
    """The key check looks through typedefs: `typedef int sock_fd_t` is a 32-bit int key."""
    builder = btf.BtfBuilder()
    int_id = builder.add_int("int", 4, signed=True)
    key_id = builder.add_typedef("sock_fd_t", int_id)
    value_id = value_struct(builder)
    fd = closing(create_with(builder.encode(), key_id, value_id, closing))
    # The map records the id it was given, not the resolved int.
    assert maps.map_info(fd).btf_key_type_id == key_id


def _struct_key(builder: btf.BtfBuilder) -> int:
    u32 = builder.add_int("unsigned int", 4)
    return builder.add_struct("key", 4, [btf.Member("fd", u32)])


def _int64_key(builder: btf.BtfBuilder) -> int:
    return builder.add_int("long", 8, signed=True)


def _int16_key(builder: btf.BtfBuilder) -> int:
    return builder.add_int("short", 2, signed=True)


def _int_16_bits_of_4_bytes(builder: btf.BtfBuilder) -> int:
    # Right size, wrong width: only the sk storage check itself can catch this one.
    return builder.add_int("int", 4, bits=16, signed=True)


def _int_with_bit_offset(builder: btf.BtfBuilder) -> int:
    # BTF itself forbids offset 8 with 32 bits in 4 bytes, so the offset int has 24 bits.
    return builder.add_int("int", 4, bits=24, bit_offset=8, signed=True)


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(_struct_key, id="struct-of-4-bytes"),
        pytest.param(_int64_key, id="64-bit-int"),
        pytest.param(_int16_key, id="16-bit-int"),
        pytest.param(_int_16_bits_of_4_bytes, id="4-byte-int-of-16-bits"),
        pytest.param(_int_with_bit_offset, id="int-with-bit-offset"),
    ],
)
def test_key_that_is_not_a_plain_32_bit_int_is_einval(closing, make_key):
    """Any key type but a 32-bit int at bit offset 0 is refused."""
    builder = btf.BtfBuilder()
    key_id = make_key(builder)
    value_id = value_struct(builder)
    assert creation_errno(builder.encode(), key_id, value_id, closing) == errno.EINVAL


@pytest.mark.parametrize("btf_value_size", [VALUE_SIZE - 4, VALUE_SIZE + 4])
def test_value_type_size_mismatch_is_einval(closing, btf_value_size):
    """A value type whose size differs from value_size is refused."""
    builder = btf.BtfBuilder()
    key_id = builder.add_int("int", 4, signed=True)
    value_id = value_struct(builder, btf_value_size)
    assert creation_errno(builder.encode(), key_id, value_id, closing) == errno.EINVAL


def test_key_id_past_the_last_type_is_einval(closing):
    """A key id the BTF object does not contain is refused."""
    blob, _, value_id = maps.storage_btf_blob(VALUE_SIZE)
    assert creation_errno(blob, 1000, value_id, closing) == errno.EINVAL


def test_value_with_spin_lock_is_accepted(closing):
    """A value struct holding a `struct bpf_spin_lock` is accepted and reported back."""
    probes.require("spin_lock_value")
    blob, key_id, value_id = maps.storage_btf_blob(16, spin_lock=True)
    fd = closing(create_with(blob, key_id, value_id, closing, value_size=16))
    info = maps.map_info(fd)
    assert info.value_size == 16
    assert (info.btf_key_type_id, info.btf_value_type_id) == (key_id, value_id)



# --- keys that pass every generic check and reach bpf_local_storage_map_check_btf ---------
#
# map_check_btf() in kernel/bpf/syscall.c only asks the key type for its size (4 here), so
# each key below is refused by the sk storage check alone. The 4 bytes after the key's
# btf_type are laid out to read as a 32-bit int encoding at offset 0 (the value 32), so
# only the kind test can refuse the non-int keys: skipping it would read those bytes as
# a perfectly good int.

INT_LOOKALIKE = 32  # BTF_INT_BITS() == 32, BTF_INT_OFFSET() == 0


def _builder_with_name_at_32() -> tuple[btf.BtfBuilder, str]:
    """A builder whose next new string lands at string offset 32."""
    builder = btf.BtfBuilder()
    builder.string("p" * (INT_LOOKALIKE - 2))  # offsets 1..31 with its NUL
    name = "k"
    assert builder.string(name) == INT_LOOKALIKE
    return builder, name


def _key_variant(kind: str) -> tuple[bytes, int, int]:
    """(blob, key id, value id): the same value type; only the 4-byte key type varies."""
    builder, name_at_32 = _builder_with_name_at_32()
    if kind == "int":
        key_id = builder.add_int("int", 4, signed=True)
    elif kind == "int-16-bits":
        key_id = builder.add_int("int", 4, bits=16, signed=True)
    elif kind == "int-24-bits-at-offset-8":
        key_id = builder.add_int("int", 4, bits=24, bit_offset=8, signed=True)
    elif kind == "struct":
        u32 = builder.add_int("unsigned int", 4)
        # The member's name_off (32) is the word right after the struct's btf_type.
        key_id = builder.add_struct("key", 4, [btf.Member(name_at_32, u32)])
    elif kind == "enum":
        # The first enumerator's name_off (32) follows the btf_type.
        key_id = builder.add_raw("key", btf.type_info(btf.BTF_KIND_ENUM, 1), 4,
                                 struct.pack("<Ii", builder.string(name_at_32), 0))
    elif kind == "float":
        # FLOAT has no tail: the next type's name_off (32) follows it.
        key_id = builder.add_raw("float", btf.type_info(btf.BTF_KIND_FLOAT), 4)
        builder.add_int(name_at_32, 1)
    else:
        raise ValueError(kind)
    value_id = value_struct(builder)
    return builder.encode(), key_id, value_id


def test_key_variants_control_int_is_accepted(closing):
    """The control for the variants below: the same blob shape with an int key works."""
    blob, key_id, value_id = _key_variant("int")
    fd = closing(create_with(blob, key_id, value_id, closing))
    assert maps.map_info(fd).btf_key_type_id == key_id


@pytest.mark.parametrize("kind", ["struct", "enum", "float", "int-16-bits",
                                  "int-24-bits-at-offset-8"])
def test_four_byte_key_refused_by_the_storage_check(kind, closing):
    """A 4-byte key that is not a full 32-bit int (struct, enum, float, narrow int) is EINVAL."""
    blob, key_id, value_id = _key_variant(kind)
    try:
        os.close(btf.load_btf(blob))
    except syscall.BpfError as err:
        if kind == "float" and err.errno == errno.EINVAL:
            probes.absent("BTF_KIND_FLOAT", "5.13", "BPF_BTF_LOAD of a float failed with EINVAL")
        raise
    assert creation_errno(blob, key_id, value_id, closing) == errno.EINVAL
