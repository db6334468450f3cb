"""Metrics through a real redirect: traffic of each kind from the client namespace, then one
scrape of /metrics, parsed with prometheus-client and checked label by label (issue 5).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from . import servers
from .clients import TlsClient, closed_by_peer, echo_once, http_request, recv_until_eof
from .netns import NamespaceHTTPConnection
from .proxy_process import ADMIN_HOST, ADMIN_PORT, Proxy
from .world import BLACKHOLE_V4, World

pytestmark = pytest.mark.e2e

StartProxy = Callable[..., Proxy]
Labels = dict[str, str]
Sample = tuple[Labels, float]

CURL_TIMEOUT = 10.0
SCRAPE_TIMEOUT = 5.0
GUIDE_STEP_4 = (
    Path(__file__).resolve().parents[2] / "config" / "examples" / "linkerd-4-tlsroute.yaml"
)
REFUSED_PORT = 81
"""Nothing listens there on the fake hosts: connections are refused."""

TCP_ROUTE = f"""
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: echo, namespace: egress-test}}
spec:
  parentRefs:
  - name: all-egress-traffic
    kind: EgressNetwork
    group: policy.linkerd.io
    port: {servers.ECHO_PORT}
  - name: all-egress-traffic
    kind: EgressNetwork
    group: policy.linkerd.io
    port: {REFUSED_PORT}
  rules: [{{}}]
"""


def scrape(proxy: Proxy, accept: str) -> tuple[str, str]:
    connection = NamespaceHTTPConnection(
        proxy.world.client_ns, ADMIN_HOST, ADMIN_PORT, SCRAPE_TIMEOUT
    )
    try:
        connection.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        response = connection.getresponse()
        assert response.status == 200
        return response.headers["content-type"], response.read().decode()
    finally:
        connection.close()


def samples_of(body: str) -> dict[str, list[Sample]]:
    by_name: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append((sample.labels, sample.value))
    return by_name


def openmetrics_families(body: str) -> list[Metric]:
    return list(openmetrics_parser.text_string_to_metric_families(body))  # type: ignore[no-untyped-call]


def route(port: int, kind: str, name: str, **extra: str) -> Labels:
    is_default = kind == "default"
    return {
        "parent_group": "policy.linkerd.io",
        "parent_kind": "EgressNetwork",
        "parent_namespace": "egress-test",
        "parent_name": "all-egress-traffic",
        "parent_port": str(port),
        "parent_section_name": "",
        "route_group": "" if is_default else "gateway.networking.k8s.io",
        "route_kind": kind,
        "route_namespace": "" if is_default else "egress-test",
        "route_name": name,
        **extra,
    }


def unordered(samples: list[Sample]) -> list[tuple[tuple[tuple[str, str], ...], float]]:
    return sorted((tuple(sorted(labels.items())), value) for labels, value in samples)


def curl_status(world: World, *args: str) -> str:
    result = world.curl("-o", "/dev/null", "-w", "%{http_code}", *args, timeout=CURL_TIMEOUT)
    return result.stdout.decode()


def settled(proxy: Proxy, name: str, expected_total: float) -> dict[str, list[Sample]]:
    """Scrape until family `name` adds up to what was sent (closes are counted asynchronously)."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while True:
        samples = samples_of(scrape(proxy, "")[1])
        total = sum(value for _, value in samples.get(name, []))
        if total >= expected_total or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_https_that_curl_finishes_closes_without_an_error(world: World, proxy: StartProxy) -> None:
    """curl ends TLS with its close_notify and a close at once, so the server's close_notify
    meets a closed socket and the client's kernel resets: a download that came whole is
    still no failure (INTERFACE 4: error is empty on success)."""
    running = proxy(GUIDE_STEP_4.read_text())
    for _ in range(3):
        assert curl_status(world, "-4", "https://httpbin.org/get") == "200"
    samples = settled(running, "outbound_tls_route_close_total", 3)
    tls_allowed = route(443, "TLSRoute", "tls-egress", hostname="httpbin.org")
    assert unordered(samples["outbound_tls_route_close_total"]) == unordered(
        [({**tls_allowed, "error": ""}, 3), ({**tls_allowed, "error": "forbidden"}, 0)]
    )
    line = r"protocol=tls [^\n]* error=- "
    assert running.logged(rf"{line}(?s:.*){line}(?s:.*){line}"), running.log_text()
    assert "error=reset" not in running.log_text()


