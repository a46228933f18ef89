"""fentry/fexit programs on kernel functions (BPF trampolines, Linux 5.5+, need the BPF JIT).

A BPF_PROG_TYPE_TRACING program names its target by the id of a FUNC in the kernel's own
BTF (attach_btf_id); its context is the target's arguments as an array of u64 (for fexit
followed by the return value), each pointer argument typed from BTF so the program may
read the object's members directly. BPF_RAW_TRACEPOINT_OPEN with no name attaches it to
the trampoline and returns a link fd: the program runs until that fd is closed.
"""

from __future__ import annotations

import ctypes
import errno
import os

from . import asm, btf, prog, syscall

BPF_RAW_TRACEPOINT_OPEN = 17
BPF_TRACE_FENTRY = 24
BPF_TRACE_FEXIT = 25

# What a kernel without usable trampolines answers: EINVAL for an unknown attach type
# (< 5.5), ENOTSUPP/EOPNOTSUPP when the JIT, ftrace or the architecture cannot build a
# trampoline. EPERM to root is a host policy (lockdown, an LSM: seen on a 6.18 host, empty
# verifier log) and surfaces as syscall.PolicyRefused, judged as an environment skip.
UNSUPPORTED_ERRNOS = (errno.EINVAL, errno.EOPNOTSUPP, syscall.ENOTSUPP)


class RawTracepointOpenAttr(ctypes.Structure):
    """BPF_RAW_TRACEPOINT_OPEN (name 0: attach a tracing program to its BTF target)."""

    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32)]


def func_id(name: str) -> int:
    """The kernel BTF id of FUNC `name`; LookupError when the kernel has no such function."""
    return btf.kernel_btf().find(name, btf.BTF_KIND_FUNC)


def load(insns: bytes, target: str, attach_type: int = BPF_TRACE_FEXIT, name: str = "") -> int:
    """Load a tracing program for the kernel function `target`; returns the program fd."""
    return prog.load_program(
        syscall.BPF_PROG_TYPE_TRACING, insns, expected_attach_type=attach_type,
        attach_btf_id=func_id(target), name=name)


def attach(prog_fd: int) -> int:
    """Attach a loaded fentry/fexit program to its target; close the returned fd to detach."""
    try:
        return syscall.bpf(BPF_RAW_TRACEPOINT_OPEN, RawTracepointOpenAttr(name=0, prog_fd=prog_fd))
    except syscall.BpfError as err:
        if syscall.refused_by_policy(err):
            raise syscall.PolicyRefused(err.errno, err.command, "attaching a trampoline") from None
        raise


def trampolines_work(target: str) -> bool:
    """Whether a trivial fexit program on `target` loads and attaches here."""
    try:
        prog_fd = load(asm.assemble([asm.mov64_imm(asm.R0, 0), asm.exit_insn()]), target)
    except LookupError:
        return False
    except syscall.PolicyRefused:
        raise
    except syscall.BpfError as err:
        if err.errno in UNSUPPORTED_ERRNOS:
            return False
        raise
    try:
        link_fd = attach(prog_fd)
    except syscall.PolicyRefused:
        raise
    except syscall.BpfError as err:
        if err.errno in UNSUPPORTED_ERRNOS:
            return False
        raise
    finally:
        os.close(prog_fd)
    os.close(link_fd)
    return True
