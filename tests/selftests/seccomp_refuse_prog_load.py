"""Run a command with bpf(BPF_PROG_LOAD) refused by seccomp with EPERM: a host policy, simulated.

Usage: python tests/selftests/seccomp_refuse_prog_load.py COMMAND [ARGS...]

Some hosts refuse program loads to root (lockdown, an LSM, a sandbox): the suite must
report that as stated [environment] skips, not as failures of the kernel. A seccomp
filter installed before exec reproduces the refusal on any x86_64 host. Exit 77 when
the filter cannot be installed (not x86_64, seccomp unavailable).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
NR_BPF_X86_64 = 321
BPF_PROG_LOAD = 5
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
# classic BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
RET_K = 0x06
# offsets in struct seccomp_data
NR, ARCH, ARG0 = 0, 4, 16


def filter_program() -> bytes:
    """cBPF: bpf(BPF_PROG_LOAD, ...) -> EPERM; every other syscall allowed."""
    insns = [
        (LD_W_ABS, 0, 0, ARCH),
        (JEQ_K, 0, 5, AUDIT_ARCH_X86_64),      # other arch: allow
        (LD_W_ABS, 0, 0, NR),
        (JEQ_K, 0, 3, NR_BPF_X86_64),          # not bpf(2): allow
        (LD_W_ABS, 0, 0, ARG0),                # low 32 bits of cmd (little endian)
        (JEQ_K, 0, 1, BPF_PROG_LOAD),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


def install() -> None:
    """Install the filter in this process (inherited across exec); OSError when refused."""
    if platform.machine() != "x86_64":
        raise OSError("this simulation knows only x86_64's syscall numbers")
    libc = ctypes.CDLL(None, use_errno=True)
    program = ctypes.create_string_buffer(filter_program())
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = ctypes.create_string_buffer(
        struct.pack("=H6xQ", len(program.raw) // 8, ctypes.addressof(program)))
    ulong = ctypes.c_ulong  # prctl is variadic: a bare int would be passed as 32 bits
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, ulong(SECCOMP_MODE_FILTER), ulong(ctypes.addressof(fprog)),
                  ulong(0), ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    try:
        install()
    except OSError as err:
        print(f"seccomp_refuse_prog_load: cannot install the filter: {err}", file=sys.stderr)
        sys.exit(77)
    os.execvp(sys.argv[1], sys.argv[1:])
