"""Feature probes: does this kernel have X? Answered by trying X, then judged by the release.

A probe tries the feature and answers True, or False for the kernel's "don't know that"
errno. Whether a missing feature is a skip or a failure is not the probe's call but the
expectation table's (selftests/expectations/features.json): `require(name)` skips only a
kernel older than the feature's first release ("[older kernel] ..."), a kernel built
without a needed CONFIG_ ("[kernel config] ..."), or a host policy that refused the probe
to root ("[environment] ..."). A kernel that must have the feature and refuses it FAILS
the test, naming the feature, the kernel and the errno: a broken kernel cannot pass by
skipping. The bracketed category opens every skip reason the suite gives; the runner
accepts only [older kernel] and [kernel config] in the guests it boots.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import asm, btf, kernel, maps, prog, syscall

FEATURES_FILE = Path(__file__).resolve().parent.parent / "expectations" / "features.json"

# Skip-reason categories: the first word of every skip the suite emits.
OLDER_KERNEL = "[older kernel]"
KERNEL_CONFIG = "[kernel config]"
ENVIRONMENT = "[environment]"
NOT_ROOT = "[not root]"

SK_STORAGE_ITER_FUNC = prog.SK_STORAGE_ITER_FUNC
SK_STORAGE_FREE_FUNC = "bpf_sk_storage_free"


@dataclass(frozen=True)
class Feature:
    """A kernel feature: what to call it, since which release, which CONFIG_s, how to detect it."""

    what: str
    since: str
    config: tuple[str, ...]
    probe: Callable[[], bool]


class Absent(Exception):
    """A probe's answer "no", with what was tried and what the kernel said."""


def _rejected_as_unknown(call: Callable[[], int], *unknown_errnos: int) -> bool:
    """Run a call returning an fd: True if it worked, Absent on one of unknown_errnos."""
    try:
        fd = call()
    except syscall.PolicyRefused:
        raise
    except syscall.BpfError as err:
        if err.errno in unknown_errnos:
            raise Absent(f"{err.command} failed with {err.errno_name}") from None
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
        raise Absent("/sys/kernel/btf/vmlinux does not exist") from None
    return True


def probe_sk_storage_iter() -> bool:
    """bpf_iter over sk storage maps (5.9): a trivial iterator program links to a map."""
    probe_kernel_btf()
    # return 0: the least a map-element iterator program can do.
    program = asm.assemble([asm.mov64_imm(asm.R0, 0), asm.exit_insn()])
    try:
        prog_fd = prog.load_sk_storage_iterator(program)
    except LookupError:
        raise Absent(f"kernel BTF has no FUNC {SK_STORAGE_ITER_FUNC}") from None
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

    probe_kernel_btf()
    if not tracing.trampolines_work(SK_STORAGE_FREE_FUNC):
        raise Absent(f"a trivial fexit program on {SK_STORAGE_FREE_FUNC} did not load or attach")
    return True


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
        if record.storages.get(maps.map_info(map_fd).id) != b"diagprob":
            raise Absent("the socket's storage did not come back in its sock_diag record")
        return True
    finally:
        sock.close()
        os.close(map_fd)


def probe_sk_storage_tracing_helpers() -> bool:
    """bpf_sk_storage_get from an fentry program (5.11): loads and attaches on tcp_close()."""
    from . import tracing  # only this probe needs trampolines

    probe_kernel_btf()
    map_fd = maps.create_sk_storage_map(8)
    try:
        program = asm.assemble([
            asm.ldx_mem(asm.DW, asm.R2, asm.R1, 0),          # r2 = sk (tcp_close's first argument)
            asm.ld_map_fd(asm.R1, map_fd),
            asm.mov64_imm(asm.R3, 0),
            asm.mov64_imm(asm.R4, 0),
            asm.call("sk_storage_get"),
            asm.mov64_imm(asm.R0, 0),
            asm.exit_insn(),
        ])
        try:
            prog_fd = tracing.load(program, "tcp_close", tracing.BPF_TRACE_FENTRY)
        except syscall.PolicyRefused:
            raise
        except syscall.BpfError as err:
            # A kernel without the tracing proto rejects the call in the verifier (EINVAL).
            raise Absent(f"an fentry program calling bpf_sk_storage_get: {err.command} "
                         f"failed with {err.errno_name}") from None
        try:
            os.close(tracing.attach(prog_fd))
        finally:
            os.close(prog_fd)
    finally:
        os.close(map_fd)
    return True


