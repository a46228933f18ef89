"""bpfkit.asm encodings against bytes derived by hand from the eBPF encoding rules.

Each expectation is spelled out from include/uapi/linux/bpf.h and bpf_common.h:
opcode = class | size/op | mode/source; byte 1 = src_reg << 4 | dst_reg; then s16 off and
s32 imm, little-endian. The same bytes are what llvm-objdump shows for these instructions
(e.g. "b7 00 00 00 00 00 00 00  r0 = 0", "95 00 00 00 00 00 00 00  exit").
"""

from __future__ import annotations

import pytest
from bpfkit import asm
from bpfkit.asm import (
    ADD,
    DW,
    JEQ,
    JNE,
    MOV,
    R0,
    R1,
    R2,
    R3,
    R6,
    R8,
    R10,
    B,
    H,
    W,
)


def hexbytes(text: str) -> bytes:
    """Bytes from a hex dump with spaces, as objdump prints them."""
    return bytes.fromhex(text.replace(" ", ""))


@pytest.mark.parametrize(
    "insn, expected",
    [
        # BPF_MOV64_IMM(R0, 0): ALU64 0x07 | MOV 0xb0 | K 0x00 = 0xb7.
        (asm.mov64_imm(R0, 0), "b7 00 0000 00000000"),
        # BPF_MOV64_IMM(R0, -1): imm is s32 0xffffffff.
        (asm.mov64_imm(R0, -1), "b7 00 0000 ffffffff"),
        # BPF_MOV64_REG(R6, R1): 0x07 | 0xb0 | X 0x08 = 0xbf; regs = 1 << 4 | 6 = 0x16.
        (asm.mov64_reg(R6, R1), "bf 16 0000 00000000"),
        # BPF_MOV32_IMM(R0, 1): ALU 0x04 | MOV 0xb0 = 0xb4.
        (asm.mov32_imm(R0, 1), "b4 00 0000 01000000"),
        # BPF_ALU64_IMM(BPF_ADD, R3, -8): 0x07 | 0x00 = 0x07; imm -8 = f8 ff ff ff.
        (asm.alu64_imm(ADD, R3, -8), "07 03 0000 f8ffffff"),
        # BPF_ALU64_REG(BPF_ADD, R1, R2): 0x07 | 0x00 | 0x08 = 0x0f; regs 0x21.
        (asm.alu64_reg(ADD, R1, R2), "0f 21 0000 00000000"),
        # BPF_ALU32_REG(BPF_MOV, R1, R2): 0x04 | 0xb0 | 0x08 = 0xbc.
        (asm.alu32_reg(MOV, R1, R2), "bc 21 0000 00000000"),
        # BPF_LDX_MEM(BPF_DW, R1, R6, 168): LDX 0x01 | DW 0x18 | MEM 0x60 = 0x79; regs 0x61.
        (asm.ldx_mem(DW, R1, R6, 168), "79 61 a800 00000000"),
        # BPF_LDX_MEM(BPF_W, R1, R6, 4): 0x01 | W 0x00 | 0x60 = 0x61; regs 0x61 as well.
        (asm.ldx_mem(W, R1, R6, 4), "61 61 0400 00000000"),
        # BPF_LDX_MEM(BPF_H, ...): 0x01 | 0x08 | 0x60 = 0x69; BPF_B: 0x01 | 0x10 | 0x60 = 0x71.
        (asm.ldx_mem(H, R0, R1, 2), "69 10 0200 00000000"),
        (asm.ldx_mem(B, R0, R1, 1), "71 10 0100 00000000"),
        # BPF_STX_MEM(BPF_W, R10, R8, -4): STX 0x03 | W 0x00 | MEM 0x60 = 0x63; regs 0x8a.
        (asm.stx_mem(W, R10, R8, -4), "63 8a fcff 00000000"),
        # BPF_STX_MEM(BPF_DW, R10, R1, -8): 0x03 | 0x18 | 0x60 = 0x7b.
        (asm.stx_mem(DW, R10, R1, -8), "7b 1a f8ff 00000000"),
        # BPF_ST_MEM(BPF_W, R10, -4, 0x5eed1234): ST 0x02 | 0x00 | 0x60 = 0x62.
        (asm.st_mem(W, R10, -4, 0x5EED1234), "62 0a fcff 3412ed5e"),
        # BPF_ATOMIC_OP(BPF_DW, BPF_ADD, R0, R1, 0) (= old BPF_STX_XADD): 0x03|0x18|0xc0 = 0xdb.
        (asm.atomic_add(DW, R0, R1, 0), "db 10 0000 00000000"),
        # ... and the 32-bit form: 0x03 | 0x00 | 0xc0 = 0xc3.
        (asm.atomic_add(W, R0, R1, 4), "c3 10 0400 00000000"),
        # BPF_JMP_IMM(BPF_JEQ, R1, 0, 3): JMP 0x05 | JEQ 0x10 | K = 0x15.
        (asm.jmp_imm(JEQ, R1, 0, 3), "15 01 0300 00000000"),
        # BPF_JMP_REG(BPF_JNE, R1, R2, -1): 0x05 | 0x50 | X 0x08 = 0x5d; regs 0x21.
        (asm.jmp_reg(JNE, R1, R2, -1), "5d 21 ffff 00000000"),
        # BPF_JMP32_IMM(BPF_JEQ, R1, 5, 0): JMP32 0x06 | 0x10 = 0x16.
        (asm.jmp32_imm(JEQ, R1, 5, 0), "16 01 0000 05000000"),
        # BPF_JMP32_REG(BPF_JNE, R1, R2, 2): 0x06 | 0x50 | 0x08 = 0x5e.
        (asm.jmp32_reg(JNE, R1, R2, 2), "5e 21 0200 00000000"),
        # BPF_JMP_A(2): 0x05 | JA 0x00 = 0x05.
        (asm.ja(2), "05 00 0200 00000000"),
        # BPF_EMIT_CALL(BPF_FUNC_sk_storage_get = 107 = 0x6b): JMP 0x05 | CALL 0x80 = 0x85.
        (asm.call("sk_storage_get"), "85 00 0000 6b000000"),
        # BPF_FUNC_map_lookup_elem = 1.
        (asm.call("map_lookup_elem"), "85 00 0000 01000000"),
        # BPF_EXIT_INSN(): 0x05 | EXIT 0x90 = 0x95.
        (asm.exit_insn(), "95 00 0000 00000000"),
    ],
)
def test_single_slot_encodings(insn, expected):
    assert asm.assemble([insn]) == hexbytes(expected)


