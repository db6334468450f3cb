"""The kernel's view of a redirected connection: original destination and socket marks."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Protocol

from egressproxy.policy.decision import Destination, unmapped

SO_ORIGINAL_DST = 80
"""linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (ip6_tables.h) has the same value."""
IP6T_SO_ORIGINAL_DST = 80
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28

NLMSG_HEADER = struct.Struct("=IHHII")
"""linux/netlink.h nlmsghdr: length, type, flags, sequence, port id."""
NLM_F_REQUEST = 1
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTA_DST = 1
RTMSG_TYPE_OFFSET = 7
"""linux/rtnetlink.h rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type."""
RTN_LOCAL = 2
NETLINK_TIMEOUT = 1.0
NETLINK_REPLY_SIZE = 4096
NONLOCAL_BIND = "/proc/sys/net/ipv{}/ip_nonlocal_bind"

PROXY_SOURCE_PORTS = range(16384, 32768)
"""The local ports of the proxy's upstream connections, bound explicitly.

The proxy and a sidecar's workload share one address, and conntrack entries outlive
sockets (TIME_WAIT for two minutes, an entry whose reset it judged out of window for
days). If the two drew local ports from the same pool, a workload connection could
meet a stale entry of the proxy's, which was never redirected, and reach its
destination past the proxy; or the proxy's connection could meet a workload's entry
and be redirected back to itself. Linux gives connections ports from 32768-60999
unless told otherwise, so this range is the workload's only by explicit bind.
"""
IPV4_SYSCTLS = Path("/proc/sys/net/ipv4")


class SocketLike(Protocol):
    """A socket or uvloop's transport pseudo-socket: only the call used here."""

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def original_destination(sock: SocketLike, peer_host: str) -> Destination:
    """Where the client at peer_host meant to go before iptables REDIRECT sent it here.

    The client's address says which table to ask, not the socket's family (on uvloop's
    pseudo-socket that property makes an enum member per call): an IPv6 client's
    conntrack entry is IPv6; a v4 client's is IPv4, also when it was accepted on a
    dual-stack v6 socket with a v4-mapped peer, so it is asked at SOL_IP and answered as
    IPv4. Raises OSError when the kernel has no entry (e.g. no conntrack).
    """
    if ":" in peer_host and not _is_v4_mapped(peer_host):
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
        known = _destinations.get(raw)
        if known is None:
            port = struct.unpack_from("!H", raw, 2)[0]
            known = _remember(raw, Destination(ipaddress.IPv6Address(raw[8:24]), port))
        return known
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    known = _destinations.get(raw)
    if known is None:
        port = struct.unpack_from("!H", raw, 2)[0]
        known = _remember(raw, Destination(ipaddress.IPv4Address(raw[4:8]), port))
    return known


MAX_REMEMBERED_DESTINATIONS = 4096
_destinations: dict[bytes, Destination] = {}
"""Destinations by the kernel's raw answer: connections to one destination share one
(immutable) object, which saves building an address per connection and the memory of
one per open connection."""


def _remember(raw: bytes, destination: Destination) -> Destination:
    if len(_destinations) >= MAX_REMEMBERED_DESTINATIONS:
        _destinations.clear()
    _destinations[raw] = destination
    return destination


def local_destination(sockname: tuple[str, int] | tuple[str, int, int, int]) -> Destination:
    """The listener address a client reached, normalised like original_destination."""
    return Destination(unmapped(ipaddress.ip_address(sockname[0].split("%", 1)[0])), sockname[1])


