"""Feature probes: does this kernel have X? Answered by trying X, never by parsing a version.

`require(name)` skips the calling test with a reason naming the feature and the release
that brought it ("kernel lacks BPF_F_CLONE (5.4+)"), so no test can pass on a kernel that
lacks what it checks. Probes answer False only for the kernel's "don't know that" errno;
anything else is a real failure and propagates.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from dataclasses import dataclass
from typing import Callable

from . import asm, btf, maps, prog, syscall

SK_STORAGE_ITER_FUNC = "bpf_iter_bpf_sk_storage_map"
SK_STORAGE_FREE_FUNC = "bpf_sk_storage_free"


@dataclass(frozen=True)
class Feature:
    """A kernel feature: what to call it in a skip reason, since when, how to detect it."""

    what: str
    since: str
    probe: Callable[[], bool]


def _rejected_as_unknown(call: Callable[[], int], *unknown_errnos: int) -> bool:
    """Run a call returning an fd: True if it worked, False on one of unknown_errnos."""
    try:
        fd = call()
    except syscall.BpfError as err:
        if err.errno in unknown_errnos:
            return False
        raise
    os.close(fd)
    return True


def probe_bpf_syscall() -> bool:
    """bpf(2) itself: an array map can be created (ENOSYS without CONFIG_BPF_SYSCALL)."""
    return _rejected_as_unknown(
        lambda: maps.create_map(syscall.BPF_MAP_TYPE_ARRAY, 4, 4, 1), errno.ENOSYS
    )


def probe_btf_load() -> bool:
    """BPF_BTF_LOAD (4.18): sk storage maps cannot exist without it."""
    builder = btf.BtfBuilder()
    builder.add_int("int", 4, signed=True)
    return _rejected_as_unknown(lambda: btf.load_btf(builder.encode()), errno.EINVAL)


def probe_sk_storage_map() -> bool:
    """BPF_MAP_TYPE_SK_STORAGE (5.2): the canonical map can be created."""
    return _rejected_as_unknown(lambda: maps.create_sk_storage_map(8), errno.EINVAL)


def probe_spin_lock_value() -> bool:
    """A bpf_spin_lock inside an sk storage value (5.2): such a map can be created."""
    return _rejected_as_unknown(
        lambda: maps.create_sk_storage_map(8, spin_lock=True), errno.EINVAL, syscall.ENOTSUPP
    )


def probe_clone_flag() -> bool:
    """BPF_F_CLONE (5.4): accepted as a map flag."""
    flags = syscall.BPF_F_NO_PREALLOC | syscall.BPF_F_CLONE
    return _rejected_as_unknown(lambda: maps.create_sk_storage_map(8, map_flags=flags), errno.EINVAL)


def probe_enable_stats() -> bool:
    """BPF_ENABLE_STATS (5.8): the command exists."""
    return _rejected_as_unknown(syscall.enable_stats, errno.EINVAL)


def probe_kernel_btf() -> bool:
    """The kernel's own BTF at /sys/kernel/btf/vmlinux (5.4, CONFIG_DEBUG_INFO_BTF)."""
    try:
        btf.kernel_btf()
    except FileNotFoundError:
        return False
    return True


def probe_sk_storage_iter() -> bool:
    """bpf_iter over sk storage maps (5.9): a trivial iterator program links to a map."""
    if not probe_kernel_btf():
        return False
    try:
        func_id = btf.kernel_btf().find(SK_STORAGE_ITER_FUNC, btf.BTF_KIND_FUNC)
    except LookupError:
        return False
    # return 0: the least a map-element iterator program can do.
    program = asm.assemble([asm.mov64_imm(asm.R0, 0), asm.exit_insn()])
    prog_fd = prog.load_program(
        syscall.BPF_PROG_TYPE_TRACING, program,
        expected_attach_type=syscall.BPF_TRACE_ITER, attach_btf_id=func_id,
    )
    map_fd = maps.create_sk_storage_map(8)
    try:
        return _rejected_as_unknown(
            lambda: prog.link_create(prog_fd, 0, syscall.BPF_TRACE_ITER, iter_map_fd=map_fd),
            errno.EINVAL,
        )
    finally:
        os.close(map_fd)
        os.close(prog_fd)


def probe_sk_storage_fexit() -> bool:
    """fexit on bpf_sk_storage_free() (5.5): BPF trampolines (JIT, ftrace), kernel BTF, no LSM veto."""
    from . import tracing  # only this probe needs trampolines

    return probe_kernel_btf() and tracing.trampolines_work(SK_STORAGE_FREE_FUNC)


def probe_diag_storages() -> bool:
    """INET_DIAG_REQ_SK_BPF_STORAGES (5.7): a socket's storage comes back in its diag record.

    Older kernels ignore the request attribute, so the answer is whether the value returns.
    A TCP listener is asked because the UDP dump of some kernels (seen on 6.18) omits
    storages even where TCP has them.
    """
    from . import sockdiag  # only this probe needs netlink

    map_fd = maps.create_sk_storage_map(8)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        maps.update(map_fd, sock.fileno(), b"diagprob")
        record = sockdiag.socket_record(sock, meminfo=False, map_fds=[map_fd])
        return record.storages.get(maps.map_info(map_fd).id) == b"diagprob"
    finally:
        sock.close()
        os.close(map_fd)


FEATURES = {
    "bpf_syscall": Feature("the bpf(2) syscall", "3.18", probe_bpf_syscall),
    "btf_load": Feature("BPF_BTF_LOAD", "4.18", probe_btf_load),
    "sk_storage_map": Feature("BPF_MAP_TYPE_SK_STORAGE", "5.2", probe_sk_storage_map),
    "spin_lock_value": Feature("bpf_spin_lock in sk storage values", "5.2", probe_spin_lock_value),
    "clone_flag": Feature("BPF_F_CLONE", "5.4", probe_clone_flag),
    "kernel_btf": Feature("kernel BTF in /sys/kernel/btf/vmlinux", "5.4", probe_kernel_btf),
    "diag_storages": Feature("INET_DIAG_REQ_SK_BPF_STORAGES", "5.7", probe_diag_storages),
    "enable_stats": Feature("BPF_ENABLE_STATS", "5.8", probe_enable_stats),
    "sk_storage_iter": Feature("bpf_iter for sk storage maps", "5.9", probe_sk_storage_iter),
    "sk_storage_fexit": Feature(
        "fexit on bpf_sk_storage_free() (BPF trampolines: JIT and ftrace, not refused by an LSM)",
        "5.5",
        probe_sk_storage_fexit),
}


@functools.cache
def has(name: str) -> bool:
    """Whether the running kernel has feature `name` (a FEATURES key); probed once."""
    return FEATURES[name].probe()


def missing_reason(name: str) -> str:
    """The skip reason for a missing feature, e.g. "kernel lacks BPF_F_CLONE (5.4+)"."""
    feature = FEATURES[name]
    return f"kernel lacks {feature.what} ({feature.since}+)"


def require(name: str) -> None:
    """Skip the calling test unless the kernel has feature `name`."""
    import pytest

    if not has(name):
        pytest.skip(missing_reason(name))


def require_ipv6() -> None:
    """Skip the calling test when ::1 cannot be bound (a guest or container without IPv6)."""
    import pytest

    from . import sockets

    if not sockets.ipv6_available():
        pytest.skip("IPv6 loopback (::1) is not available on this system")
