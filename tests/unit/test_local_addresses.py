"""The loop guard's question "is this address the host's own?", asked of the kernel's
routing table over netlink (binding cannot tell where ip_nonlocal_bind is set)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from egressproxy import netfilter


@pytest.mark.parametrize("address", ["127.0.0.1", "127.9.9.9", "::1", "0.0.0.0", "::"])
def test_loopback_and_unspecified_addresses_are_the_hosts(address: str) -> None:
    assert netfilter.is_local_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["198.51.100.7", "2001:db8::7"])
def test_documentation_addresses_are_not(address: str) -> None:
    assert not netfilter.is_local_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["203.0.113.9", "2001:db8::9"])
def test_the_request_is_one_well_formed_route_lookup(address: str) -> None:
    parsed = ipaddress.ip_address(address)
    request = netfilter.route_request(parsed)
    length, message_type, flags, _, _ = netfilter.NLMSG_HEADER.unpack_from(request)
    assert (length, message_type, flags) == (len(request), netfilter.RTM_GETROUTE, 1)
    family, destination_bits = request[16], request[17]
    assert family == (socket.AF_INET6 if parsed.version == 6 else socket.AF_INET)
    assert destination_bits == len(parsed.packed) * 8
    attribute_length, attribute_type = struct.unpack_from("=HH", request, 28)
    assert (attribute_length, attribute_type) == (4 + len(parsed.packed), netfilter.RTA_DST)
    assert request[32:] == parsed.packed


def reply(message_type: int, route_type: int) -> bytes:
    route = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 2, 254, route_type, 0)
    return netfilter.NLMSG_HEADER.pack(16 + len(route), message_type, 0, 1, 0) + route


def test_only_a_route_of_type_local_is_local() -> None:
    assert netfilter.is_local_route(reply(netfilter.RTM_NEWROUTE, netfilter.RTN_LOCAL))
    assert not netfilter.is_local_route(reply(netfilter.RTM_NEWROUTE, 1))  # unicast
    assert not netfilter.is_local_route(reply(2, netfilter.RTN_LOCAL))  # NLMSG_ERROR
    assert not netfilter.is_local_route(reply(netfilter.RTM_NEWROUTE, netfilter.RTN_LOCAL)[:23])


@pytest.fixture
def netlink_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """socket(AF_NETLINK) fails, as under systemd's RestrictAddressFamilies."""
    real_socket = socket.socket

    def no_netlink(family: int = -1, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_NETLINK:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(netfilter.socket, "socket", no_netlink)


@pytest.mark.usefixtures("netlink_forbidden")
@pytest.mark.parametrize(("address", "local"), [("127.0.0.1", True), ("198.51.100.7", False)])
def test_where_netlink_is_forbidden_binding_answers(address: str, local: bool) -> None:
    """systemd's RestrictAddressFamilies makes socket(AF_NETLINK) fail: the error escaped
    connection_made, and the connection hung, uncounted, holding its place."""
    assert netfilter.is_local_address(ipaddress.ip_address(address)) is local


@pytest.mark.usefixtures("netlink_forbidden")
def test_without_netlink_nor_a_meaningful_bind_no_address_is_the_hosts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With ip_nonlocal_bind set every address binds: the bind answer, yes for every
    address, refused every connection to another host's port 15001 as a loop. The
    proxy's own connection to its listener is still caught when it arrives."""
    for version in (4, 6):
        (tmp_path / f"ipv{version}").mkdir()
        (tmp_path / f"ipv{version}" / "ip_nonlocal_bind").write_text("1\n")
    monkeypatch.setattr(netfilter, "NONLOCAL_BIND", str(tmp_path / "ipv{}" / "ip_nonlocal_bind"))
    assert not netfilter.is_local_address(ipaddress.ip_address("127.0.0.1"))
    assert not netfilter.is_local_address(ipaddress.ip_address("::1"))