def route_request(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An RTM_GETROUTE netlink message asking the kernel how it would route to address."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    packed = address.packed
    route = struct.pack("=BBBBBBBBI", family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0)
    destination = struct.pack("=HH", 4 + len(packed), RTA_DST) + packed
    length = NLMSG_HEADER.size + len(route) + len(destination)
    return NLMSG_HEADER.pack(length, RTM_GETROUTE, NLM_F_REQUEST, 1, 0) + route + destination


def is_local_route(reply: bytes) -> bool:
    """Whether the kernel's answer to route_request is a route of type local (an error,
    such as no route at all, is not)."""
    route_type_at = NLMSG_HEADER.size + RTMSG_TYPE_OFFSET
    if len(reply) <= route_type_at:
        return False
    message_type = NLMSG_HEADER.unpack_from(reply)[1]
    return message_type == RTM_NEWROUTE and reply[route_type_at] == RTN_LOCAL


def is_local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether the kernel delivers address to this host, asked of its routing table (one
    netlink exchange): binding to the address would say yes to any address where
    net.ipv4/ipv6.ip_nonlocal_bind is set, and pyroute2 cannot run in a running loop.
    Where netlink sockets are forbidden (systemd's RestrictAddressFamilies), binding
    answers. Linux connects to an unspecified address (0.0.0.0, ::) as to its own."""
    if address.is_unspecified:
        return True
    try:
        netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except OSError:
        return _bindable(address)
    with netlink:
        netlink.settimeout(NETLINK_TIMEOUT)
        try:
            netlink.sendto(route_request(address), (0, 0))
            return is_local_route(netlink.recv(NETLINK_REPLY_SIZE))
        except OSError:
            return False


def _bindable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether binding to address succeeds, where that says it is the host's: not where
    ip_nonlocal_bind lets any address be bound. Then False; a connection the proxy makes
    to its own listener that way is still caught as a loop when it arrives (its original
    destination is the listener's own address)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        if Path(NONLOCAL_BIND.format(address.version)).read_text().strip() != "0":
            return False
    except OSError:
        pass
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def source_ports_conflict(ephemeral: str, reserved: str) -> str | None:
    """Why workloads could be given the proxy's source ports, from the sysctls
    net.ipv4.ip_local_port_range and ip_local_reserved_ports (as /proc/sys prints them);
    None when they cannot."""
    low, high = (int(word) for word in ephemeral.split())
    shared = set(range(max(low, PROXY_SOURCE_PORTS.start), min(high + 1, PROXY_SOURCE_PORTS.stop)))
    for item in reserved.replace(",", " ").split():
        first, _, last = item.partition("-")
        shared -= set(range(int(first), int(last or first) + 1))
    if not shared:
        return None
    ours = f"{PROXY_SOURCE_PORTS.start}-{PROXY_SOURCE_PORTS.stop - 1}"
    return (
        f"the proxy's source ports {ours} overlap this network namespace's ephemeral ports"
        f" {low}-{high} (net.ipv4.ip_local_port_range), so a workload connection could"
        f" collide with the proxy's; reserve them with"
        f" net.ipv4.ip_local_reserved_ports={ours} (a safe sysctl in a pod's securityContext)"
    )


def read_source_ports_conflict(sysctls: Path = IPV4_SYSCTLS) -> str | None:
    """source_ports_conflict for this network namespace; None where /proc/sys cannot say."""
    try:
        ephemeral = (sysctls / "ip_local_port_range").read_text()
        reserved = (sysctls / "ip_local_reserved_ports").read_text()
    except OSError:
        return None
    return source_ports_conflict(ephemeral, reserved)


def set_mark(sock: socket.socket, mark: int) -> None:
    """SO_MARK on an upstream socket so the redirect rules let the proxy's own traffic out.

    As bytes: an int argument is a C int, which refuses marks of 2**31 and above."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", mark))


def _is_v4_mapped(host: str) -> bool:
    """As the kernel writes a v4-mapped peer (a dual-stack socket's IPv4 client)."""
    return host.startswith("::ffff:") and "." in host


def plain_host(host: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it means, however it is written
    (a dual-stack socket's peer, a route's `[::ffff:c633:640a]` backend, a name's mapped
    answer); any other host as it is. The packets of a mapped address are IPv4."""
    if ":" not in host or "ffff" not in host.lower():
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host