def test_every_kind_of_traffic_then_one_scrape(world: World, proxy: StartProxy) -> None:
    running = proxy(GUIDE_STEP_4.read_text() + TCP_ROUTE, "--connect-timeout", "0.5")
    httpbin = world.host("httpbin.org")

    assert curl_status(world, "-4", "http://httpbin.org/get") == "200"
    assert curl_status(world, "-4", "http://httpbin.org/post") == "403"
    blackholed = f"http://{BLACKHOLE_V4}/get"
    assert curl_status(world, "-4", "-H", "Host: httpbin.org", blackholed) == "504"
    with world.connect(httpbin.v4, 443) as sock:
        tls = TlsClient(sock, world.tls_context(), "httpbin.org")
        tls.handshake()
        tls.send(http_request("httpbin.org", "/get", "Connection: close\r\n"))
        assert tls.recv_http_response()[0] == 200
        sock.shutdown(socket.SHUT_WR)
        recv_until_eof(sock)
    assert curl_status(world, "-4", "https://github.com/") == "000"
    assert curl_status(world, "-4", "http://httpbin.org:443/get") == "403"  # not TLS: denied
    plain = (
        rf"destination={re.escape(httpbin.v4)}:443 protocol=http1 .* status=403 error=forbidden "
    )
    assert running.logged(rf"access client=\S+ {plain}"), running.log_text()
    with world.connect(httpbin.v4, servers.ECHO_PORT) as sock:
        assert echo_once(sock, b"hello\n") == b"hello\n"
    with world.connect(httpbin.v4, REFUSED_PORT) as sock:
        sock.sendall(b"hello\n")
        assert closed_by_peer(sock)
    with world.connect(httpbin.v4, servers.HASH_PORT) as sock:
        sock.sendall(b"hello\n")
        assert closed_by_peer(sock)

    samples = settled(running, "outbound_tcp_route_close_total", 3)
    assert unordered(samples["outbound_http_route_request_statuses_total"]) == unordered(
        [
            (route(80, "HTTPRoute", "httpbin-get", hostname="httpbin.org", http_status="200",
                   error=""), 1),
            (route(80, "default", "http-egress-deny", hostname="httpbin.org", http_status="403",
                   error=""), 1),
            (route(80, "HTTPRoute", "httpbin-get", hostname="httpbin.org", http_status="504",
                   error="connect_timeout"), 1),
        ]
    )  # fmt: skip
    tls_allowed = route(443, "TLSRoute", "tls-egress", hostname="httpbin.org")
    tls_denied = route(443, "default", "tls-egress-deny", hostname="github.com")
    plain_denied = route(443, "default", "tls-egress-deny", hostname="httpbin.org")
    assert unordered(samples["outbound_tls_route_open_total"]) == unordered(
        [(tls_allowed, 1), (tls_denied, 1), (plain_denied, 1)]
    )
    assert unordered(samples["outbound_tls_route_close_total"]) == unordered(
        [
            ({**tls_allowed, "error": ""}, 1),
            ({**tls_allowed, "error": "forbidden"}, 0),
            ({**tls_denied, "error": ""}, 0),
            ({**tls_denied, "error": "forbidden"}, 1),
            ({**plain_denied, "error": ""}, 0),
            ({**plain_denied, "error": "forbidden"}, 1),
        ]
    )
    target = {"target_ip": httpbin.v4}
    echo = route(servers.ECHO_PORT, "TCPRoute", "echo", **target,
                 target_port=str(servers.ECHO_PORT))  # fmt: skip
    refused = route(REFUSED_PORT, "TCPRoute", "echo", **target, target_port=str(REFUSED_PORT))
    denied = route(servers.HASH_PORT, "default", "tcp-egress-deny", **target,
                   target_port=str(servers.HASH_PORT))  # fmt: skip
    assert unordered(samples["outbound_tcp_route_open_total"]) == unordered(
        [(echo, 1), (refused, 1), (denied, 1)]
    )
    assert unordered(samples["outbound_tcp_route_close_total"]) == unordered(
        [
            ({**echo, "error": ""}, 1),
            ({**echo, "error": "forbidden"}, 0),
            ({**refused, "error": ""}, 0),
            ({**refused, "error": "forbidden"}, 0),
            ({**refused, "error": "connect_refused"}, 1),
            ({**denied, "error": ""}, 0),
            ({**denied, "error": "forbidden"}, 1),
        ]
    )
    connect_errors = dict(
        (labels["error"], value)
        for labels, value in samples["egress_upstream_connect_errors_total"]
    )
    assert connect_errors == {"connect_timeout": 1, "connect_refused": 1}
    sniffed = {labels["outcome"]: value for labels, value in samples["egress_sniff_outcomes_total"]}
    assert sniffed["tls"] == 2 and sniffed["http1"] >= 3
    assert samples["egress_open_connections"] == [({}, 0)]
    assert samples["egress_policy_generation"] == [({}, 1)]
    assert "outbound_grpc_route_request_statuses_total" not in samples

    content_type, body = scrape(running, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    opened = {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in openmetrics_families(body)
        for sample in family.samples
        if family.name == "outbound_tls_route_open"
    }
    assert opened == {
        ("outbound_tls_route_open_total", tuple(sorted(labels.items())), value)
        for labels, value in ((tls_allowed, 1.0), (tls_denied, 1.0), (plain_denied, 1.0))
    }