def test_ld_imm64_takes_two_slots_split_low_high():
    # BPF_LD_IMM64(R1, 0x1122334455667788): LD 0x00 | DW 0x18 | IMM 0x00 = 0x18; the first
    # slot carries the low 32 bits, the second (opcode 0) the high 32 bits.
    assert asm.assemble([asm.ld_imm64(R1, 0x1122334455667788)]) == hexbytes(
        "18 01 0000 88776655" "00 00 0000 44332211"
    )


def test_ld_map_fd_sets_pseudo_src():
    # BPF_LD_MAP_FD(R1, 7): src_reg = BPF_PSEUDO_MAP_FD (1), so regs = 1 << 4 | 1 = 0x11.
    assert asm.assemble([asm.ld_map_fd(R1, 7)]) == hexbytes(
        "18 11 0000 07000000" "00 00 0000 00000000"
    )


def test_forward_and_backward_labels_resolve_to_slot_offsets():
    program = asm.assemble([
        asm.label("top"),
        asm.jmp_imm(JEQ, R1, 0, "out"),     # slot 0 -> "out" at slot 4: off = 4 - 1 = 3
        asm.ld_imm64(R2, 1),                # slots 1-2 (a wide insn counts twice)
        asm.ja("top"),                      # slot 3 -> 0: off = 0 - 4 = -4
        asm.label("out"),
        asm.exit_insn(),                    # slot 4
    ])
    assert program == hexbytes(
        "15 01 0300 00000000"
        "18 02 0000 01000000" "00 00 0000 00000000"
        "05 00 fcff 00000000"
        "95 00 0000 00000000"
    )
    assert asm.insn_count(program) == 5


def test_label_takes_no_space():
    assert asm.assemble([asm.label("a"), asm.exit_insn(), asm.label("b")]) == hexbytes(
        "95 00 0000 00000000"
    )


def test_unsigned_immediate_folds_to_s32():
    # 0xffffffff given unsigned is the same bit pattern as -1.
    assert asm.assemble([asm.mov64_imm(R0, 0xFFFFFFFF)]) == asm.assemble([asm.mov64_imm(R0, -1)])


@pytest.mark.parametrize(
    "items, message",
    [
        ([asm.ja("nowhere")], "undefined label"),
        ([asm.label("x"), asm.label("x")], "defined twice"),
    ],
)
def test_label_errors(items, message):
    with pytest.raises(ValueError, match=message):
        asm.assemble(items)


@pytest.mark.parametrize(
    "make",
    [
        lambda: asm.mov64_imm(11, 0),
        lambda: asm.mov64_imm(R0, 1 << 32),
        lambda: asm.mov64_imm(R0, -(1 << 31) - 1),
        lambda: asm.atomic_add(B, R0, R1, 0),
    ],
    ids=["register-11", "imm-2^32", "imm-below-s32", "atomic-byte"],
)
def test_invalid_operands_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_unknown_helper_name_is_refused():
    with pytest.raises(KeyError):
        asm.call("no_such_helper")


def test_insn_count_rejects_partial_slots():
    with pytest.raises(ValueError):
        asm.insn_count(b"\0" * 12)
