"""bpf_iter over sk storage maps: every element once, across buckets and small reads.

An iterator program runs once per element with ctx->sk (the owning socket) and
ctx->value; bpf_sk_storage_map_seq_find_next() walks the map's buckets and, when
a read() ends mid-bucket, resumes at (bucket_id, skip_elems) on the next one. The
program here writes (socket cookie, first 8 value bytes) per element, so each
record names its socket and value. bpf_iter_attach_map() refuses map fd 0 (EBADF)
and a map of another type (EINVAL).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from bpfkit import btf_layout, maps, probes, prog, sockdiag, syscall
from bpfkit.asm import (
    ADD,
    DW,
    JEQ,
    R0,
    R1,
    R2,
    R3,
    R6,
    R7,
    R8,
    R10,
    alu64_imm,
    assemble,
    call,
    exit_insn,
    jmp_imm,
    label,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    stx_mem,
)

pytestmark = [pytest.mark.map_free, pytest.mark.iterators]

# struct bpf_iter__bpf_sk_storage_map { meta; map; sk; value; } and bpf_iter_meta.seq
CTX_META, CTX_SK, CTX_VALUE, META_SEQ = 0, 16, 24, 0
RECORD = struct.Struct("=QQ")  # cookie, first 8 value bytes
SOCKETS = 60


@pytest.fixture(autouse=True)
def _needs_iterators():
    probes.require("sk_storage_iter")


def record_program(cookie_offset: int, delete_map_fd: int | None = None) -> bytes:
    """Write RECORD per element; with delete_map_fd, also delete the element's socket's value."""
    delete = [] if delete_map_fd is None else [
        ld_map_fd(R1, delete_map_fd),
        mov64_reg(R2, R7),                      # r2 = ctx->sk
        call("sk_storage_delete"),
    ]
    return assemble([
        mov64_reg(R6, R1),                      # r6 = ctx
        ldx_mem(DW, R7, R6, CTX_SK),            # r7 = ctx->sk
        jmp_imm(JEQ, R7, 0, "out"),             # the final call has no element
        ldx_mem(DW, R8, R6, CTX_VALUE),         # r8 = ctx->value
        jmp_imm(JEQ, R8, 0, "out"),
        ldx_mem(DW, R1, R7, cookie_offset),     # r1 = sk->__sk_common.skc_cookie
        stx_mem(DW, R10, R1, -16),
        ldx_mem(DW, R1, R8, 0),                 # r1 = the value's first 8 bytes
        stx_mem(DW, R10, R1, -8),
        ldx_mem(DW, R1, R6, CTX_META),
        ldx_mem(DW, R1, R1, META_SEQ),          # r1 = meta->seq
        mov64_reg(R2, R10),
        alu64_imm(ADD, R2, -16),                # r2 = &record
        mov64_imm(R3, RECORD.size),
        call("seq_write"),
    ] + delete + [
        label("out"),
        mov64_imm(R0, 0),
        exit_insn(),
    ])


def load_iterator(program: bytes, closing) -> int:
    return closing(prog.load_sk_storage_iterator(program, name="sk_records"))


def cookie_offset() -> int:
    return btf_layout.kernel_layout().member("sock", "__sk_common.skc_cookie").offset


def read_records(link_fd: int, chunk: int) -> list[tuple[int, int]]:
    """Run the iterator once, reading `chunk` bytes per read(); the records it wrote.

    A walk that never ends (a resume that starts over) fails the test once it has
    written more records than the map could hold, instead of hanging the guest.
    """
    most = SOCKETS * RECORD.size
    fd = prog.iter_create(link_fd)
    try:
        data = b""
        reads = 0
        while True:
            part = os.read(fd, chunk)
            if not part:
                break
            data += part
            reads += 1
            if len(data) > most:
                pytest.fail(f"the iterator wrote {len(data) // RECORD.size} records and had "
                            f"not ended; the map holds at most {SOCKETS}")
    finally:
        os.close(fd)
    assert len(data) % RECORD.size == 0, f"{len(data)} bytes is no whole number of records"
    if chunk == RECORD.size:
        assert reads == len(data) // RECORD.size  # one element per read(): a resume each time
    return [RECORD.unpack_from(data, i) for i in range(0, len(data), RECORD.size)]


@pytest.fixture
def populated(storage_map, socks):
    """SOCKETS UDP sockets, socket i holding value i; {cookie: i}."""
    expected = {}
    for index in range(SOCKETS):
        sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
        maps.update(storage_map, sock.fileno(), struct.pack("=Q", index))
        expected[sockdiag.socket_cookie(sock)] = index
    return expected


@pytest.mark.parametrize("chunk", [RECORD.size, 1 << 16], ids=["one-record-per-read", "one-read"])
def test_iterator_visits_every_element_once(chunk, storage_map, populated, closing):
    """Each element once with its own socket and value, also when every read() resumes."""
    link_fd = closing(prog.link_create(load_iterator(record_program(cookie_offset()), closing),
                                       0, syscall.BPF_TRACE_ITER, iter_map_fd=storage_map))
    records = read_records(link_fd, chunk)
    assert len(records) == SOCKETS
    assert dict(records) == populated


def test_iterator_deleting_each_element_visits_all_and_empties_the_map(storage_map, populated,
                                                                      closing):
    """bpf_sk_storage_delete from the iterator: every element still visited, all gone after.

    One read() covers the whole walk: a deleted element keeps its next pointer, so the walk
    goes on from it (a resume would count positions among elements already deleted).
    """
    # An iterator is a tracing program: it may call the helpers since their tracing
    # variants (5.11); 5.10's verifier refuses bpf_sk_storage_delete there.
    probes.require("sk_storage_tracing_helpers")
    program = record_program(cookie_offset(), delete_map_fd=storage_map)
    link_fd = closing(prog.link_create(load_iterator(program, closing), 0,
                                       syscall.BPF_TRACE_ITER, iter_map_fd=storage_map))
    assert dict(read_records(link_fd, 1 << 16)) == populated
    assert read_records(link_fd, 1 << 16) == []


@pytest.mark.parametrize("target", ["fd-0", "array-map"])
def test_iterator_attach_to_no_storage_map_is_refused(target, closing):
    """Attaching the iterator to map fd 0 is EBADF, to an array map EINVAL."""
    prog_fd = load_iterator(record_program(cookie_offset()), closing)
    if target == "fd-0":
        # fd 0 must be open to something that is not a map: then only the kernel's own
        # "no map fd" check gives EBADF (looking fd 0 up would give EINVAL).
        try:
            os.fstat(0)
        except OSError:
            assert closing(os.open(os.devnull, os.O_RDONLY)) == 0
    map_fd = 0 if target == "fd-0" else closing(
        maps.create_map(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 1))
    try:
        link_fd = prog.link_create(prog_fd, 0, syscall.BPF_TRACE_ITER, iter_map_fd=map_fd)
    except syscall.BpfError as err:
        expected = errno.EBADF if target == "fd-0" else errno.EINVAL
        assert (err.command, err.errno) == ("BPF_LINK_CREATE", expected)
    else:
        os.close(link_fd)
        pytest.fail(f"an sk storage iterator attached to {target}")
