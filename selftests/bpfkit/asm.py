"""A small eBPF assembler: readable test programs written in Python, encoded exactly.

Encoding (include/uapi/linux/bpf.h, Documentation/bpf/instruction-set.rst): each instruction
is 8 bytes little-endian: opcode u8, dst_reg (low nibble) | src_reg (high nibble) u8,
off s16, imm s32. LD_IMM64 takes two slots, the second carrying the upper 32 bits of imm.

A program is a list of instructions and `label(name)` markers; jumps name their target
label and `assemble()` turns it into the 16-bit slot offset the kernel expects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

# Registers.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10

# Instruction classes.
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_JMP32 = 0x06
BPF_ALU64 = 0x07

# Operand source.
BPF_K = 0x00
BPF_X = 0x08

# Load/store sizes.
W = 0x00
H = 0x08
B = 0x10
DW = 0x18
SIZE_BYTES = {B: 1, H: 2, W: 4, DW: 8}

# Load/store modes.
BPF_IMM = 0x00
BPF_MEM = 0x60
BPF_ATOMIC = 0xC0

# ALU operations.
ADD = 0x00
SUB = 0x10
MUL = 0x20
DIV = 0x30
OR = 0x40
AND = 0x50
LSH = 0x60
RSH = 0x70
NEG = 0x80
MOD = 0x90
XOR = 0xA0
MOV = 0xB0
ARSH = 0xC0

# Jump operations.
JA = 0x00
JEQ = 0x10
JGT = 0x20
JGE = 0x30
JSET = 0x40
JNE = 0x50
JSGT = 0x60
JSGE = 0x70
CALL = 0x80
EXIT = 0x90
JLT = 0xA0
JLE = 0xB0
JSLT = 0xC0
JSLE = 0xD0

# src_reg of LD_IMM64: the immediate is a map fd the verifier replaces with the map pointer.
BPF_PSEUDO_MAP_FD = 1

# Helper ids from __BPF_FUNC_MAPPER (uapi: the numbering never changes once released).
HELPERS = {
    "map_lookup_elem": 1,
    "map_update_elem": 2,
    "map_delete_elem": 3,
    "probe_read": 4,
    "ktime_get_ns": 5,
    "trace_printk": 6,
    "get_prandom_u32": 7,
    "get_smp_processor_id": 8,
    "get_current_pid_tgid": 14,
    "get_current_uid_gid": 15,
    "skb_load_bytes": 26,
    "get_socket_cookie": 46,
    "get_local_storage": 81,
    "sk_lookup_tcp": 84,
    "sk_release": 86,
    "spin_lock": 93,
    "spin_unlock": 94,
    "sk_fullsock": 95,
    "sk_storage_get": 107,
    "sk_storage_delete": 108,
    "probe_read_kernel": 113,
    "seq_printf": 126,
    "seq_write": 127,
}


@dataclass(frozen=True)
class Insn:
    """One 8-byte instruction; `target` is a label a jump still has to be resolved against."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None

    def encode(self, off: int | None = None) -> bytes:
        """The 8 little-endian bytes of this instruction (off overrides a resolved jump)."""
        return struct.pack(
            "<BBhi",
            self.code,
            (self.src << 4) | self.dst,
            self.off if off is None else off,
            self.imm,
        )


@dataclass(frozen=True)
class Label:
    """A jump target marker; takes no space in the program."""

    name: str


@dataclass(frozen=True)
class Wide:
    """A 16-byte LD_IMM64 instruction (two slots)."""

    dst: int
    imm64: int
    src: int = 0

    def encode(self) -> bytes:
        """Both slots: the low half of imm in the first, the high half in the second."""
        low = self.imm64 & 0xFFFFFFFF
        high = (self.imm64 >> 32) & 0xFFFFFFFF
        first = struct.pack("<BBhI", BPF_LD | DW | BPF_IMM, (self.src << 4) | self.dst, 0, low)
        second = struct.pack("<BBhI", 0, 0, 0, high)
        return first + second


Item = Union[Insn, Label, Wide]


def _check_reg(reg: int) -> int:
    if not 0 <= reg <= 10:
        raise ValueError(f"register r{reg} does not exist (r0-r10)")
    return reg


def _imm32(imm: int) -> int:
    if not -(1 << 31) <= imm < (1 << 32):
        raise ValueError(f"immediate {imm} does not fit in 32 bits")
    # Stored as s32: fold unsigned values above INT_MAX to their two's-complement form.
    return imm - (1 << 32) if imm >= (1 << 31) else imm


def label(name: str) -> Label:
    """Mark the position the jumps naming `name` land on."""
    return Label(name)


def alu64_imm(op: int, dst: int, imm: int) -> Insn:
    """dst = dst OP imm on 64 bits."""
    return Insn(BPF_ALU64 | op | BPF_K, _check_reg(dst), 0, 0, _imm32(imm))


def alu64_reg(op: int, dst: int, src: int) -> Insn:
    """dst = dst OP src on 64 bits."""
    return Insn(BPF_ALU64 | op | BPF_X, _check_reg(dst), _check_reg(src))


def alu32_imm(op: int, dst: int, imm: int) -> Insn:
    """dst = (u32)(dst OP imm); the upper half is zeroed."""
    return Insn(BPF_ALU | op | BPF_K, _check_reg(dst), 0, 0, _imm32(imm))


