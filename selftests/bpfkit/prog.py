"""BPF programs: load (with the verifier log on failure), attach to cgroups, links, iterators, info.

Stages take and return plain values (fds, ints, dataclasses); the caller owns every fd.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import asm, btf, syscall

# The BTF function an sk storage map iterator attaches to (5.9+).
SK_STORAGE_ITER_FUNC = "bpf_iter_bpf_sk_storage_map"

# Big enough for the verifier log of any program in this suite; older kernels reject
# log sizes of UINT_MAX >> 2 and above, so stay far below.
VERIFIER_LOG_SIZE = 4 << 20

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def _load(attr: syscall.ProgLoadAttr) -> int:
    return syscall.bpf(syscall.BPF_PROG_LOAD, attr)


def load_program(
    prog_type: int, insns: bytes, *, license: str = "GPL", expected_attach_type: int = 0,
    attach_btf_id: int = 0, name: str = "",
) -> int:
    """BPF_PROG_LOAD an assembled program; a rejection raises BpfError quoting the verifier log."""
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(license.encode())

    def attr(log: ctypes.Array | None) -> syscall.ProgLoadAttr:
        return syscall.ProgLoadAttr(
            prog_type=prog_type, insn_cnt=asm.insn_count(insns),
            insns=ctypes.addressof(insn_buf), license=ctypes.addressof(license_buf),
            log_level=1 if log is not None else 0,
            log_size=len(log) if log is not None else 0,
            log_buf=syscall.buffer_address(log),
            prog_name=name.encode()[: syscall.BPF_OBJ_NAME_LEN - 1],
            expected_attach_type=expected_attach_type, attach_btf_id=attach_btf_id,
        )

    try:
        return _load(attr(None))
    except syscall.BpfError as first:
        # Only a failed load pays for the log; the errno reported is the first load's, since
        # logging can itself change the outcome (ENOSPC when the log overflows).
        log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
        try:
            fd = _load(attr(log))
        except syscall.BpfError:
            pass
        else:
            os.close(fd)
        text = log.value.decode(errors="replace").strip()
        error = syscall.PolicyRefused if syscall.refused_by_policy(first) else syscall.BpfError
        raise error(
            first.errno, first.command, "verifier log:\n" + (text or "(empty)")
        ) from None


def load_sk_storage_iterator(program: bytes, name: str = "") -> int:
    """Load a BPF_TRACE_ITER program for sk storage maps (the map is named at attach).

    LookupError when the kernel's BTF has no sk storage iterator (before 5.9).
    """
    func_id = btf.kernel_btf().find(SK_STORAGE_ITER_FUNC, btf.BTF_KIND_FUNC)
    return load_program(syscall.BPF_PROG_TYPE_TRACING, program, name=name,
                        expected_attach_type=syscall.BPF_TRACE_ITER, attach_btf_id=func_id)


def attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    """BPF_PROG_ATTACH prog_fd to target_fd (e.g. a cgroup directory fd)."""
    attr = syscall.ProgAttachAttr(
        target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type, attach_flags=flags
    )
    syscall.bpf(syscall.BPF_PROG_ATTACH, attr)


def detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """BPF_PROG_DETACH prog_fd from target_fd."""
    attr = syscall.ProgAttachAttr(
        target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type
    )
    syscall.bpf(syscall.BPF_PROG_DETACH, attr)


@contextlib.contextmanager
def attached(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> Iterator[None]:
    """Keep prog_fd attached to target_fd for the duration of the block, detached after."""
    attach(prog_fd, target_fd, attach_type, flags)
    try:
        yield
    finally:
        detach(prog_fd, target_fd, attach_type)


def link_create(
    prog_fd: int, target_fd: int, attach_type: int, *, iter_map_fd: int | None = None
) -> int:
    """BPF_LINK_CREATE; iter_map_fd names the map a BPF_TRACE_ITER map iterator walks."""
    info = syscall.IterLinkInfo(map_fd=iter_map_fd or 0)
    attr = syscall.LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type)
    if iter_map_fd is not None:
        attr.iter_info = ctypes.addressof(info)
        attr.iter_info_len = ctypes.sizeof(info)
    return syscall.bpf(syscall.BPF_LINK_CREATE, attr)


def run_on_packet(prog_fd: int, data: bytes, repeat: int = 1) -> int:
    """BPF_PROG_TEST_RUN the program `repeat` times on a packet made of `data`; its return value."""
    data_buf = ctypes.create_string_buffer(data, len(data))
    attr = syscall.ProgTestRunAttr(prog_fd=prog_fd, data_size_in=len(data),
                               data_in=ctypes.addressof(data_buf), repeat=repeat)
    syscall.bpf(syscall.BPF_PROG_TEST_RUN, attr)
    return attr.retval


def iter_create(link_fd: int) -> int:
    """BPF_ITER_CREATE: a readable fd that runs the iterator program as it is read."""
    return syscall.bpf(syscall.BPF_ITER_CREATE, syscall.IterCreateAttr(link_fd=link_fd))


def read_iterator(link_fd: int) -> bytes:
    """Run an iterator link once to the end and return everything the program wrote."""
    fd = iter_create(link_fd)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProgInfo:
    """What BPF_OBJ_GET_INFO_BY_FD reports about a program."""

    type: int
    id: int
    name: str
    tag: str
    xlated_prog_len: int
    map_ids: tuple[int, ...]
    run_time_ns: int
    run_cnt: int


def prog_info(prog_fd: int) -> ProgInfo:
    """The kernel's record of a program, including the ids of the maps it uses."""
    raw = syscall.obj_info(prog_fd, syscall.ProgInfoStruct())
    ids: tuple[int, ...] = ()
    if raw.nr_map_ids:
        # Second call with room for the ids; the counters are re-read from the same call.
        buf = (ctypes.c_uint32 * raw.nr_map_ids)()
        raw = syscall.ProgInfoStruct(nr_map_ids=raw.nr_map_ids, map_ids=ctypes.addressof(buf))
        syscall.obj_info(prog_fd, raw)
        ids = tuple(buf[: raw.nr_map_ids])
    return ProgInfo(
        type=raw.type, id=raw.id, name=raw.name.decode(errors="replace"),
        tag=bytes(raw.tag).hex(), xlated_prog_len=raw.xlated_prog_len, map_ids=ids,
        run_time_ns=raw.run_time_ns, run_cnt=raw.run_cnt,
    )


@contextlib.contextmanager
def run_time_stats() -> Iterator[str]:
    """Turn on run_time_ns/run_cnt accounting for the block; yields which mechanism did it.

    BPF_ENABLE_STATS (5.8+) holds an fd; older kernels only have the sysctl, which is put
    back to its previous value even if the block fails.
    """
    try:
        fd = syscall.enable_stats(syscall.BPF_STATS_RUN_TIME)
    except syscall.BpfError as err:
        if err.errno != errno.EINVAL:
            raise
    else:
        try:
            yield "BPF_ENABLE_STATS"
        finally:
            os.close(fd)
        return
    with open(BPF_STATS_SYSCTL) as f:
        previous = f.read().strip()
    with open(BPF_STATS_SYSCTL, "w") as f:
        f.write("1")
    try:
        yield "kernel.bpf_stats_enabled"
    finally:
        with open(BPF_STATS_SYSCTL, "w") as f:
            f.write(previous)
