"""Destination verification and audit mode on loopback: the real Flow, policy and handlers,
with resolvers whose answers the tests choose."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from egressproxy.accesslog import decision_word
from egressproxy.policy.decision import IPAddress
from egressproxy.settings import EchPolicy, VerifyDestination
from egressproxy.verify import Resolver
from tests.e2e.http_servers import H2Server, h1
from tests.unit.http_harness import ALLOW_ALL, LoopbackProxy, echo, proxy_to_origin
from tests.unit.test_http1_proxy import read_response
from tests.unit.test_http2_proxy import connect_h2, proxy_to_h2_origin
from tests.unit.test_sniff_tls import client_hello, extension, frame, sni_extension

TIMEOUT = 5.0
HELLO = frame(client_hello([sni_extension(b"slow.test")]))


class HeldResolver(Resolver):
    """Every name resolves to 127.0.0.1 (the loopback origin), once `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.lookups: list[str] = []

    async def _lookup(self, hostname: str) -> frozenset[IPAddress]:
        self.lookups.append(hostname)
        await self.release.wait()
        return frozenset({ipaddress.ip_address("127.0.0.1")})


class Elsewhere(Resolver):
    """Every name resolves to an address that is not the loopback origin's."""

    async def _lookup(self, hostname: str) -> frozenset[IPAddress]:
        return frozenset({ipaddress.ip_address("203.0.113.99")})


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


def decided(proxy: LoopbackProxy, count: int) -> bool:
    flows = proxy.context.open_flows.flows
    return len(flows) == count and all(flow.record.decision for flow in flows)


@pytest.mark.asyncio
async def test_a_client_leaving_during_a_shared_lookup_leaves_the_others_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP/2 client asks first and goes away (its stream's task is cancelled); a TLS
    client asking about the same name meanwhile still gets the answer, is spliced, and is
    finished."""
    resolver = HeldResolver()
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=VerifyDestination.ENFORCE
    ) as proxy:
        proxy.context.resolver = resolver
        leaving = await connect_h2(proxy)
        leaving.request("GET", "/", authority="slow.test")
        await until(lambda: resolver.lookups == ["slow.test"])
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(HELLO)
        await until(lambda: decided(proxy, 2))
        await asyncio.sleep(0.05)
        leaving.transport.abort()
        await proxy.wait_closed_flows(1)
        resolver.release.set()
        assert await asyncio.wait_for(reader.readexactly(len(HELLO)), TIMEOUT) == HELLO
        writer.close()
        await proxy.wait_closed_flows(2)
        assert not proxy.context.open_flows.flows
    assert resolver.lookups == ["slow.test"]
    assert [(flow.detected.value, flow.error) for flow in proxy.ledger.flows][1:] == [("tls", "")]


@pytest.mark.asyncio
async def test_a_connection_aborted_while_verifying_is_finished_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain timeout cuts a TLS connection whose name is still being looked up: it is
    reported (error=drain) and leaves the open flows at once, not when the answer comes."""
    resolver = HeldResolver()
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=VerifyDestination.ENFORCE
    ) as proxy:
        proxy.context.resolver = resolver
        _, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(HELLO)
        await until(lambda: resolver.lookups == ["slow.test"])
        (flow,) = proxy.context.open_flows.flows
        flow.abort()
        await proxy.wait_closed_flows(1)
        assert not proxy.context.open_flows.flows
        writer.close()
        resolver.release.set()
        await asyncio.sleep(0.05)
    assert [flow.error for flow in proxy.ledger.flows] == ["drain"]


class HeldElsewhere(HeldResolver):
    """Every name resolves to an address that is not the loopback origin's, once `release`
    is set."""

    async def _lookup(self, hostname: str) -> frozenset[IPAddress]:
        await super()._lookup(hostname)
        return frozenset({ipaddress.ip_address("203.0.113.99")})


async def served_while_held(proxy: LoopbackProxy, kind: str) -> None:
    """One TLS connection spliced, or one HTTP/1 or h2 request answered, for slow.test."""
    if kind == "h2":
        client = await connect_h2(proxy)
        answer = client.request("GET", "/a", authority="slow.test")
        await asyncio.wait_for(answer.done.wait(), LOOKUP_HELD)
        assert answer.headers[":status"] == "200"
        client.transport.close()
        return
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    if kind == "tls":
        writer.write(HELLO)
        assert await asyncio.wait_for(reader.readexactly(len(HELLO)), LOOKUP_HELD) == HELLO
    else:
        writer.write(b"GET /a HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), LOOKUP_HELD))[0] == 200
    writer.close()


LOOKUP_HELD = 2.0
"""How long the tests below hold a lookup: less than the resolver's timeout (5 s), so
traffic that waited for the answer would not be served within it."""


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["tls", "http1", "h2"])
async def test_log_serves_the_traffic_while_the_lookup_is_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """--verify-destination log observes: two clients' traffic for a name whose lookup has
    not answered goes on at once, and when the answer comes (elsewhere) one lookup counts
    both as mismatches. Enforce waits for it (test_a_client_leaving_during_a_shared_lookup…)."""
    resolver = HeldElsewhere()
    log = VerifyDestination.LOG
    if kind == "h2":
        serving = proxy_to_h2_origin(H2Server, tmp_path, monkeypatch, verify_destination=log)
    else:
        handler = echo if kind == "tls" else h1
        serving = proxy_to_origin(handler, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=log)
    async with serving as proxy:
        proxy.context.resolver = resolver
        for _ in range(2):
            await served_while_held(proxy, kind)
        assert proxy.ledger.unconfirmed == []
        resolver.release.set()
        await proxy.wait_unconfirmed(1)
        await proxy.wait_closed_flows(2)
    assert resolver.lookups == ["slow.test"]
    assert proxy.ledger.unconfirmed == [("destination_mismatch", "slow.test", "log", 2)]
    assert [flow.error for flow in proxy.ledger.flows] == ["", ""]


AUDITED_ENFORCED = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: deny
  audit: true
  verifyDestination: enforce
  rules:
  - name: allowed
    hosts: [allowed.example]
"""


@pytest.mark.asyncio
async def test_an_audited_network_lets_a_mismatch_pass_and_logs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit's contract is that traffic passes: under enforce, an HTTP request (allowed or
    a would-deny) and a TLS connection whose names resolve elsewhere are not refused, and
    the mismatch is recorded as logged."""
    async with proxy_to_origin(h1, tmp_path, monkeypatch, AUDITED_ENFORCED) as proxy:
        proxy.context.resolver = Elsewhere()
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        for host in ("allowed.example", "other.example"):
            writer.write(f"GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert (await asyncio.wait_for(read_response(reader), TIMEOUT))[0] == 200, host
        await proxy.wait_unconfirmed(2)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [(r.hostname, r.error) for r in proxy.ledger.requests] == [
        ("allowed.example", ""),
        ("other.example", ""),
    ]
    assert proxy.ledger.unconfirmed == [
        ("destination_mismatch", "allowed.example", "log", 1),
        ("destination_mismatch", "other.example", "log", 1),
    ]
    async with proxy_to_origin(echo, tmp_path, monkeypatch, AUDITED_ENFORCED) as proxy:
        proxy.context.resolver = Elsewhere()
        hello = frame(client_hello([sni_extension(b"allowed.example")]))
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(hello)
        assert await asyncio.wait_for(reader.readexactly(len(hello)), TIMEOUT) == hello
        await proxy.wait_unconfirmed(1)
        writer.close()
        await proxy.wait_closed_flows(1)
    assert [flow.error for flow in proxy.ledger.flows] == [""]
    assert proxy.ledger.unconfirmed == [("destination_mismatch", "allowed.example", "log", 1)]


UNCOVERED = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: deny
  networks: [203.0.113.0/24]
"""
"""A policy whose network leaves the loopback origin uncovered."""
ECH_HELLO = frame(client_hello([sni_extension(b"public.example"), extension(0xFE0D, bytes(8))]))
PADDED_HELLO = client_hello([sni_extension(b"public.example"), extension(21, bytes(400))])
SPLIT_HELLO = frame(PADDED_HELLO, [1] * 300)
"""A hello cut into more one-byte records than the sniffer reads: one hiding its SNI."""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("hello", "settings", "outcome"),
    [(ECH_HELLO, {"ech": EchPolicy.DENY}, "tls"), (SPLIT_HELLO, {}, "too_many_records")],
    ids=["ech-deny", "split-hello"],
)
async def test_under_audit_the_proxys_own_tls_denials_pass_where_no_network_covers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hello: bytes,
    settings: dict[str, object],
    outcome: str,
) -> None:
    """--audit means no denial stops traffic: an ECH hello under --ech deny, or a hello split
    to hide its SNI, to an address no network covers passes as would_deny, as it does to an
    address a network covers."""
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, UNCOVERED, audit=True, **settings
    ) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(hello)
        assert await asyncio.wait_for(reader.readexactly(len(hello)), TIMEOUT) == hello
        writer.close()
        await proxy.wait_closed_flows(1)
    (flow,) = proxy.ledger.flows
    assert (flow.sniff_outcome, decision_word(flow.decision), flow.error) == (
        outcome,
        "would_deny",
        "",
    )
