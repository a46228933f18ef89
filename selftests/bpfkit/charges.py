"""What sk storage charges to a socket's sk_omem_alloc, from the running kernel's own layout.

bpf_local_storage_map_alloc() sets a map's element size to
offsetof(struct bpf_local_storage_elem, sdata.data[value_size]), and the first
element of a socket also pays sizeof(struct bpf_local_storage), the per-socket
header. Both depend on the build (cache-line alignment, lock debugging), so the
numbers come from /sys/kernel/btf/vmlinux rather than from a table: a test can
then pin the charge to the byte on any kernel with BTF.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from . import btf_layout, kernel, sockdiag


@dataclass(frozen=True)
class StorageCharges:
    """The two constants of sk storage accounting in this kernel."""

    elem_overhead: int  # offsetof(struct bpf_local_storage_elem, sdata.data)
    header: int         # sizeof(struct bpf_local_storage)

    def element(self, value_size: int) -> int:
        """Bytes one element of a value_size map charges (smap->elem_size)."""
        return self.elem_overhead + value_size

    def first_element(self, value_size: int) -> int:
        """Bytes a socket's first element charges: the element plus the storage header."""
        return self.header + self.element(value_size)


# "bpf: Reduce smap->elem_size" (552d42a356eb, 6.3; in 6.1.y by 6.1.176, the oldest 6.1
# seen here) charges offsetof(sdata.data) + value_size. Before it an element charged
# sizeof(struct bpf_local_storage_elem) + value_size, which the struct's cache-line
# aligned sdata rounds up (128 instead of 72 on x86_64: seen on Debian's 5.10.223).
REDUCED_ELEM_SIZE_SINCE = (6, 1, 0)  # the 6.1.y releases before the backport are not pinned


def charges_from_layout(layout: btf_layout.BtfLayout,
                        version: tuple[int, int, int]) -> StorageCharges:
    """The charges a kernel of `version` with this BTF layout makes."""
    elem = layout.struct_id("bpf_local_storage_elem")
    if version >= REDUCED_ELEM_SIZE_SINCE:
        sdata = layout.member("bpf_local_storage_elem", "sdata").offset
        data = layout.member("bpf_local_storage_data", "data").offset
        overhead = sdata + data
    else:
        overhead = layout.size_of(elem)
    header = layout.size_of(layout.struct_id("bpf_local_storage"))
    return StorageCharges(elem_overhead=overhead, header=header)


def kernel_charges() -> StorageCharges:
    """The running kernel's charges; FileNotFoundError without kernel BTF."""
    return charges_from_layout(btf_layout.kernel_layout(), kernel.running().version)


def optmem(sock: socket.socket) -> int:
    """sk_omem_alloc of a live, bound socket, as sock_diag reports it."""
    return sockdiag.socket_record(sock).optmem


SO_MEMINFO = 55  # 4.12+


def optmem_now(sock: socket.socket) -> int:
    """sk_omem_alloc through getsockopt(SO_MEMINFO): one syscall, no dump, any socket.

    For when the moment matters (a race): a sock_diag dump takes milliseconds under TCG.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (sockdiag.SK_MEMINFO_DROPS + 1))
    return struct.unpack_from("=I", raw, 4 * sockdiag.SK_MEMINFO_OPTMEM)[0]