def alu32_reg(op: int, dst: int, src: int) -> Insn:
    """dst = (u32)(dst OP src); the upper half is zeroed."""
    return Insn(BPF_ALU | op | BPF_X, _check_reg(dst), _check_reg(src))


def mov64_imm(dst: int, imm: int) -> Insn:
    """dst = imm (sign-extended to 64 bits)."""
    return alu64_imm(MOV, dst, imm)


def mov64_reg(dst: int, src: int) -> Insn:
    """dst = src."""
    return alu64_reg(MOV, dst, src)


def mov32_imm(dst: int, imm: int) -> Insn:
    """dst = (u32)imm."""
    return alu32_imm(MOV, dst, imm)


def _jump(cls: int, op: int, source: int, dst: int, src: int, imm: int, target: str | int) -> Insn:
    if isinstance(target, int):
        return Insn(cls | op | source, _check_reg(dst), _check_reg(src), target, _imm32(imm))
    return Insn(cls | op | source, _check_reg(dst), _check_reg(src), 0, _imm32(imm), target)


def jmp_imm(op: int, dst: int, imm: int, target: str | int) -> Insn:
    """if (dst OP imm) goto target, comparing 64 bits."""
    return _jump(BPF_JMP, op, BPF_K, dst, 0, imm, target)


def jmp_reg(op: int, dst: int, src: int, target: str | int) -> Insn:
    """if (dst OP src) goto target, comparing 64 bits."""
    return _jump(BPF_JMP, op, BPF_X, dst, src, 0, target)


def jmp32_imm(op: int, dst: int, imm: int, target: str | int) -> Insn:
    """if ((u32)dst OP imm) goto target."""
    return _jump(BPF_JMP32, op, BPF_K, dst, 0, imm, target)


def jmp32_reg(op: int, dst: int, src: int, target: str | int) -> Insn:
    """if ((u32)dst OP (u32)src) goto target."""
    return _jump(BPF_JMP32, op, BPF_X, dst, src, 0, target)


def ja(target: str | int) -> Insn:
    """goto target."""
    return _jump(BPF_JMP, JA, BPF_K, 0, 0, 0, target)


def ld_imm64(dst: int, imm64: int) -> Wide:
    """dst = imm64 (two instruction slots)."""
    return Wide(_check_reg(dst), imm64 & 0xFFFFFFFFFFFFFFFF)


def ld_map_fd(dst: int, map_fd: int) -> Wide:
    """dst = the map behind map_fd (the verifier rewrites the fd into a map pointer)."""
    return Wide(_check_reg(dst), map_fd, BPF_PSEUDO_MAP_FD)


def ldx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off)."""
    return Insn(BPF_LDX | size | BPF_MEM, _check_reg(dst), _check_reg(src), off)


def stx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    """*(size *)(dst + off) = src."""
    return Insn(BPF_STX | size | BPF_MEM, _check_reg(dst), _check_reg(src), off)


def st_mem(size: int, dst: int, off: int, imm: int) -> Insn:
    """*(size *)(dst + off) = imm."""
    return Insn(BPF_ST | size | BPF_MEM, _check_reg(dst), 0, off, _imm32(imm))


def atomic_add(size: int, dst: int, src: int, off: int) -> Insn:
    """lock *(size *)(dst + off) += src (the classic XADD encoding, imm = BPF_ADD)."""
    if size not in (W, DW):
        raise ValueError("atomic add exists only for W and DW")
    return Insn(BPF_STX | size | BPF_ATOMIC, _check_reg(dst), _check_reg(src), off, ADD)


def call(helper: str | int) -> Insn:
    """Call a helper by its name in HELPERS (or by raw id, for deliberately odd programs)."""
    helper_id = helper if isinstance(helper, int) else HELPERS[helper]
    return Insn(BPF_JMP | CALL, 0, 0, 0, helper_id)


def exit_insn() -> Insn:
    """return r0."""
    return Insn(BPF_JMP | EXIT)


def _slots(item: Item) -> int:
    if isinstance(item, Label):
        return 0
    return 2 if isinstance(item, Wide) else 1


def assemble(items: Iterable[Item]) -> bytes:
    """Encode a program, resolving label jumps to slot offsets relative to the next slot."""
    items = list(items)
    positions: dict[str, int] = {}
    slot = 0
    for item in items:
        if isinstance(item, Label):
            if item.name in positions:
                raise ValueError(f"label {item.name!r} defined twice")
            positions[item.name] = slot
        slot += _slots(item)

    out = bytearray()
    slot = 0
    for item in items:
        if isinstance(item, Insn) and item.target is not None:
            if item.target not in positions:
                raise ValueError(f"jump to undefined label {item.target!r}")
            offset = positions[item.target] - (slot + 1)
            if not -(1 << 15) <= offset < (1 << 15):
                raise ValueError(f"jump to {item.target!r} is out of 16-bit range")
            out += item.encode(offset)
        elif not isinstance(item, Label):
            out += item.encode()
        slot += _slots(item)
    return bytes(out)


def insn_count(program: bytes) -> int:
    """Number of 8-byte slots in an assembled program."""
    if len(program) % 8:
        raise ValueError("an assembled program is a whole number of 8-byte slots")
    return len(program) // 8
