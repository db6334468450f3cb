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

    family = socket.AF_INET

    def __init__(self, address: str, port: int) -> None:
        self.raw = struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(address))

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        assert (level, option) == (socket.SOL_IP, netfilter.SO_ORIGINAL_DST)
        return self.raw[:buflen]

    def getpeername(self) -> tuple[str, int]:
        return ("198.51.100.7", 40000)


def test_connections_to_one_destination_share_it_and_others_do_not() -> None:
    first = netfilter.original_destination(KernelAnswer("203.0.113.9", 443))
    second = netfilter.original_destination(KernelAnswer("203.0.113.9", 443))
    other_port = netfilter.original_destination(KernelAnswer("203.0.113.9", 80))
    assert first is second
    assert (first.ip, first.port) == (ipaddress.IPv4Address("203.0.113.9"), 443)
    assert (other_port.ip, other_port.port) == (ipaddress.IPv4Address("203.0.113.9"), 80)


def test_the_memo_is_bounded() -> None:
    for number in range(netfilter.MAX_REMEMBERED_DESTINATIONS + 10):
        netfilter.original_destination(KernelAnswer("198.18.0.1", 1 + number))
    assert 0 < len(netfilter._destinations) <= netfilter.MAX_REMEMBERED_DESTINATIONS


def test_hostnames_are_interned_with_the_root_dot_dropped() -> None:
    built = "".join(["api.", "example.test."])
    assert _without_root_dot(built) is sys.intern("api.example.test")
    assert _without_root_dot(".") is None
    assert _without_root_dot(None) is None
