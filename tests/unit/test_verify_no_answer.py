"""The resolver gives no answer (EAI_AGAIN, the lookup queue full, the verification timeout):
enforce still fails closed, as a DNS error, and log lets the traffic pass; either way it is
counted in egress_destination_unverified_total, never as a destination mismatch, which an
operator reads as spoofing. Real Flow, handlers, lookup threads, metrics and access log on
loopback; only getaddrinfo is the test's."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from egressproxy.metrics import Metrics
from egressproxy.server import Reporting
from egressproxy.settings import LogFormat, VerifyDestination
from egressproxy.verify import Resolver
from tests.e2e.http_servers import H2Server, h1
from tests.unit.http_harness import (
    ALLOW_ALL,
    LOOPBACK_NETWORK,
    LoopbackProxy,
    echo,
    local,
    loopback_proxy,
    origin,
    proxy_to_origin,
)
from tests.unit.test_accesslog import Lines
from tests.unit.test_http2_proxy import Answer, connect_h2
from tests.unit.test_lookup_overload import HUNG, drained, fill_the_queue, get, stuck_names
from tests.unit.test_metrics import Sample, scrape
from tests.unit.test_sniff_tls import client_hello, frame, sni_extension
from tests.unit.test_verify import SystemResolver

TIMEOUT = 5.0
ENFORCE, LOG = VerifyDestination.ENFORCE, VerifyDestination.LOG
MISMATCH = "egress_destination_mismatch_total"
UNVERIFIED = "egress_destination_unverified_total"
NO_ANSWER_BODY = b"destination could not be verified: no answer from the resolver\n"


@dataclass
class Reported:
    """What the proxy reported: its metrics registry and its JSON access log."""

    registry: CollectorRegistry
    lines: Lines

    def samples(self, name: str) -> list[Sample]:
        return scrape(self.registry).get(name, [])

    def errors(self) -> list[str]:
        """The `error` of each access-log line (one per request or spliced connection)."""
        return [json.loads(line)["error"] for line in self.lines.lines()]


def reported(proxy: LoopbackProxy) -> Reported:
    """The proxy reports to real metrics and a real access log from now on."""
    registry, lines = CollectorRegistry(), Lines(LogFormat.JSON)
    proxy.context.accounting = Reporting(Metrics(registry, max_hostnames=10), lines.access_log)
    return Reported(registry, lines)


async def all_closed(proxy: LoopbackProxy) -> None:
    async with asyncio.timeout(TIMEOUT):
        while proxy.context.open_flows.flows:
            await asyncio.sleep(0.01)


def outcome(mode: VerifyDestination) -> tuple[str, str]:
    """The HTTP status and the error word a request whose name got no answer ends with."""
    return ("421", "dns_error") if mode is ENFORCE else ("200", "")


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [ENFORCE, LOG])
async def test_an_http1_request_refused_a_lookup_is_unverified_not_a_mismatch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: VerifyDestination,
) -> None:
    """Every lookup thread stuck and the queue full: the Host cannot even be looked up.
    enforce answers 421 with error dns_error; log forwards the request. Either is counted
    unverified by mode, and no mismatch; once lookups work the same name is verified."""
    async with proxy_to_origin(
        h1, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=mode
    ) as proxy:
        meters = reported(proxy)
        with stuck_names(monkeypatch) as names:
            waiting = await fill_the_queue(proxy.context.resolver.threads, names)
            with caplog.at_level(logging.WARNING, logger="egressproxy.verify"):
                unanswered = await get(proxy, "/", host="name.test")
            await drained(waiting, names)
            verified = await get(proxy, "/", host="name.test")
            await all_closed(proxy)
    status, error = outcome(mode)
    assert (str(unanswered[0]), verified[0]) == (status, 200)
    if mode is ENFORCE:
        assert unanswered[1] == NO_ANSWER_BODY, "not told it was a mismatch"
    statuses = sorted(
        (labels["http_status"], labels["error"], value)
        for labels, value in meters.samples("outbound_http_route_request_statuses_total")
    )
    assert statuses == (
        [("200", "", 1.0), ("421", "dns_error", 1.0)] if mode is ENFORCE else [("200", "", 2.0)]
    )
    assert meters.samples(UNVERIFIED) == [({"hostname": "name.test", "mode": mode.value}, 1.0)]
    assert meters.samples(MISMATCH) == []
    assert meters.errors() == [error, ""]
    assert "name.test: no answer from the resolver: too many lookups waiting" in caplog.text
    assert "cannot tell whether name.test resolves to 127.0.0.1: no answer" in caplog.text


TCP_ROUTE = (
    LOOPBACK_NETWORK
    + """\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: spliced
  namespace: linkerd-egress
