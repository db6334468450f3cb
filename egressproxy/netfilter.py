"""The kernel's view of a redirected connection: original destination and socket marks."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Protocol

from egressproxy.policy.decision import Destination

SO_ORIGINAL_DST = 80
"""linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (ip6_tables.h) has the same value."""
IP6T_SO_ORIGINAL_DST = 80
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28


class SocketLike(Protocol):
    """A socket or uvloop's transport pseudo-socket: only the calls used here."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...

    def getpeername(self) -> tuple[str, int] | tuple[str, int, int, int]: ...


def original_destination(sock: SocketLike) -> Destination:
    """Where the client meant to go before iptables REDIRECT sent it here.

    A v4 client accepted on a dual-stack v6 socket has a v4-mapped peer; its
    conntrack entry is IPv4, so it is asked at SOL_IP and answered as IPv4.
    Raises OSError when the kernel has no entry (e.g. no conntrack).
    """
    if sock.family == socket.AF_INET6 and not _is_v4_mapped(sock.getpeername()[0]):
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
        port = struct.unpack_from("!H", raw, 2)[0]
        return Destination(ipaddress.IPv6Address(raw[8:24]), port)
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    port = struct.unpack_from("!H", raw, 2)[0]
    return Destination(ipaddress.IPv4Address(raw[4:8]), port)


def local_destination(sockname: tuple[str, int] | tuple[str, int, int, int]) -> Destination:
    """The listener address a client reached, normalised like original_destination."""
    address = ipaddress.ip_address(sockname[0].split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return Destination(address, sockname[1])


def is_local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether this host owns address: binding to it succeeds only then."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def set_mark(sock: socket.socket, mark: int) -> None:
    """SO_MARK on an upstream socket so the redirect rules let the proxy's own traffic out."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def _is_v4_mapped(host: str) -> bool:
    return host.startswith("::ffff:") and "." in host
