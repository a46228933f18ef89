"""Count the elements an sk storage map holds, including those of sockets already closed.

Closed sockets cannot be asked about (no fd to look up, no sock_diag record), so a
test proving that teardown released their storage must ask the map.  Two ways:

- "fdinfo": the project's kernel patch prints `sk_storage_elems:\\t<N>` in the map fd's
  /proc/self/fdinfo entry, an exact count kept under the map's bucket locks;
- "iterator": a bpf_iter program over the map (Linux 5.9+) writes one byte per element
  it visits; attaching it needs the id of FUNC bpf_iter_bpf_sk_storage_map from the
  kernel's own BTF.

An element whose socket is mid-teardown can still be linked into the map for a
moment (and freed after an RCU grace period), so callers poll for the count they
expect with a deadline: see `wait_for_count`.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from . import asm, btf, prog, syscall

FDINFO_FIELD = "sk_storage_elems"
FDINFO = "fdinfo"
ITERATOR = "iterator"
ITER_FUNC = prog.SK_STORAGE_ITER_FUNC
NO_METHOD = (
    "cannot count sk storage elements: the kernel has neither the project's "
    f"'{FDINFO_FIELD}' fdinfo line nor bpf_iter for sk storage maps (5.9+)"
)

# struct bpf_iter__bpf_sk_storage_map { meta; map; sk; value; } (net/core/bpf_sk_storage.c),
# each an 8-byte pointer
_CTX_META = 0
_CTX_SK = 16
# struct bpf_iter_meta { struct seq_file *seq; ... }
_META_SEQ = 0
# What the program writes per element: any byte, one per element.
ELEMENT_MARK = ord("E")


def parse_fdinfo_count(fdinfo: str) -> int | None:
    """The sk_storage_elems value in the text of a map fd's fdinfo, None when absent."""
    for line in fdinfo.splitlines():
        name, _, value = line.partition(":")
        if name == FDINFO_FIELD:
            return int(value.strip())
    return None


def fdinfo_count(map_fd: int) -> int | None:
    """The patched kernel's element count from /proc/self/fdinfo, None when the line is absent."""
    with open(f"/proc/self/fdinfo/{map_fd}") as f:
        return parse_fdinfo_count(f.read())


def counting_program() -> bytes:
    """Iterator program: one ELEMENT_MARK byte into the seq_file per element visited."""
    return asm.assemble([
        asm.mov64_reg(asm.R6, asm.R1),                      # r6 = ctx
        asm.ldx_mem(asm.DW, asm.R7, asm.R6, _CTX_SK),        # r7 = ctx->sk
        asm.jmp_imm(asm.JEQ, asm.R7, 0, "out"),              # last call: no element left
        asm.ldx_mem(asm.DW, asm.R1, asm.R6, _CTX_META),      # r1 = ctx->meta
        asm.ldx_mem(asm.DW, asm.R1, asm.R1, _META_SEQ),      # r1 = meta->seq
        asm.st_mem(asm.B, asm.R10, -1, ELEMENT_MARK),        # fp[-1] = mark
        asm.mov64_reg(asm.R2, asm.R10),
        asm.alu64_imm(asm.ADD, asm.R2, -1),                  # r2 = &mark
        asm.mov64_imm(asm.R3, 1),                            # r3 = 1 byte
        asm.call("seq_write"),
        asm.label("out"),
        asm.mov64_imm(asm.R0, 0),
        asm.exit_insn(),
    ])


def iterator_available() -> bool:
    """Whether the kernel can attach an iterator to an sk storage map (BTF names the target)."""
    try:
        btf.kernel_btf().find(ITER_FUNC, btf.BTF_KIND_FUNC)
    except (FileNotFoundError, LookupError):
        return False
    return True


class ElementCounter:
    """Counts one map's elements with the best method this kernel offers; close() when done."""

    def __init__(self, map_fd: int) -> None:
        """Pick the method: fdinfo when the patched line exists, else an iterator link."""
        self.map_fd = map_fd
        self._prog_fd: int | None = None
        self._link_fd: int | None = None
        if fdinfo_count(map_fd) is not None:
            self.method = FDINFO
            return
        if not iterator_available():
            raise LookupError(NO_METHOD)
        self.method = ITERATOR
        self._prog_fd = prog.load_sk_storage_iterator(counting_program(), name="count_elems")
        try:
            self._link_fd = prog.link_create(
                self._prog_fd, 0, syscall.BPF_TRACE_ITER, iter_map_fd=map_fd)
        except BaseException:
            self.close()
            raise

    def count(self) -> int:
        """How many elements the map holds right now."""
        if self.method == FDINFO:
            value = fdinfo_count(self.map_fd)
            if value is None:
                raise RuntimeError(f"{FDINFO_FIELD} vanished from the fdinfo of map fd {self.map_fd}")
            return value
        if self._link_fd is None:
            raise ValueError("count() on a closed ElementCounter")
        output = prog.read_iterator(self._link_fd)
        if output.strip(bytes([ELEMENT_MARK])):
            raise RuntimeError(f"iterator wrote unexpected bytes: {output[:32]!r}")
        return len(output)

    def close(self) -> None:
        """Release the iterator link and program (the link holds a map reference)."""
        for fd in (self._link_fd, self._prog_fd):
            if fd is not None:
                os.close(fd)
        self._link_fd = self._prog_fd = None

    def __enter__(self) -> ElementCounter:  # noqa: PYI034 - stdlib only, no typing.Self on 3.9
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wait_for(read: Callable[[], int], expected: int, timeout: float,
             interval: float = 0.02) -> tuple[bool, int]:
    """Poll read() until it returns expected or timeout seconds pass: (reached, last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == expected:
            return True, value
        if time.monotonic() >= deadline:
            return False, value
        time.sleep(interval)


def wait_for_count(counter: ElementCounter, expected: int, timeout: float) -> tuple[bool, int]:
    """Poll the map's element count until it is `expected`: (reached, last count seen)."""
    return wait_for(counter.count, expected, timeout)