spec:
  parentRefs:
  - {{name: loopback, kind: EgressNetwork, group: policy.linkerd.io, port: {port}}}
  rules:
  - backendRefs:
    - {{name: loopback, kind: EgressNetwork, group: policy.linkerd.io}}
"""
)
"""The origin's port spliced whole: HTTP/1 there is decided once, for the connection."""


@pytest.mark.asyncio
async def test_a_spliced_http1_connection_refused_a_lookup_is_told_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP/1 on a TCPRoute's port is spliced, decided for the connection on its Host:
    under enforce with the lookup queue full, its 421 says the destination could not be
    verified (not that it does not match), and the connection ends as dns_error."""
    async with origin(h1) as port:
        policy = TCP_ROUTE.format(port=port)
        async with loopback_proxy(
            tmp_path, monkeypatch, policy, local(port), verify_destination=ENFORCE
        ) as proxy:
            meters = reported(proxy)
            with stuck_names(monkeypatch) as names:
                waiting = await fill_the_queue(proxy.context.resolver.threads, names)
                status, body = await get(proxy, "/", host="name.test")
                await drained(waiting, names)
            await all_closed(proxy)
    assert (status, body) == (421, NO_ANSWER_BODY)
    assert meters.errors() == ["dns_error"]
    assert meters.samples(UNVERIFIED) == [({"hostname": "name.test", "mode": "enforce"}, 1.0)]


NAMED_TLS = f"""\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
  rules:
  - name: named
    hosts: [name{HUNG}]
"""
"""A rule for the hung name by host: its TLS is on the TLS route family (ALLOW_ALL's is
tcp-egress-allow, spliced as opaque TCP)."""


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [ENFORCE, LOG])
@pytest.mark.parametrize(
    ("policy", "family", "route"),
    [(NAMED_TLS, "tls", "test.named"), (ALLOW_ALL, "tcp", "tcp-egress-allow")],
    ids=["tls-route", "tcp-route"],
)
async def test_a_spliced_connection_whose_name_times_out_is_unverified_not_a_mismatch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: VerifyDestination,
    policy: str,
    family: str,
    route: str,
) -> None:
    """A ClientHello whose SNI's lookup outlasts the resolver's timeout, on a TLS route and
    on a TCP one: enforce closes it unspliced with error dns_error, log splices it at once,
    without waiting for the answer. Either is counted unverified by mode, and no mismatch."""
    hello = frame(client_hello([sni_extension(f"name{HUNG}".encode())]))
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, policy, verify_destination=mode
    ) as proxy:
        proxy.context.resolver = Resolver(timeout=1.0)
        meters = reported(proxy)
        with stuck_names(monkeypatch), caplog.at_level(logging.WARNING):
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(hello)
            if mode is ENFORCE:
                answer = await asyncio.wait_for(reader.read(), TIMEOUT)
            else:
                answer = await asyncio.wait_for(reader.readexactly(len(hello)), TIMEOUT)
                assert meters.samples(UNVERIFIED) == [], "spliced only once the lookup gave up"
                async with asyncio.timeout(TIMEOUT):
                    while not meters.samples(UNVERIFIED):
                        await asyncio.sleep(0.01)
            writer.close()
            await all_closed(proxy)
    error = "dns_error" if mode is ENFORCE else ""
    assert answer == (b"" if mode is ENFORCE else hello)
    closes = [
        (labels["route_name"], labels["error"], value)
        for labels, value in meters.samples(f"outbound_{family}_route_close_total")
        if value
    ]
    assert closes == [(route, error, 1.0)]
    other = "tcp" if family == "tls" else "tls"
    assert meters.samples(f"outbound_{other}_route_close_total") == []
    assert meters.samples(UNVERIFIED) == [({"hostname": f"name{HUNG}", "mode": mode.value}, 1.0)]
    assert meters.samples(MISMATCH) == []
    assert meters.errors() == [error]
    assert f"name{HUNG}: no answer from the resolver within 1.0s" in caplog.text


GRPC_ROUTE = TCP_ROUTE.replace("kind: TCPRoute", "kind: GRPCRoute").replace(
    "name: spliced", "name: echo"
)
"""Every gRPC call to the origin's port allowed by one GRPCRoute."""


