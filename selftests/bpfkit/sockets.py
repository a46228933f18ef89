"""Real loopback sockets of every kind the tests give storage to.

Every factory returns plain socket objects bound to loopback on kernel-chosen ports; the
caller closes them (the conftest fixtures do).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
TYPE_NAMES = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}


def bound_socket(family: int, sock_type: int) -> socket.socket:
    """A socket of family/type bound to loopback on an ephemeral port."""
    sock = socket.socket(family, sock_type)
    try:
        sock.bind((LOOPBACK[family], 0))
    except OSError:
        sock.close()
        raise
    return sock


def udp_pair(family: int) -> tuple[socket.socket, socket.socket]:
    """(sender, receiver): the sender is connected to the receiver, both bound on loopback."""
    receiver = bound_socket(family, socket.SOCK_DGRAM)
    sender = bound_socket(family, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    return sender, receiver


@dataclass
class TcpConnection:
    """A loopback TCP connection with its listener: three distinct kernel sockets."""

    listener: socket.socket
    client: socket.socket
    accepted: socket.socket

    def close(self) -> None:
        """Close all three sockets."""
        for sock in (self.client, self.accepted, self.listener):
            sock.close()


def tcp_listener(family: int, backlog: int = 16) -> socket.socket:
    """A listening TCP socket on loopback."""
    listener = bound_socket(family, socket.SOCK_STREAM)
    listener.listen(backlog)
    return listener


def tcp_connection(family: int, listener: socket.socket | None = None) -> TcpConnection:
    """Connect a client to `listener` (a new one when None) and accept it."""
    listener = listener if listener is not None else tcp_listener(family)
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(listener.getsockname())
    listener.settimeout(5)
    accepted, _ = listener.accept()
    return TcpConnection(listener, client, accepted)


def unix_pair(sock_type: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX pair."""
    return socket.socketpair(socket.AF_UNIX, sock_type)


def ipv6_available() -> bool:
    """Whether ::1 can be bound here (a guest or container may run without IPv6)."""
    try:
        bound_socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True
