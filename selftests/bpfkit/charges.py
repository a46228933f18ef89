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
from dataclasses import dataclass

from . import btf_layout, sockdiag


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


def kernel_charges() -> StorageCharges:
    """The running kernel's charges; FileNotFoundError without kernel BTF."""
    layout = btf_layout.kernel_layout()
    sdata = layout.member("bpf_local_storage_elem", "sdata").offset
    data = layout.member("bpf_local_storage_data", "data").offset
    header = layout.size_of(layout.struct_id("bpf_local_storage"))
    return StorageCharges(elem_overhead=sdata + data, header=header)


def optmem(sock: socket.socket) -> int:
    """sk_omem_alloc of a live, bound socket, as sock_diag reports it."""
    return sockdiag.socket_record(sock).optmem
