"""sock_diag packing and parsing, byte for byte, against hand-built layouts and real captures.

The captures in tests/fixtures/netlink/ were made by capture.py there on a live kernel;
each NAME.json holds what the kernel said about the socket through other channels.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct

import pytest
from bpfkit import sockdiag
from conftest import TESTS

FIXTURES = TESTS / "fixtures" / "netlink"


def fixture(name: str) -> tuple[bytes, bytes, dict]:
    return (
        (FIXTURES / f"{name}.request.bin").read_bytes(),
        (FIXTURES / f"{name}.reply.bin").read_bytes(),
        json.loads((FIXTURES / f"{name}.json").read_text()),
    )


# --- packing -----------------------------------------------------------------------


def test_request_layout_written_out_by_hand():
    # nlmsghdr: len 72+12 (bytecode attr), type 20, flags REQUEST|DUMP, seq 7, pid 0
    header = struct.pack("<IHHII", 84, 20, 0x301, 7, 0)
    # inet_diag_req_v2: AF_INET6, IPPROTO_TCP, ext bit for SKMEMINFO (7 -> 1 << 6), pad,
    # all states, then the sockid: ports (2 + 2) and addresses (16 + 16) zero, ifindex 0,
    # "no cookie" in both cookie words
    req = bytes([10, 6, 0x40, 0]) + b"\xff" * 4 + bytes(36) + bytes(4) + b"\xff" * 8
    # attribute INET_DIAG_REQ_BYTECODE (len 12): op S_EQ(11) yes=8 no=12, op 0/0/port
    bytecode = struct.pack("<HH", 12, 1) + bytes([11, 8]) + struct.pack("<H", 12) + bytes(
        [0, 0]) + struct.pack("<H", 8080)
    expected = header + req + bytecode
    assert sockdiag.pack_request(socket.AF_INET6, socket.IPPROTO_TCP, seq=7, meminfo=True,
                                 sport=8080) == expected


def test_storage_request_attribute_written_out_by_hand():
    packed = sockdiag.pack_request(socket.AF_INET, socket.IPPROTO_TCP, map_fds=[3, 260])
    # nested (0x8000 | INET_DIAG_REQ_SK_BPF_STORAGES 2), len 4 + 2 * 8, two MAP_FD (1) u32s
    expected_tail = struct.pack("<HH", 20, 0x8002) + struct.pack("<HHI", 8, 1, 3) + struct.pack(
        "<HHI", 8, 1, 260)
    assert packed.endswith(expected_tail)
    assert struct.unpack_from("<I", packed)[0] == len(packed) == 16 + 56 + 20


def test_request_without_options_is_header_and_req_only():
    packed = sockdiag.pack_request(socket.AF_INET, socket.IPPROTO_UDP)
    assert len(packed) == 16 + 56
    assert packed[16:20] == bytes([2, 17, 0, 0])


def test_attribute_padding():
    assert sockdiag.pack_attribute(9, b"\x01") == struct.pack("<HH", 5, 9) + b"\x01\0\0\0"
    assert sockdiag.pack_attribute(9, b"") == struct.pack("<HH", 4, 9)


@pytest.mark.parametrize("name", ["tcp4-storage", "udp4-storage", "tcp6-listener", "wrong-map-type"])
def test_captured_requests_are_what_pack_request_builds(name):
    request, _, expected = fixture(name)
    family, protocol = {
        "tcp4-storage": (socket.AF_INET, socket.IPPROTO_TCP),
        "udp4-storage": (socket.AF_INET, socket.IPPROTO_UDP),
        "tcp6-listener": (socket.AF_INET6, socket.IPPROTO_TCP),
        "wrong-map-type": (socket.AF_INET, socket.IPPROTO_UDP),
    }[name]
    assert sockdiag.pack_request(
        family, protocol, meminfo="sport" in expected, sport=expected.get("sport"),
        map_fds=expected.get("map_fds", ())) == request


# --- parsing real replies ------------------------------------------------------------


def test_tcp_reply_carries_both_storages():
    _, reply, expected = fixture("tcp4-storage")
    records, done = sockdiag.parse_dump([reply], seq=1)
    assert done
    (record,) = records
    assert (record.family, record.state) == (socket.AF_INET, 1)  # TCP_ESTABLISHED
    assert (record.sport, record.dport) == (expected["sport"], expected["dport"])
    assert (record.src, record.dst) == ("127.0.0.1", "127.0.0.1")
    assert (record.cookie, record.inode) == (expected["cookie"], expected["inode"])
    assert record.storages == {
        int(map_id): bytes.fromhex(value) for map_id, value in expected["storages"].items()}
    # two elements are charged to the socket's optmem
    assert record.optmem > 0
    assert len(record.meminfo) == 9


def test_udp_reply_charges_optmem_but_carries_no_storage():
    _, reply, expected = fixture("udp4-storage")
    (record,), done = sockdiag.parse_dump([reply], seq=1)
    assert done
    assert record.cookie == expected["cookie"]
    assert record.state == 7  # TCP_CLOSE: an unconnected UDP socket
    assert record.storages == {}
    assert sockdiag.INET_DIAG_SK_BPF_STORAGES not in record.attributes
    assert record.optmem > 0


def test_ipv6_listener_reply():
    _, reply, expected = fixture("tcp6-listener")
    (record,), done = sockdiag.parse_dump([reply], seq=1)
    assert done
    assert (record.family, record.state) == (socket.AF_INET6, 10)  # TCP_LISTEN
    assert (record.src, record.dst) == ("::1", "::")
    assert (record.sport, record.cookie, record.inode) == (
        expected["sport"], expected["cookie"], expected["inode"])
    assert record.optmem == 0


def test_error_reply_raises_the_kernels_errno():
    _, reply, _ = fixture("wrong-map-type")
    with pytest.raises(OSError) as raised:
        sockdiag.parse_dump([reply], seq=1)
    assert raised.value.errno == errno.EINVAL


# --- parsing hand-built replies ------------------------------------------------------


def diag_msg(sport: int, cookie: int, attributes: bytes = b"") -> bytes:
    sockid = struct.pack(">HH", sport, 0) + socket.inet_aton("127.0.0.1") + bytes(12) + bytes(
        16) + struct.pack("<III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
    return bytes([2, 7, 0, 0]) + sockid + struct.pack("<IIIII", 0, 0, 0, 0, 4242) + attributes


def nlmsg(msg_type: int, payload: bytes, seq: int = 1, flags: int = 2) -> bytes:
    return struct.pack("<IHHII", 16 + len(payload), msg_type, flags, seq, 0) + payload


DONE = nlmsg(3, struct.pack("<i", 0))


def test_storage_entries_with_pad_and_nested_flag():
    value = bytes(range(16))
    entry = (sockdiag.pack_attribute(1, b"")  # SK_DIAG_BPF_STORAGE_PAD
             + sockdiag.pack_attribute(2, struct.pack("<I", 77))
             + sockdiag.pack_attribute(3, value))
    storages = sockdiag.pack_attribute(20 | 0x8000, sockdiag.pack_attribute(1 | 0x8000, entry))
    records, done = sockdiag.parse_dump([nlmsg(20, diag_msg(5000, 1 << 40 | 5, storages)), DONE],
                                        seq=1)
    assert done
    assert records[0].storages == {77: value}
    assert records[0].cookie == 1 << 40 | 5
    assert records[0].inode == 4242


def test_records_across_datagrams_and_foreign_sequence_numbers():
    first = nlmsg(20, diag_msg(1, 1)) + nlmsg(20, diag_msg(2, 2))
    stale = nlmsg(20, diag_msg(3, 3), seq=99)
    records, done = sockdiag.parse_dump([first, stale + nlmsg(20, diag_msg(4, 4)), DONE], seq=1)
    assert done
    assert [r.sport for r in records] == [1, 2, 4]


def test_reply_without_done_is_reported_incomplete():
    records, done = sockdiag.parse_dump([nlmsg(20, diag_msg(1, 1))], seq=1)
    assert (len(records), done) == (1, False)


def test_negative_done_status_raises():
    with pytest.raises(OSError) as raised:
        sockdiag.parse_dump([nlmsg(3, struct.pack("<i", -errno.ENOBUFS))], seq=1)
    assert raised.value.errno == errno.ENOBUFS


def test_attribute_running_past_its_message_is_rejected():
    bad = struct.pack("<HH", 40, 7) + bytes(8)
    with pytest.raises(ValueError, match="bad length 40"):
        sockdiag.parse_attributes(bad)


def test_optmem_without_meminfo_is_an_error_not_zero():
    (record,), _ = sockdiag.parse_dump([nlmsg(20, diag_msg(1, 1)), DONE], seq=1)
    assert record.meminfo is None
    with pytest.raises(ValueError, match="meminfo=True"):
        record.optmem  # noqa: B018 - the property access is what is tested


# --- the live kernel -------------------------------------------------------------------

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="storage dumps need root (CAP_BPF)")


def test_socket_record_finds_this_socket_by_cookie():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        record = sockdiag.socket_record(sock)
        assert record.cookie == sockdiag.socket_cookie(sock)
        assert record.sport == sock.getsockname()[1]
        assert record.inode == os.fstat(sock.fileno()).st_ino
        assert record.optmem == 0


def test_unhashed_socket_has_no_record():
    # An unbound UDP socket is in no lookup table, so inet_diag cannot see it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, pytest.raises(
            LookupError, match="no record of socket cookie"):
        sockdiag.socket_record(sock)


@root_only
def test_live_tcp_storage_dump():
    from bpfkit import maps

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                map_fd = maps.create_sk_storage_map(4)
                try:
                    maps.update(map_fd, client.fileno(), b"\xde\xad\xbe\xef")
                    map_id = maps.map_info(map_fd).id
                    record = sockdiag.socket_record(client, map_fds=[map_fd])
                    assert record.storages == {map_id: b"\xde\xad\xbe\xef"}
                    # the accepted end has no storage of its own
                    assert sockdiag.socket_record(accepted, map_fds=[map_fd]).storages == {}
                finally:
                    os.close(map_fd)


@root_only
def test_live_bad_map_fd_is_ebadf():
    with pytest.raises(OSError) as raised:
        sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP, map_fds=[987654])
    assert raised.value.errno == errno.EBADF
