"""bpf(2) through ctypes: the kernel ABI layouts and one entry point that raises BpfError.

Every attr layout mirrors `union bpf_attr` in include/uapi/linux/bpf.h field by field.
A layout may be longer than an old kernel's union: the kernel accepts that as long as the
extra tail is zero, which it is for fields a test leaves unset.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform

# enum bpf_cmd (uapi, stable numbering).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_BTF_LOAD = 18
BPF_LINK_CREATE = 28
BPF_ENABLE_STATS = 32
BPF_ITER_CREATE = 33
BPF_LINK_DETACH = 34

COMMAND_NAMES = {
    value: name
    for name, value in globals().items()
    if name.startswith("BPF_") and isinstance(value, int)
}

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_SK_STORAGE = 24

# enum bpf_prog_type
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
BPF_PROG_TYPE_TRACING = 26

# enum bpf_attach_type
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_GETSOCKOPT = 21
BPF_CGROUP_SETSOCKOPT = 22
BPF_TRACE_ITER = 28

# Map creation flags.
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_CLONE = 1 << 9

# Element update/lookup flags.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

# bpf_sk_storage_get() flags.
BPF_SK_STORAGE_GET_F_CREATE = 1

# enum bpf_stats_type
BPF_STATS_RUN_TIME = 0

# Attach flags for BPF_PROG_ATTACH.
BPF_F_ALLOW_MULTI = 1 << 1

BPF_OBJ_NAME_LEN = 16

# The kernel-internal errno that sk storage returns for get_next_key; Python's errno module
# does not know it because it never reaches libc's tables.
ENOTSUPP = 524

_ERRNO_NAMES = dict(errno_mod.errorcode)
_ERRNO_NAMES[ENOTSUPP] = "ENOTSUPP"

# __NR_bpf per architecture (the syscall is not wrapped by glibc).
_NR_BPF = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "i386": 357,
    "i686": 357,
    "armv7l": 386,
    "s390x": 351,
    "ppc64le": 361,
    "ppc64": 361,
}

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class MapCreateAttr(ctypes.Structure):
    """BPF_MAP_CREATE."""

    _fields_ = [
        ("map_type", u32),
        ("key_size", u32),
        ("value_size", u32),
        ("max_entries", u32),
        ("map_flags", u32),
        ("inner_map_fd", u32),
        ("numa_node", u32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", u32),
        ("btf_fd", u32),
        ("btf_key_type_id", u32),
        ("btf_value_type_id", u32),
        ("btf_vmlinux_value_type_id", u32),
        ("map_extra", u64),
    ]


class MapElemAttr(ctypes.Structure):
    """BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM and BPF_MAP_GET_NEXT_KEY (value doubles as next_key)."""

    _fields_ = [
        ("map_fd", u32),
        ("key", u64),
        ("value", u64),
        ("flags", u64),
    ]


class ProgLoadAttr(ctypes.Structure):
    """BPF_PROG_LOAD."""

    _fields_ = [
        ("prog_type", u32),
        ("insn_cnt", u32),
        ("insns", u64),
        ("license", u64),
        ("log_level", u32),
        ("log_size", u32),
        ("log_buf", u64),
        ("kern_version", u32),
        ("prog_flags", u32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", u32),
        ("expected_attach_type", u32),
        ("prog_btf_fd", u32),
        ("func_info_rec_size", u32),
        ("func_info", u64),
        ("func_info_cnt", u32),
        ("line_info_rec_size", u32),
        ("line_info", u64),
        ("line_info_cnt", u32),
        ("attach_btf_id", u32),
        ("attach_prog_fd", u32),
    ]


class ProgAttachAttr(ctypes.Structure):
    """BPF_PROG_ATTACH / BPF_PROG_DETACH."""

    _fields_ = [
        ("target_fd", u32),
        ("attach_bpf_fd", u32),
        ("attach_type", u32),
        ("attach_flags", u32),
    ]


class GetIdAttr(ctypes.Structure):
    """BPF_{MAP,PROG}_GET_NEXT_ID and BPF_{MAP,PROG}_GET_FD_BY_ID (start_id doubles as the id)."""

    _fields_ = [
        ("start_id", u32),
        ("next_id", u32),
        ("open_flags", u32),
    ]


class InfoByFdAttr(ctypes.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""

    _fields_ = [
        ("bpf_fd", u32),
        ("info_len", u32),
        ("info", u64),
    ]


class BtfLoadAttr(ctypes.Structure):
    """BPF_BTF_LOAD."""

    _fields_ = [
        ("btf", u64),
        ("btf_log_buf", u64),
        ("btf_size", u32),
        ("btf_log_size", u32),
        ("btf_log_level", u32),
    ]


class LinkCreateAttr(ctypes.Structure):
    """BPF_LINK_CREATE (iter_info/iter_info_len used by BPF_TRACE_ITER links)."""

    _fields_ = [
        ("prog_fd", u32),
        ("target_fd", u32),
        ("attach_type", u32),
        ("flags", u32),
        ("iter_info", u64),
        ("iter_info_len", u32),
    ]


class IterLinkInfo(ctypes.Structure):
    """union bpf_iter_link_info, map member: which map a map-element iterator walks."""

    _fields_ = [("map_fd", u32)]


class ProgTestRunAttr(ctypes.Structure):
    """BPF_PROG_TEST_RUN (fields up to batch_size, 5.18; older kernels see zeros past theirs)."""

    _fields_ = [
        ("prog_fd", u32),
        ("retval", u32),
        ("data_size_in", u32),
        ("data_size_out", u32),
        ("data_in", u64),
        ("data_out", u64),
        ("repeat", u32),
        ("duration", u32),
        ("ctx_size_in", u32),
        ("ctx_size_out", u32),
        ("ctx_in", u64),
        ("ctx_out", u64),
        ("flags", u32),
        ("cpu", u32),
        ("batch_size", u32),
    ]


class EnableStatsAttr(ctypes.Structure):
    """BPF_ENABLE_STATS."""

    _fields_ = [("type", u32)]


class IterCreateAttr(ctypes.Structure):
    """BPF_ITER_CREATE."""

    _fields_ = [("link_fd", u32), ("flags", u32)]


class LinkDetachAttr(ctypes.Structure):
    """BPF_LINK_DETACH."""

    _fields_ = [("link_fd", u32)]


class MapInfoStruct(ctypes.Structure):
    """struct bpf_map_info, as filled by BPF_OBJ_GET_INFO_BY_FD on a map fd."""

    _fields_ = [
        ("type", u32),
        ("id", u32),
        ("key_size", u32),
        ("value_size", u32),
        ("max_entries", u32),
        ("map_flags", u32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", u32),
        ("btf_vmlinux_value_type_id", u32),
        ("netns_dev", u64),
        ("netns_ino", u64),
        ("btf_id", u32),
        ("btf_key_type_id", u32),
        ("btf_value_type_id", u32),
        ("_pad", u32),
        ("map_extra", u64),
    ]


class ProgInfoStruct(ctypes.Structure):
    """struct bpf_prog_info, as filled by BPF_OBJ_GET_INFO_BY_FD on a program fd."""

    _fields_ = [
        ("type", u32),
        ("id", u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", u32),
        ("xlated_prog_len", u32),
        ("jited_prog_insns", u64),
        ("xlated_prog_insns", u64),
        ("load_time", u64),
        ("created_by_uid", u32),
        ("nr_map_ids", u32),
        ("map_ids", u64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", u32),
        ("gpl_compatible", u32),
        ("netns_dev", u64),
        ("netns_ino", u64),
        ("nr_jited_ksyms", u32),
        ("nr_jited_func_lens", u32),
        ("jited_ksyms", u64),
        ("jited_func_lens", u64),
        ("btf_id", u32),
        ("func_info_rec_size", u32),
        ("func_info", u64),
        ("nr_func_info", u32),
        ("nr_line_info", u32),
        ("line_info", u64),
        ("jited_line_info", u64),
        ("nr_jited_line_info", u32),
        ("line_info_rec_size", u32),
        ("jited_line_info_rec_size", u32),
        ("nr_prog_tags", u32),
        ("prog_tags", u64),
        ("run_time_ns", u64),
        ("run_cnt", u64),
    ]


class BpfError(OSError):
    """A failed bpf(2) command: `.errno` is the kernel's errno, `.command` the command name."""

    def __init__(self, err: int, command: str, detail: str = "") -> None:
        super().__init__(err, os.strerror(err) if err != ENOTSUPP else "Operation not supported")
        self.command = command
        self.detail = detail

    @property
    def errno_name(self) -> str:
        """Symbolic errno, e.g. "EINVAL", for messages."""
        return _ERRNO_NAMES.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        text = f"{self.command} failed: {self.errno_name} ({self.strerror})"
        if self.detail:
            text += "\n" + self.detail
        return text


