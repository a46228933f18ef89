"""NETLINK_SOCK_DIAG (inet_diag) client: what the kernel reports about live TCP/UDP sockets.

Two things matter to the sk storage tests:
- INET_DIAG_SKMEMINFO, whose SK_MEMINFO_OPTMEM slot is sk->sk_omem_alloc, the
  memory sk storage charges to a socket;
- INET_DIAG_REQ_SK_BPF_STORAGES (Linux 5.7+): the request names map fds, the
  reply carries each socket's value in those maps (INET_DIAG_SK_BPF_STORAGES).
  TCP only: inet_sk_diag_fill() returns before its storage block for a socket
  without an inet_connection_sock, so a UDP record never carries storage (seen
  in the 6.1 source and on a 6.18 kernel), though its optmem shows the charge.

Layouts follow include/uapi/linux/{netlink,inet_diag,sock_diag}.h.  Packing and
parsing are plain functions on bytes so they can be checked without a kernel;
`dump()` and `socket_record()` do the round trip.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20

# struct nlmsghdr and the control messages
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

# struct nlattr; the type's top two bits are flags, not part of the type
NLA_HDR = struct.Struct("=HH")
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = ~((1 << 15) | (1 << 14)) & 0xFFFF

# struct inet_diag_sockid: ports and addresses in network order, then ifindex
# and the two halves of the socket cookie in host order.
SOCKID = struct.Struct("=2s2s16s16sIII")
# struct inet_diag_req_v2: family, protocol, ext bitmap, pad, states, sockid
REQ_V2 = struct.Struct("=BBBBI" + SOCKID.format[1:])
# struct inet_diag_msg: family, state, timer, retrans, sockid, expires,
# rqueue, wqueue, uid, inode
DIAG_MSG = struct.Struct("=BBBB" + SOCKID.format[1:] + "IIIII")

# request attributes (enum INET_DIAG_REQ_*)
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_REQ_SK_BPF_STORAGES = 2
SK_DIAG_BPF_STORAGE_REQ_MAP_FD = 1

# reply attributes (enum INET_DIAG_*)
INET_DIAG_MEMINFO = 1
INET_DIAG_SKMEMINFO = 7
INET_DIAG_SK_BPF_STORAGES = 20
SK_DIAG_BPF_STORAGE = 1
SK_DIAG_BPF_STORAGE_MAP_ID = 2
SK_DIAG_BPF_STORAGE_MAP_VALUE = 3

# enum sk_meminfo slots of INET_DIAG_SKMEMINFO
SK_MEMINFO_RMEM_ALLOC = 0
SK_MEMINFO_RCVBUF = 1
SK_MEMINFO_WMEM_ALLOC = 2
SK_MEMINFO_SNDBUF = 3
SK_MEMINFO_FWD_ALLOC = 4
SK_MEMINFO_WMEM_QUEUED = 5
SK_MEMINFO_OPTMEM = 6
SK_MEMINFO_BACKLOG = 7
SK_MEMINFO_DROPS = 8

# inet_diag bytecode (struct inet_diag_bc_op: code, yes, no)
BC_OP = struct.Struct("=BBH")
INET_DIAG_BC_S_EQ = 11

# every TCP state, so listeners, established and closing sockets all match
ALL_STATES = 0xFFFFFFFF
SO_COOKIE = 57
INET_DIAG_NOCOOKIE = 0xFFFFFFFF


@dataclass(frozen=True)
class DiagRecord:
    """One socket as inet_diag reports it."""

    family: int
    state: int
    sport: int
    dport: int
    src: str
    dst: str
    ifindex: int
    cookie: int
    uid: int
    inode: int
    # idiag_rqueue: a listener's accept queue length, else the bytes waiting to be read
    rqueue: int = 0
    # SK_MEMINFO_* slots when INET_DIAG_SKMEMINFO was asked for, else None
    meminfo: tuple[int, ...] | None = None
    # map id -> value bytes, for the maps named in the request that hold a
    # value for this socket
    storages: dict[int, bytes] = field(default_factory=dict)
    # every reply attribute by type, raw, for what this module does not decode
    attributes: dict[int, bytes] = field(default_factory=dict)

    @property
    def optmem(self) -> int:
        """sk_omem_alloc, where sk storage charges its memory (needs meminfo=True)."""
        if self.meminfo is None:
            raise ValueError("the dump was made without meminfo=True")
        return self.meminfo[SK_MEMINFO_OPTMEM]


# --- packing -------------------------------------------------------------------

def _align(length: int) -> int:
    return (length + 3) & ~3


def pack_attribute(attr_type: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(length, attr_type) + payload + b"\0" * (_align(length) - length)


def pack_sport_filter(sport: int) -> bytes:
    """Bytecode that keeps only sockets bound to local port `sport`.

    S_EQ compares with the port stored in the next op's `no` field; failing
    jumps 4 bytes past the end, which the kernel reads as "reject".
    """
    program_length = 2 * BC_OP.size
    return BC_OP.pack(INET_DIAG_BC_S_EQ, program_length, program_length + 4) + BC_OP.pack(
        0, 0, sport)


def pack_request(
    family: int,
    protocol: int,
    *,
    seq: int = 1,
    states: int = ALL_STATES,
    meminfo: bool = False,
    sport: int | None = None,
    map_fds: Sequence[int] = (),
    storages_nest: bytes | None = None,
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request as the bytes sent to the kernel.

    storages_nest, when given, is the verbatim payload of the
    INET_DIAG_REQ_SK_BPF_STORAGES nest (even empty: "dump every storage"),
    for requests map_fds cannot express.
    """
    ext = 1 << (INET_DIAG_SKMEMINFO - 1) if meminfo else 0
    sockid = (b"\0\0", b"\0\0", b"\0" * 16, b"\0" * 16, 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    body = REQ_V2.pack(family, protocol, ext, 0, states, *sockid)
    if sport is not None:
        body += pack_attribute(INET_DIAG_REQ_BYTECODE, pack_sport_filter(sport))
    if map_fds:
        fds = b"".join(
            pack_attribute(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, struct.pack("=I", fd))
            for fd in map_fds)
        body += pack_attribute(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, fds)
    elif storages_nest is not None:
        body += pack_attribute(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, storages_nest)
    header = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


# --- parsing -------------------------------------------------------------------

def parse_attributes(data: bytes) -> list[tuple[int, bytes]]:
    """Split a run of netlink attributes into (type without flag bits, payload)."""
    attributes = []
    offset = 0
    while offset + NLA_HDR.size <= len(data):
        length, attr_type = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size or offset + length > len(data):
            raise ValueError(f"netlink attribute at offset {offset} has bad length {length}")
        attributes.append((attr_type & NLA_TYPE_MASK, data[offset + NLA_HDR.size:offset + length]))
        offset += _align(length)
    return attributes


def parse_storages(payload: bytes) -> dict[int, bytes]:
    """INET_DIAG_SK_BPF_STORAGES: nested SK_DIAG_BPF_STORAGE entries -> {map id: value}."""
    storages = {}
    for entry_type, entry in parse_attributes(payload):
        if entry_type != SK_DIAG_BPF_STORAGE:
            continue
        map_id, value = None, None
        for attr_type, attr in parse_attributes(entry):
            if attr_type == SK_DIAG_BPF_STORAGE_MAP_ID:
                (map_id,) = struct.unpack("=I", attr)
            elif attr_type == SK_DIAG_BPF_STORAGE_MAP_VALUE:
                value = attr
        if map_id is None or value is None:
            raise ValueError("SK_DIAG_BPF_STORAGE entry without map id or value")
        storages[map_id] = value
    return storages


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def parse_record(payload: bytes) -> DiagRecord:
    """One inet_diag_msg and its attributes."""
    (family, state, _timer, _retrans, sport, dport, src, dst, ifindex, cookie_lo, cookie_hi,
     _expires, rqueue, _wqueue, uid, inode) = DIAG_MSG.unpack_from(payload)
    attributes = dict(parse_attributes(payload[DIAG_MSG.size:]))
    meminfo = None
    if INET_DIAG_SKMEMINFO in attributes:
        raw = attributes[INET_DIAG_SKMEMINFO]
        meminfo = struct.unpack(f"={len(raw) // 4}I", raw)
    storages = {}
    if INET_DIAG_SK_BPF_STORAGES in attributes:
        storages = parse_storages(attributes[INET_DIAG_SK_BPF_STORAGES])
    return DiagRecord(
        family=family, state=state,
        sport=int.from_bytes(sport, "big"), dport=int.from_bytes(dport, "big"),
        src=_address(family, src), dst=_address(family, dst), ifindex=ifindex,
        cookie=cookie_lo | cookie_hi << 32, uid=uid, inode=inode, rqueue=rqueue,
        meminfo=meminfo, storages=storages, attributes=attributes)


def parse_messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split a netlink datagram into (type, flags, seq, payload) messages."""
    messages = []
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, msg_type, flags, seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            raise ValueError(f"netlink message at offset {offset} has bad length {length}")
        messages.append((msg_type, flags, seq, data[offset + NLMSG_HDR.size:offset + length]))
        offset += _align(length)
    return messages


def parse_dump(datagrams: Iterable[bytes], seq: int) -> tuple[list[DiagRecord], bool]:
    """Records of a dump reply and whether NLMSG_DONE was seen; kernel errors raise OSError."""
    records = []
    for datagram in datagrams:
        for msg_type, _flags, msg_seq, payload in parse_messages(datagram):
            if msg_seq != seq:
                continue  # a late answer to an earlier request on this socket
            if msg_type in (NLMSG_ERROR, NLMSG_DONE):
                (error,) = struct.unpack_from("=i", payload) if payload else (0,)
                if error < 0:
                    raise OSError(-error, f"sock_diag dump: {os.strerror(-error)}")
                if msg_type == NLMSG_DONE:
                    return records, True
                continue
            if msg_type == SOCK_DIAG_BY_FAMILY:
                records.append(parse_record(payload))
    return records, False


# --- the round trip --------------------------------------------------------------

# A dump datagram holds at least one whole socket record; records carrying
# large map values grow it up to the kernel's allocation limit.
_RECEIVE_BUFFER = 1 << 20


def dump(
    family: int,
    protocol: int,
    *,
    states: int = ALL_STATES,
    meminfo: bool = False,
    sport: int | None = None,
    map_fds: Sequence[int] = (),
    storages_nest: bytes | None = None,
) -> list[DiagRecord]:
    """Every socket of one family/protocol, optionally only those bound to `sport`.

    Kernel refusals (EPERM without CAP_BPF for storages, EBADF/EINVAL for a bad
    map fd) raise OSError with the kernel's errno.
    """
    seq = 1
    request = pack_request(family, protocol, seq=seq, states=states, meminfo=meminfo,
                           sport=sport, map_fds=map_fds, storages_nest=storages_nest)
    buffer = bytearray(_RECEIVE_BUFFER)
    records: list[DiagRecord] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:
        nl.sendto(request, (0, 0))
        done = False
        while not done:
            received = nl.recv_into(buffer, len(buffer), socket.MSG_TRUNC)
            if received > len(buffer):
                raise RuntimeError(f"sock_diag reply of {received} bytes overflowed the buffer")
            batch, done = parse_dump([bytes(buffer[:received])], seq)
            records.extend(batch)
    return records


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit cookie of a socket (SO_COOKIE), the key sock_diag reports it under."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def socket_record(
    sock: socket.socket, *, meminfo: bool = True, map_fds: Sequence[int] = (),
    storages_nest: bytes | None = None,
) -> DiagRecord:
    """This socket's own record, found by its local port and cookie; LookupError if absent.

    An unbound socket is in no lookup table and so has no record.
    """
    protocols = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type not in protocols:
        raise ValueError(f"sock_diag reports TCP/UDP over IPv4/IPv6 only, not {sock!r}")
    sport = sock.getsockname()[1]
    cookie = socket_cookie(sock)
    for record in dump(sock.family, protocols[sock.type], meminfo=meminfo, sport=sport,
                       map_fds=map_fds, storages_nest=storages_nest):
        if record.cookie == cookie:
            return record
    raise LookupError(f"sock_diag has no record of socket cookie {cookie} (port {sport})")
