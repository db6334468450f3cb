"""The proxy's upstream connections leave from PROXY_SOURCE_PORTS, which workloads are not
given, so the two never share a conntrack tuple (netfilter.PROXY_SOURCE_PORTS)."""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from egressproxy import upstream
from egressproxy.errors import UpstreamError
from egressproxy.lookups import LookupThreads
from egressproxy.netfilter import PROXY_SOURCE_PORTS, source_ports_conflict
from egressproxy.splice import Splicer
from egressproxy.timeouts import TimeoutQueue

OURS = f"{PROXY_SOURCE_PORTS.start}-{PROXY_SOURCE_PORTS.stop - 1}"


def test_linux_default_ephemeral_ports_do_not_conflict() -> None:
    assert source_ports_conflict("32768\t60999\n", "\n") is None


def test_a_widened_ephemeral_range_conflicts_and_says_how_to_fix_it() -> None:
    problem = source_ports_conflict("1024\t65535\n", "\n")
    assert problem is not None
    assert f"net.ipv4.ip_local_reserved_ports={OURS}" in problem
    assert "1024-65535" in problem


def test_reserving_the_proxy_ports_resolves_the_conflict() -> None:
    assert source_ports_conflict("1024 65535", f"8080,{OURS},40000-40010") is None
    half = f"{PROXY_SOURCE_PORTS.start}-{PROXY_SOURCE_PORTS.start + 100}"
    assert source_ports_conflict("1024 65535", half) is not None


@given(
    low=st.integers(1, 65535),
    span=st.integers(0, 65535),
    reserved=st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 3000)), max_size=6),
)
def test_a_conflict_is_exactly_an_unreserved_shared_port(
    low: int, span: int, reserved: list[tuple[int, int]]
) -> None:
    high = min(65535, low + span)
    reserved_ports = {port for first, extra in reserved for port in range(first, first + extra + 1)}
    text = ",".join(
        f"{first}-{first + extra}" if extra else str(first) for first, extra in reserved
    )
    shared = set(range(low, high + 1)) & set(PROXY_SOURCE_PORTS) - reserved_ports
    assert (source_ports_conflict(f"{low} {high}", text) is not None) == bool(shared)


def test_source_ports_go_round_the_whole_range_from_a_random_start() -> None:
    ports = upstream.SourcePorts(range(100, 104))
    taken = [ports.take() for _ in range(8)]
    assert sorted(taken[:4]) == [100, 101, 102, 103]
    assert taken[4:] == taken[:4]
    assert all((b - a) % 4 == 1 for a, b in itertools.pairwise(taken))


async def _connect(port: int, mark: int | None) -> tuple[asyncio.Transport, asyncio.Protocol]:
    loop = asyncio.get_running_loop()
    return await upstream.connect(
        "127.0.0.1",
        port,
        asyncio.Protocol,
        timeouts=TimeoutQueue(loop, 5.0),
        mark=mark,
        connector=Splicer(loop).connect,
        lookups=LookupThreads(),
    )


async def _echo_server(host: str) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("mark", [None, 7])
def test_upstream_connections_leave_from_the_proxy_ports(mark: int | None) -> None:
    async def scenario() -> list[int]:
        server, port = await _echo_server("127.0.0.1")
        transports = []
        try:
            for _ in range(5):
                transport, _ = await _connect(port, mark)
                transports.append(transport)
            return [transport.get_extra_info("sockname")[1] for transport in transports]
        finally:
            for transport in transports:
                transport.abort()
            server.close()

    ports = uvloop.run(scenario())
    assert all(port in PROXY_SOURCE_PORTS for port in ports), ports
    assert len(set(ports)) == 5


def test_a_taken_source_port_is_skipped() -> None:
    """A listener on the next port and a live connection to the same destination from
    the port after it: the connect moves on to a free one."""

    async def scenario() -> int:
        server, port = await _echo_server("127.0.0.1")
        ports = upstream._source_ports
        blocker = socket.socket()
        try:  # closed on every path: a bind that failed here once hung the run in uvloop's
            # close, where pytest-timeout cannot reach
            blocker.bind(("0.0.0.0", PROXY_SOURCE_PORTS[0]))
            blocker.listen()
            ports.position = 1
            first, _ = await _connect(port, None)
            try:
                assert first.get_extra_info("sockname")[1] == PROXY_SOURCE_PORTS[1]
                ports.position = 0
                second, _ = await _connect(port, None)
                second.abort()
                return int(second.get_extra_info("sockname")[1])
            finally:
                first.abort()
        finally:
            blocker.close()
            server.close()

    assert uvloop.run(scenario()) == PROXY_SOURCE_PORTS[2]


def test_when_every_attempt_is_taken_the_error_is_named() -> None:
    async def scenario() -> None:
        server, port = await _echo_server("127.0.0.1")
        original = upstream._source_ports
        upstream._source_ports = upstream.SourcePorts(
            range(PROXY_SOURCE_PORTS[0], PROXY_SOURCE_PORTS[0] + 1)
        )
        blocker = socket.socket()
        try:  # as in test_a_taken_source_port_is_skipped
            blocker.bind(("0.0.0.0", PROXY_SOURCE_PORTS[0]))
            blocker.listen()
            with pytest.raises(UpstreamError) as raised:
                await _connect(port, None)
            assert raised.value.kind == "no_source_port"
        finally:
            upstream._source_ports = original
            blocker.close()
            server.close()

    uvloop.run(scenario())


def test_the_workers_shares_split_the_range() -> None:
    original = upstream._source_ports
    try:
        for workers in (1, 2, 3, 7):
            shares = []
            for index in range(workers):
                upstream.take_worker_share(index, workers)
                shares.append(set(upstream._source_ports.ports))
            assert set().union(*shares) == set(PROXY_SOURCE_PORTS)
            assert sum(len(share) for share in shares) == len(PROXY_SOURCE_PORTS)
    finally:
        upstream._source_ports = original