class PolicyRefused(BpfError):
    """EPERM to a caller with every capability: a host policy (lockdown, an LSM, a sandbox)
    vetoed the command, not the feature under test. The suite reports it as an
    environment skip; the runner's guests have no such policy, so there it fails.

    Every instance is counted (`raised`, `last`), so a test that caught one, say inside
    pytest.raises expecting a verifier rejection, cannot pass or fail on it unnoticed.
    """

    raised = 0
    last: PolicyRefused | None = None

    def __init__(self, err: int, command: str, detail: str = "") -> None:
        super().__init__(err, command, detail)
        PolicyRefused.raised += 1
        PolicyRefused.last = self


def refused_by_policy(err: BpfError) -> bool:
    """Whether `err` is EPERM although this process is root (CAP_SYS_ADMIN and CAP_BPF)."""
    return err.errno == errno_mod.EPERM and os.geteuid() == 0


def errno_name(err: int) -> str:
    """Symbolic name of an errno value, including the kernel-internal ENOTSUPP."""
    return _ERRNO_NAMES.get(err, str(err))


def _syscall_number() -> int:
    machine = platform.machine()
    if machine not in _NR_BPF:
        raise OSError(errno_mod.ENOSYS, f"bpf(2) syscall number unknown for machine {machine!r}")
    return _NR_BPF[machine]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf(cmd: int, attr: ctypes.Structure, detail: str = "") -> int:
    """Issue bpf(cmd, &attr, sizeof(attr)); return the result or raise BpfError naming cmd."""
    ctypes.set_errno(0)
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number()),
        ctypes.c_int(cmd),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if ret < 0:
        raise BpfError(ctypes.get_errno(), COMMAND_NAMES.get(cmd, f"bpf cmd {cmd}"), detail)
    return ret


def buffer_address(buf: ctypes.Array | ctypes.Structure | None) -> int:
    """Address of a ctypes buffer as the u64 the attr fields want (0 for None)."""
    return 0 if buf is None else ctypes.addressof(buf)


def obj_info(fd: int, info: ctypes.Structure) -> ctypes.Structure:
    """Fill `info` (a MapInfoStruct/ProgInfoStruct instance) with BPF_OBJ_GET_INFO_BY_FD."""
    attr = InfoByFdAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


def next_id(cmd: int, start_id: int) -> int | None:
    """The next object id after start_id for a *_GET_NEXT_ID command, None at the end."""
    attr = GetIdAttr(start_id=start_id)
    try:
        bpf(cmd, attr)
    except BpfError as err:
        if err.errno == errno_mod.ENOENT:
            return None
        raise
    return attr.next_id


def enable_stats(stats_type: int = BPF_STATS_RUN_TIME) -> int:
    """BPF_ENABLE_STATS: returns an fd; run-time stats stay on until every such fd is closed."""
    return bpf(BPF_ENABLE_STATS, EnableStatsAttr(type=stats_type))
