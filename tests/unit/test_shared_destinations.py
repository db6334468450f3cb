"""Connections to one destination share its objects (netfilter's destination memo, the
flow's interned hostname): memory per idle connection, without changing any answer."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

from egressproxy import netfilter
from egressproxy.flow import _without_root_dot


class KernelAnswer:
    """What SO_ORIGINAL_DST returns for a v4 client, as the kernel packs it."""

    def __init__(self, address: str, port: int) -> None:
        self.raw = struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(address))

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        assert (level, option) == (socket.SOL_IP, netfilter.SO_ORIGINAL_DST)
        return self.raw[:buflen]


CLIENT = "198.51.100.7"


def test_connections_to_one_destination_share_it_and_others_do_not() -> None:
    first = netfilter.original_destination(KernelAnswer("203.0.113.9", 443), CLIENT)
    second = netfilter.original_destination(KernelAnswer("203.0.113.9", 443), CLIENT)
    other_port = netfilter.original_destination(KernelAnswer("203.0.113.9", 80), CLIENT)
    assert first is second
    assert (first.ip, first.port) == (ipaddress.IPv4Address("203.0.113.9"), 443)
    assert (other_port.ip, other_port.port) == (ipaddress.IPv4Address("203.0.113.9"), 80)


def test_the_memo_is_bounded() -> None:
    for number in range(netfilter.MAX_REMEMBERED_DESTINATIONS + 10):
        netfilter.original_destination(KernelAnswer("198.18.0.1", 1 + number), CLIENT)
    assert 0 < len(netfilter._destinations) <= netfilter.MAX_REMEMBERED_DESTINATIONS


def test_hostnames_are_interned_with_the_root_dot_dropped() -> None:
    built = "".join(["api.", "example.test."])
    assert _without_root_dot(built) is sys.intern("api.example.test")
    assert _without_root_dot(".") is None
    assert _without_root_dot(None) is None


class BothTables:
    """A socket whose conntrack answer depends on the table asked: v4 or v6."""

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        if level == socket.SOL_IP:
            return struct.pack("!HH4s8x", socket.AF_INET, 80, socket.inet_aton("203.0.113.20"))
        assert (level, option) == (socket.IPPROTO_IPV6, netfilter.IP6T_SO_ORIGINAL_DST)
        address = socket.inet_pton(socket.AF_INET6, "2001:db8::20")
        return struct.pack("!HHI16sI", socket.AF_INET6, 443, 0, address, 0)[:buflen]


def test_the_client_address_picks_the_table_asked() -> None:
    """An IPv6 client's entry is IPv6; a v4 client's is IPv4, also on a dual-stack socket."""
    answers = {
        peer: netfilter.original_destination(BothTables(), peer)
        for peer in ("198.51.100.7", "::ffff:198.51.100.7", "2001:db8::7")
    }
    v4 = (ipaddress.IPv4Address("203.0.113.20"), 80)
    assert (answers["198.51.100.7"].ip, answers["198.51.100.7"].port) == v4
    assert (answers["::ffff:198.51.100.7"].ip, answers["::ffff:198.51.100.7"].port) == v4
    v6 = (ipaddress.IPv6Address("2001:db8::20"), 443)
    assert (answers["2001:db8::7"].ip, answers["2001:db8::7"].port) == v6


def test_an_ipv4_mapped_host_is_its_ipv4_address_however_written() -> None:
    """A dual-stack socket's peer, a route's backend, a name's mapped answer: the packets
    are IPv4, and the loop guard and the access log know the IPv4 address."""
    assert netfilter.plain_host("::ffff:198.51.100.2") == "198.51.100.2"
    assert netfilter.plain_host("::FFFF:c633:6402") == "198.51.100.2"
    for host in ("198.51.100.2", "2001:db8::ffff:1", "ffff::1", "::1", "fe80::1%eth0", "h.example"):
        assert netfilter.plain_host(host) == host