_PROBES: dict[str, Callable[[], bool]] = {
    "bpf_syscall": probe_bpf_syscall,
    "btf_load": probe_btf_load,
    "sk_storage_map": probe_sk_storage_map,
    "spin_lock_value": probe_spin_lock_value,
    "clone_flag": probe_clone_flag,
    "kernel_btf": probe_kernel_btf,
    "sk_storage_fexit": probe_sk_storage_fexit,
    "diag_storages": probe_diag_storages,
    "enable_stats": probe_enable_stats,
    "sk_storage_iter": probe_sk_storage_iter,
    "sk_storage_tracing_helpers": probe_sk_storage_tracing_helpers,
}


def load_features(path: Path = FEATURES_FILE) -> dict[str, Feature]:
    """The expectation table joined with its probes; a name without a probe (or vice versa) is a bug."""
    table = {name: entry for name, entry in json.loads(path.read_text()).items()
             if not name.startswith("_")}
    if set(table) != set(_PROBES):
        raise ValueError(f"{path}: features {sorted(set(table) ^ set(_PROBES))} "
                         "are in only one of the table and bpfkit/probes.py")
    return {name: Feature(entry["what"], entry["since"], tuple(entry["config"]), _PROBES[name])
            for name, entry in table.items()}


FEATURES = load_features()


@dataclass(frozen=True)
class Status:
    """A probe's verdict: present, or absent with the kernel's answer; policy when root got EPERM."""

    present: bool
    detail: str = ""
    policy: bool = False


@functools.cache
def status(name: str) -> Status:
    """Probe feature `name` once; never raises for a kernel answer."""
    try:
        FEATURES[name].probe()
    except syscall.PolicyRefused as err:
        return Status(False, f"{err.command} failed with {err.errno_name}", policy=True)
    except Absent as absent:
        return Status(False, str(absent))
    except syscall.BpfError as err:
        # EPERM to root on any bpf(2) command (a container's seccomp profile, lockdown)
        # is the host's policy, not the kernel's answer.
        return Status(False, f"{err.command} failed with {err.errno_name}",
                      policy=syscall.refused_by_policy(err))
    return Status(True)


def has(name: str) -> bool:
    """Whether the running kernel has feature `name` (a FEATURES key); probed once."""
    return status(name).present


def unset_config(name: str, config: dict[str, str] | None) -> list[str]:
    """The feature's CONFIG_ symbols that a readable config leaves unset (none if unreadable)."""
    if config is None:
        return []
    return [symbol for symbol in FEATURES[name].config if config.get(symbol, "n") == "n"]


def judge_missing(name: str, probe: Status, identity: kernel.KernelIdentity,
                  config: dict[str, str] | None) -> tuple[str, str]:
    """("skip" | "fail", message) for a feature the probe did not find on this kernel."""
    feature = FEATURES[name]
    if probe.policy:
        return "skip", (f"{ENVIRONMENT} this host refused {feature.what} to root ({probe.detail}): "
                        "lockdown, an LSM or a sandbox policy")
    if identity.version < kernel.parse_version(feature.since):
        return "skip", (f"{OLDER_KERNEL} kernel {identity.describe()} lacks {feature.what} "
                        f"({feature.since}+)")
    unset = unset_config(name, config)
    if unset:
        return "skip", (f"{KERNEL_CONFIG} kernel {identity.describe()} was built without "
                        f"{', '.join(unset)}, needed for {feature.what}")
    return "fail", (f"kernel {identity.describe()} must have {feature.what} (since "
                    f"{feature.since}) but {probe.detail}")


def missing_reason(name: str) -> str:
    """Why feature `name` is missing here, as the skip or failure message require() gives."""
    return judge_missing(name, status(name), kernel.running(), kernel.config())[1]


def absent(what: str, since: str, detail: str) -> None:
    """A test found `what` (upstream since `since`) missing: skip an older kernel, else fail.

    For features a test discovers itself instead of through a probe of the table.
    """
    import pytest

    identity = kernel.running()
    if identity.version < kernel.parse_version(since):
        pytest.skip(f"{OLDER_KERNEL} kernel {identity.describe()} lacks {what} ({since}+)")
    pytest.fail(f"kernel {identity.describe()} must have {what} (since {since}) but {detail}",
                pytrace=False)


def require(name: str) -> None:
    """Return if the kernel has feature `name`; else skip (stated reason) or fail (it must have it)."""
    import pytest

    probe = status(name)
    if probe.present:
        return
    action, message = judge_missing(name, probe, kernel.running(), kernel.config())
    if action == "skip":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def require_ipv6() -> None:
    """Skip the calling test when ::1 cannot be bound (a guest or container without IPv6)."""
    import pytest

    from . import sockets

    if not sockets.ipv6_available():
        pytest.skip(f"{ENVIRONMENT} IPv6 loopback (::1) is not available on this system")
