"""The verifier's checks on bpf_sk_storage_get/delete arguments, each beside a loading control.

bpf_sk_storage_get(map, sk, value, flags): `map` must be a constant pointer to an sk
storage map (check_map_func_compatibility: EINVAL otherwise), `value` is
ARG_PTR_TO_MAP_VALUE_OR_NULL: NULL or a pointer to value_size readable bytes (EACCES
for a non-zero scalar or a pointer of another kind).
bpf_sk_storage_delete(map, sk) has the same map rule. The rule also holds the other way
round: the generic map helpers (lookup and delete here) refuse an sk storage map.
"""

from __future__ import annotations

import errno
import os

import pytest
from bpfkit import maps, prog, syscall
from bpfkit.asm import (
    ADD,
    DW,
    JEQ,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R10,
    W,
    alu64_imm,
    assemble,
    call,
    exit_insn,
    jmp_imm,
    label,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
)

pytestmark = [pytest.mark.prog, pytest.mark.verifier]

SKB_SK = 168
EGRESS = syscall.BPF_CGROUP_INET_EGRESS
VALUE_SIZE = 8


def program(call_part: list) -> bytes:
    """r7 = the packet's full socket, then call_part, then allow the packet."""
    return assemble([
        mov64_reg(R6, R1),
        ldx_mem(DW, R1, R6, SKB_SK),
        jmp_imm(JEQ, R1, 0, "out"),
        call("sk_fullsock"),
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_reg(R7, R0),
    ] + call_part + [
        label("out"),
        mov64_imm(R0, 1),
        exit_insn(),
    ])


def init_value_get(map_fd: int, init: str) -> list:
    """bpf_sk_storage_get(map, sk, <init>, F_CREATE) with the init value argument chosen."""
    setup = {
        "null": [mov64_imm(R3, 0)],
        "stack-8": [st_mem(DW, R10, -8, 7), mov64_reg(R3, R10), alu64_imm(ADD, R3, -8)],
        "scalar": [mov64_imm(R3, 0x1234)],
        "ctx": [mov64_reg(R3, R6)],
    }[init]
    return setup + [
        ld_map_fd(R1, map_fd),
        mov64_reg(R2, R7),
        mov64_imm(R4, syscall.BPF_SK_STORAGE_GET_F_CREATE),
        call("sk_storage_get"),
    ]


def delete_call(map_fd: int, slots: str = "map-sk") -> list:
    """bpf_sk_storage_delete(map, sk); "sk-map" swaps the two, "map-map" passes the map
    in both slots."""
    first = ld_map_fd(R1, map_fd) if slots.startswith("map") else mov64_reg(R1, R7)
    second = ld_map_fd(R2, map_fd) if slots.endswith("map") else mov64_reg(R2, R7)
    return [first, second, call("sk_storage_delete")]


def load(insns: bytes) -> int:
    return prog.load_program(syscall.BPF_PROG_TYPE_CGROUP_SKB, insns,
                             expected_attach_type=EGRESS)


def rejection(insns: bytes) -> syscall.BpfError:
    """The verifier's refusal (a program that loads fails the test)."""
    try:
        fd = load(insns)
    except syscall.BpfError as err:
        assert err.command == "BPF_PROG_LOAD"
        return err
    os.close(fd)
    pytest.fail("the verifier accepted the program")


@pytest.mark.parametrize("init", ["null", "stack-8"])
def test_init_value_null_or_initialised_stack_loads(init, storage_map):
    """The controls: NULL or value_size initialised stack bytes as the init value."""
    os.close(load(program(init_value_get(storage_map, init))))


@pytest.mark.parametrize("init", ["scalar", "ctx"])
def test_bad_init_value_is_eacces(init, storage_map):
    """A non-zero scalar or the context pointer as the init value is refused, EACCES.

    (A partly written stack area is accepted from a privileged loader: such loaders may
    read uninitialised stack since 5.12, so no test pins its refusal.)
    """
    assert rejection(program(init_value_get(storage_map, init))).errno == errno.EACCES


def test_delete_with_storage_map_loads(storage_map):
    """The control for the delete rejections."""
    os.close(load(program(delete_call(storage_map))))


def storage_helper_call(helper: str, map_fd: int) -> list:
    """bpf_sk_storage_get(map, sk, NULL, F_CREATE) or bpf_sk_storage_delete(map, sk)."""
    if helper == "sk_storage_delete":
        return delete_call(map_fd)
    return [ld_map_fd(R1, map_fd), mov64_reg(R2, R7), mov64_imm(R3, 0),
            mov64_imm(R4, syscall.BPF_SK_STORAGE_GET_F_CREATE), call(helper)]


@pytest.mark.parametrize("helper", ["sk_storage_get", "sk_storage_delete"])
def test_storage_helper_with_another_map_type_is_einval(helper, storage_map, closing):
    """An array map passed to bpf_sk_storage_get/delete is EINVAL (the storage map loads)."""
    os.close(load(program(storage_helper_call(helper, storage_map))))
    array = closing(maps.create_map(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 1))
    err = rejection(program(storage_helper_call(helper, array)))
    assert err.errno == errno.EINVAL
    assert f"cannot pass map_type {syscall.BPF_MAP_TYPE_ARRAY} into func bpf_{helper}#" \
        in err.detail


def generic_map_call(helper: str, map_fd: int) -> list:
    """bpf_map_lookup_elem/delete_elem(map, &key) with a 4-byte key on the stack."""
    return [st_mem(W, R10, -4, 0), mov64_reg(R2, R10), alu64_imm(ADD, R2, -4),
            ld_map_fd(R1, map_fd), call(helper)]


@pytest.mark.parametrize("helper", ["map_lookup_elem", "map_delete_elem"])
def test_storage_map_in_a_generic_map_helper_is_einval(helper, storage_map, closing):
    """A storage map is only for its own two helpers: bpf_map_lookup_elem and
    bpf_map_delete_elem refuse it with EINVAL, where a hash map of the same key and value
    sizes loads (their kernel side takes a socket fd, not a key)."""
    hash_map = closing(maps.create_map(syscall.BPF_MAP_TYPE_HASH, 4, VALUE_SIZE, 1))
    os.close(load(program(generic_map_call(helper, hash_map))))
    err = rejection(program(generic_map_call(helper, storage_map)))
    assert err.errno == errno.EINVAL
    assert f"cannot pass map_type {syscall.BPF_MAP_TYPE_SK_STORAGE} into func bpf_{helper}#" \
        in err.detail


@pytest.mark.parametrize("slots", ["sk-map", "map-map"], ids=["swapped", "map-as-socket"])
def test_delete_with_a_map_in_the_socket_slot_is_eacces(slots, storage_map):
    """A map pointer where bpf_sk_storage_delete wants the socket is refused with EACCES:
    with the two arguments swapped, and with the map also in its own slot, where only the
    socket slot's type check can refuse it."""
    err = rejection(program(delete_call(storage_map, slots)))
    assert err.errno == errno.EACCES
    if slots == "map-map":
        assert "R2 type=map_ptr expected=" in err.detail, err.detail