async def h2_under_enforce(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    requests: list[dict[str, Any]],
    policy: str = ALLOW_ALL,
) -> tuple[list[Answer], Reported]:
    """The requests on one h2 connection to an h2 origin, under enforce, with a resolver
    that says EAI_AGAIN for flaky.test: their answers, and what the proxy reported.
    policy: formatted with the origin's port."""
    monkeypatch.setattr(socket, "getaddrinfo", SystemResolver({"flaky.test": socket.EAI_AGAIN}))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(H2Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with loopback_proxy(
            tmp_path, monkeypatch, policy.format(port=port), local(port), verify_destination=ENFORCE
        ) as proxy:
            meters = reported(proxy)
            client = await connect_h2(proxy)
            answers = [client.request(**request) for request in requests]
            async with asyncio.timeout(TIMEOUT):
                for answer in answers:
                    await answer.done.wait()
            client.transport.close()
            await all_closed(proxy)
    finally:
        server.close()
    return answers, meters


@pytest.mark.asyncio
async def test_an_h2_stream_whose_resolver_says_try_again_is_unverified_not_a_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getaddrinfo fails with EAI_AGAIN for one :authority: under enforce its stream is
    answered 421 with error dns_error, the other stream on the connection passes."""
    (good, flaky), meters = await h2_under_enforce(
        tmp_path,
        monkeypatch,
        [
            {"method": "GET", "path": "/a", "authority": "127.0.0.1"},
            {"method": "GET", "path": "/a", "authority": "flaky.test"},
        ],
    )
    assert (good.headers[":status"], flaky.headers[":status"]) == ("200", "421")
    assert bytes(flaky.body) == NO_ANSWER_BODY
    statuses = sorted(
        (labels["hostname"], labels["http_status"], labels["error"], value)
        for labels, value in meters.samples("outbound_http_route_request_statuses_total")
    )
    assert statuses == [("", "200", "", 1.0), ("flaky.test", "421", "dns_error", 1.0)]
    assert meters.samples(UNVERIFIED) == [({"hostname": "flaky.test", "mode": "enforce"}, 1.0)]
    assert meters.samples(MISMATCH) == []


@pytest.mark.asyncio
async def test_a_grpc_call_whose_name_got_no_answer_is_unavailable_not_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under enforce a gRPC call whose :authority the resolver cannot answer for is refused
    in trailers-only form with UNAVAILABLE (14), which a client may retry, not with the
    PERMISSION_DENIED (7) of a deny or a mismatch; on a GRPCRoute's port its metric says
    UNAVAILABLE too."""
    (call,), meters = await h2_under_enforce(
        tmp_path,
        monkeypatch,
        [
            {
                "method": "POST",
                "path": "/test.Echo/Say",
                "headers": {"content-type": "application/grpc"},
                "authority": "flaky.test",
            }
        ],
        GRPC_ROUTE,
    )
    assert (call.headers[":status"], call.headers["grpc-status"]) == ("200", "14")
    statuses = [
        (labels["route_name"], labels["grpc_status"], labels["error"], value)
        for labels, value in meters.samples("outbound_grpc_route_request_statuses_total")
    ]
    assert statuses == [("echo", "UNAVAILABLE", "dns_error", 1.0)]
    assert meters.samples(UNVERIFIED) == [({"hostname": "flaky.test", "mode": "enforce"}, 1.0)]
    assert meters.errors() == ["dns_error"]
