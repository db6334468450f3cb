"""Metrics: Linkerd's route families sample by sample, operator families, hostname cap, formats.

Decisions come from the real policy index over the guide's manifests (and a
policy with every route kind); the records are what the data plane reports.
Every scrape is parsed with prometheus-client's parsers, never searched as text.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from egressproxy.metrics import (
    CONNECTION_DURATION_BUCKETS,
    MAX_PARENT_PORTS,
    MAX_TARGETS,
    OTHER,
    ROUTE_DURATION_BUCKETS,
    CappedLabels,
    Durations,
    HostnameLabels,
    KeptValues,
    Metrics,
    exposition,
    value_cell,
)
from egressproxy.policy.decision import (
    ConnectionFacts,
    Destination,
    Detected,
    IPAddress,
    RequestFacts,
)
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.loader import load_policy, load_policy_text
from egressproxy.records import FlowRecord, RequestRecord, grpc_status_of
from egressproxy.settings import Settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "config" / "examples"
CLIENT_SETTINGS = Settings(namespace="egress-test")
EXTERNAL = ipaddress.ip_address("203.0.113.5")
CLIENT = "198.18.0.2:40000"
GATEWAY = "gateway.networking.k8s.io"

Labels = dict[str, str]
Sample = tuple[Labels, float]

ROUTE_FAMILIES = {
    "outbound_http_route_request_statuses_total",
    "outbound_grpc_route_request_statuses_total",
    "outbound_tls_route_open_total",
    "outbound_tls_route_close_total",
    "outbound_tcp_route_open_total",
    "outbound_tcp_route_close_total",
}

EVERY_ROUTE_KIND = """
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: egress-test, name: all-egress-traffic}
spec: {trafficPolicy: Deny, networks: [{cidr: 203.0.113.0/24}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: egress-test, name: httpbin-get}
spec:
  parentRefs: [{name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}]
  rules: [{matches: [{path: {value: /get}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: egress-test, name: to-internal}
spec:
  parentRefs: [{name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}]
  rules:
  - matches: [{path: {value: /internal}}]
    backendRefs: [{kind: Service, name: internal-egress, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {namespace: egress-test, name: greeter}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 50051}
  rules: [{matches: [{method: {service: helloworld.Greeter, method: SayHello}}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {namespace: egress-test, name: tls-egress}
spec:
  hostnames: [httpbin.org]
  parentRefs: [{name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}]
  rules: [{}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {namespace: egress-test, name: postgres}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 5432}
  rules: [{}]
"""

AUDITED = """
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: egress-test
  name: audited
  annotations: {egressproxy.io/audit: "true"}
spec: {trafficPolicy: Deny}
"""


# --- building what the data plane reports ------------------------------------------


def guide_step(name: str) -> PolicyIndex:
    return compile_policy(load_policy(EXAMPLES / name), CLIENT_SETTINGS)


def policy(text: str) -> PolicyIndex:
    return compile_policy(load_policy_text(text, "policy.yaml"), CLIENT_SETTINGS)


def request(
    index: PolicyIndex,
    host: str,
    path: str,
    port: int = 80,
    *,
    address: IPAddress = EXTERNAL,
    status: int | None = None,
    grpc_status: int | None = None,
    error: str = "",
    grpc: bool = False,
    sent: int = 0,
    received: int = 0,
) -> RequestRecord:
    method = "POST" if grpc else "GET"
    facts = RequestFacts(Destination(address, port), host, method, path, "", (), grpc=grpc)
    return RequestRecord(
        client=CLIENT,
        destination=facts.destination,
        protocol="h2" if grpc else "http1",
        hostname=host,
        method=method,
        path=path,
        grpc=grpc,
        decision=index.decide_request(facts),
        status=status,
        grpc_status=grpc_status,
        error=error,
        bytes_from_client=sent,
        bytes_from_upstream=received,
    )


def connection(
    index: PolicyIndex,
    detected: Detected,
    port: int,
    hostname: str | None = None,
    *,
    address: IPAddress = EXTERNAL,
    error: str = "",
    sent: int = 0,
    received: int = 0,
) -> FlowRecord:
    destination = Destination(address, port)
    decision = index.decide_connection(ConnectionFacts(destination, detected, hostname))
    outcome = {Detected.TLS: "tls", Detected.HTTP1: "http1", Detected.H2: "h2"}
    return FlowRecord(
        client=CLIENT,
        destination=destination,
        detected=detected,
        hostname=hostname,
        sniff_outcome=outcome.get(detected, "timeout"),
        decision=decision,
        error=error,
        bytes_from_client=sent,
        bytes_from_upstream=received,
    )


def whole_connection(metrics: Metrics, record: FlowRecord) -> None:
    """A connection's life as the data plane reports it."""
    metrics.connection_opened()
    metrics.connection_decided(record)
    metrics.connection_closed(record)


# --- reading a scrape ----------------------------------------------------------------


def scrape(registry: CollectorRegistry, accept: str = "") -> dict[str, list[Sample]]:
    """Sample name -> [(labels, value)] of a Prometheus-text scrape, parsed."""
    body, content_type = exposition(registry, accept)
    assert content_type.startswith("text/plain; version=0.0.4")
    by_name: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append((sample.labels, sample.value))
    return by_name


def openmetrics_families(body: str) -> list[Metric]:
    return list(openmetrics_parser.text_string_to_metric_families(body))  # type: ignore[no-untyped-call]


def only(samples: dict[str, list[Sample]], name: str) -> Sample:
    found = samples.get(name, [])
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def route_labels(
    port: int,
    route_kind: str,
    route_name: str,
    *,
    network: str = "all-egress-traffic",
    **extra: str,
) -> Labels:
    """Linkerd's parent and route labels for a route of the guide's network, written out."""
    is_default = route_kind == "default"
    return {
        "parent_group": "policy.linkerd.io",
        "parent_kind": "EgressNetwork",
        "parent_namespace": "egress-test",
        "parent_name": network,
        "parent_port": str(port),
        "parent_section_name": "",
        "route_group": "" if is_default else GATEWAY,
        "route_kind": route_kind,
        "route_namespace": "" if is_default else "egress-test",
        "route_name": route_name,
        **extra,
    }


NO_ROUTE: Labels = dict.fromkeys(
    (
        "parent_group",
        "parent_kind",
        "parent_namespace",
        "parent_name",
        "parent_port",
        "parent_section_name",
        "route_group",
        "route_kind",
        "route_namespace",
        "route_name",
    ),
    "",
)


def unordered(samples: Iterable[Sample]) -> list[tuple[tuple[tuple[str, str], ...], float]]:
    return sorted((tuple(sorted(labels.items())), value) for labels, value in samples)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, max_hostnames=1000)


# --- the Linkerd guide's samples -------------------------------------------------------


def test_guide_http_egress_allow(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = guide_step("linkerd-1-allow.yaml")
    for _ in range(697):
        metrics.request_finished(request(index, "httpbin.org", "/get", status=200))
    labels, value = only(scrape(registry), "outbound_http_route_request_statuses_total")
    assert labels == {
        "parent_group": "policy.linkerd.io",
        "parent_kind": "EgressNetwork",
        "parent_namespace": "egress-test",
        "parent_name": "all-egress-traffic",
        "parent_port": "80",
        "parent_section_name": "",
        "route_group": "",
        "route_kind": "default",
        "route_namespace": "",
        "route_name": "http-egress-allow",
        "hostname": "httpbin.org",
        "http_status": "200",
        "error": "",
    }
    assert value == 697


def test_guide_http_egress_deny(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = guide_step("linkerd-2-deny.yaml")
    for _ in range(45):
        metrics.request_finished(request(index, "httpbin.org", "/get", status=403))
    labels, value = only(scrape(registry), "outbound_http_route_request_statuses_total")
    assert labels == {
        "parent_group": "policy.linkerd.io",
        "parent_kind": "EgressNetwork",
        "parent_namespace": "egress-test",
        "parent_name": "all-egress-traffic",
        "parent_port": "80",
        "parent_section_name": "",
        "route_group": "",
        "route_kind": "default",
        "route_namespace": "",
        "route_name": "http-egress-deny",
        "hostname": "httpbin.org",
        "http_status": "403",
        "error": "",
    }
    assert value == 45


def test_guide_httproute_httpbin_get(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = guide_step("linkerd-3-httproute.yaml")
    for _ in range(63):
        metrics.request_finished(request(index, "httpbin.org", "/get", status=200))
    labels, value = only(scrape(registry), "outbound_http_route_request_statuses_total")
    assert labels == {
        "parent_group": "policy.linkerd.io",
        "parent_kind": "EgressNetwork",
        "parent_namespace": "egress-test",
        "parent_name": "all-egress-traffic",
        "parent_port": "80",
        "parent_section_name": "",
        "route_group": "gateway.networking.k8s.io",
        "route_kind": "HTTPRoute",
        "route_namespace": "egress-test",
        "route_name": "httpbin-get",
        "hostname": "httpbin.org",
        "http_status": "200",
        "error": "",
    }
    assert value == 63


def test_guide_tlsroute_open(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = guide_step("linkerd-4-tlsroute.yaml")
    for _ in range(2):
        whole_connection(metrics, connection(index, Detected.TLS, 443, "httpbin.org"))
    labels, value = only(scrape(registry), "outbound_tls_route_open_total")
    assert labels == {
        "parent_group": "policy.linkerd.io",
        "parent_kind": "EgressNetwork",
        "parent_namespace": "egress-test",
        "parent_name": "all-egress-traffic",
        "parent_port": "443",
        "parent_section_name": "",
        "route_group": "gateway.networking.k8s.io",
        "route_kind": "TLSRoute",
        "route_namespace": "egress-test",
        "route_name": "tls-egress",
        "hostname": "httpbin.org",
    }
    assert value == 2


def test_guide_tls_egress_deny_close(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = guide_step("linkerd-4-tlsroute.yaml")
    whole_connection(metrics, connection(index, Detected.TLS, 443, "github.com", error="forbidden"))
    closes = scrape(registry)["outbound_tls_route_close_total"]
    ((labels, value),) = [(labels, value) for labels, value in closes if labels["error"]]
    assert [({**labels, "error": ""}, 0)] == [sample for sample in closes if sample[0] != labels]
    assert labels == {
        "parent_group": "policy.linkerd.io",
        "parent_kind": "EgressNetwork",
        "parent_namespace": "egress-test",
        "parent_name": "all-egress-traffic",
        "parent_port": "443",
        "parent_section_name": "",
        "route_group": "",
        "route_kind": "default",
        "route_namespace": "",
        "route_name": "tls-egress-deny",
        "hostname": "github.com",
        "error": "forbidden",
    }
    assert value == 1


# --- every route family, every label: allowed, denied, routed, failed -------------------


def test_http_allowed_denied_routed_failed(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = policy(EVERY_ROUTE_KIND)
    metrics.request_finished(request(index, "httpbin.org", "/get", status=200))
    metrics.request_finished(request(index, "httpbin.org", "/post", status=403))
    routed = request(index, "google.com", "/internal", status=200)
    assert routed.decision.backend is not None
    metrics.request_finished(routed)
    metrics.request_finished(
        request(index, "httpbin.org", "/get", status=502, error="connect_refused")
    )
    metrics.request_finished(
        request(index, "httpbin.org", "/get", status=504, error="connect_timeout")
    )
    for failed_connect in ("connect_refused", "connect_timeout"):
        metrics.upstream_failed(failed_connect)
    samples = scrape(registry)
    assert unordered(samples["outbound_http_route_request_statuses_total"]) == unordered(
        [
            (route_labels(80, "HTTPRoute", "httpbin-get", hostname="httpbin.org",
                          http_status="200", error=""), 1),
            (route_labels(80, "default", "http-egress-deny", hostname="httpbin.org",
                          http_status="403", error=""), 1),
            (route_labels(80, "HTTPRoute", "to-internal", hostname="google.com",
                          http_status="200", error=""), 1),
            (route_labels(80, "HTTPRoute", "httpbin-get", hostname="httpbin.org",
                          http_status="502", error="connect_refused"), 1),
            (route_labels(80, "HTTPRoute", "httpbin-get", hostname="httpbin.org",
                          http_status="504", error="connect_timeout"), 1),
        ]
    )  # fmt: skip
    assert unordered(samples["outbound_http_route_request_duration_seconds_count"]) == unordered(
        [
            (route_labels(80, "HTTPRoute", "httpbin-get", hostname="httpbin.org"), 3),
            (route_labels(80, "default", "http-egress-deny", hostname="httpbin.org"), 1),
            (route_labels(80, "HTTPRoute", "to-internal", hostname="google.com"), 1),
        ]
    )
    assert unordered(samples["egress_upstream_connect_errors_total"]) == unordered(
        [({"error": "connect_refused"}, 1), ({"error": "connect_timeout"}, 1)]
    )
    assert "outbound_grpc_route_request_statuses_total" not in samples
    assert "egress_audit_would_deny_total" not in samples


def test_grpc_allowed_denied_failed(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = policy(EVERY_ROUTE_KIND)
    say_hello, say_goodbye = "/helloworld.Greeter/SayHello", "/helloworld.Greeter/SayGoodbye"

    def call(path: str, grpc_status: int, error: str = "") -> RequestRecord:
        return request(index, "greeter.example", path, 50051, grpc=True, status=200,
                       grpc_status=grpc_status, error=error)  # fmt: skip

    metrics.request_finished(call(say_hello, 0))
    metrics.request_finished(call(say_goodbye, 7))
    metrics.request_finished(call(say_hello, 14, "connect_refused"))
    samples = scrape(registry)
    assert unordered(samples["outbound_grpc_route_request_statuses_total"]) == unordered(
        [
            (route_labels(50051, "GRPCRoute", "greeter", hostname="greeter.example",
                          grpc_status="OK", error=""), 1),
            (route_labels(50051, "default", "grpc-egress-deny", hostname="greeter.example",
                          grpc_status="PERMISSION_DENIED", error=""), 1),
            (route_labels(50051, "GRPCRoute", "greeter", hostname="greeter.example",
                          grpc_status="UNAVAILABLE", error="connect_refused"), 1),
        ]
    )  # fmt: skip
    assert unordered(samples["outbound_grpc_route_request_duration_seconds_count"]) == unordered(
        [
            (route_labels(50051, "GRPCRoute", "greeter", hostname="greeter.example"), 2),
            (route_labels(50051, "default", "grpc-egress-deny", hostname="greeter.example"), 1),
        ]
    )
    assert "outbound_http_route_request_statuses_total" not in samples


def test_grpc_call_without_a_known_status_is_unknown(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """As in Linkerd (tonic's Code::Unknown): a call reset before its trailers, or one whose
    grpc-status is no code of gRPC's, is UNKNOWN, never an empty or numeric grpc_status."""
    index = policy(EVERY_ROUTE_KIND)
    say_hello = "/helloworld.Greeter/SayHello"
    metrics.request_finished(request(index, "greeter.example", say_hello, 50051, grpc=True,
                                     status=200, grpc_status=None, error="reset"))  # fmt: skip
    metrics.request_finished(request(index, "greeter.example", say_hello, 50051, grpc=True,
                                     status=200, grpc_status=42))  # fmt: skip
    samples = scrape(registry)
    assert unordered(samples["outbound_grpc_route_request_statuses_total"]) == unordered(
        [
            (route_labels(50051, "GRPCRoute", "greeter", hostname="greeter.example",
                          grpc_status="UNKNOWN", error="reset"), 1),
            (route_labels(50051, "GRPCRoute", "greeter", hostname="greeter.example",
                          grpc_status="UNKNOWN", error=""), 1),
        ]
    )  # fmt: skip


def test_tls_allowed_denied_failed(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = policy(EVERY_ROUTE_KIND)
    whole_connection(metrics, connection(index, Detected.TLS, 443, "httpbin.org", sent=517,
                                         received=4000))  # fmt: skip
    whole_connection(metrics, connection(index, Detected.TLS, 443, "github.com", error="forbidden"))
    whole_connection(
        metrics, connection(index, Detected.TLS, 443, "httpbin.org", error="connect_timeout")
    )
    metrics.upstream_failed("connect_timeout")
    samples = scrape(registry)
    allowed = route_labels(443, "TLSRoute", "tls-egress", hostname="httpbin.org")
    denied = route_labels(443, "default", "tls-egress-deny", hostname="github.com")
    assert unordered(samples["outbound_tls_route_open_total"]) == unordered(
        [(allowed, 2), (denied, 1)]
    )
    assert unordered(samples["outbound_tls_route_close_total"]) == unordered(
        [
            ({**allowed, "error": ""}, 1),
            ({**allowed, "error": "forbidden"}, 0),
            ({**allowed, "error": "connect_timeout"}, 1),
            ({**denied, "error": ""}, 0),
            ({**denied, "error": "forbidden"}, 1),
        ]
    )
    route_only = route_labels(443, "TLSRoute", "tls-egress")
    assert unordered(samples["egress_sent_bytes_total"]) == unordered([(route_only, 517)])
    assert unordered(samples["egress_received_bytes_total"]) == unordered([(route_only, 4000)])
    assert unordered(samples["egress_connection_duration_seconds_count"]) == unordered(
        [(route_only, 2), (route_labels(443, "default", "tls-egress-deny"), 1)]
    )
    assert samples["egress_upstream_connect_errors_total"] == [({"error": "connect_timeout"}, 1)]
    assert samples["egress_sniff_outcomes_total"] == [({"outcome": "tls"}, 3)]
    assert only(samples, "egress_open_connections") == ({}, 0)


def test_tcp_allowed_denied_failed(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = policy(EVERY_ROUTE_KIND)
    whole_connection(metrics, connection(index, Detected.OPAQUE, 5432))
    whole_connection(metrics, connection(index, Detected.OPAQUE, 6379, error="forbidden"))
    whole_connection(metrics, connection(index, Detected.OPAQUE, 5432, error="reset"))
    samples = scrape(registry)
    target = {"target_ip": "203.0.113.5"}
    allowed = route_labels(5432, "TCPRoute", "postgres", **target, target_port="5432")
    denied = route_labels(6379, "default", "tcp-egress-deny", **target, target_port="6379")
    assert unordered(samples["outbound_tcp_route_open_total"]) == unordered(
        [(allowed, 2), (denied, 1)]
    )
    assert unordered(samples["outbound_tcp_route_close_total"]) == unordered(
        [
            ({**allowed, "error": ""}, 1),
            ({**allowed, "error": "forbidden"}, 0),
            ({**allowed, "error": "reset"}, 1),
            ({**denied, "error": ""}, 0),
            ({**denied, "error": "forbidden"}, 1),
        ]
    )
    assert "egress_upstream_connect_errors_total" not in samples
    assert samples["egress_sniff_outcomes_total"] == [({"outcome": "timeout"}, 3)]


def test_an_open_route_has_its_close_series_at_zero_before_its_first_close(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """As Linkerd's proxy creates them with the route: Prometheus's increase() over a series
    that first appears at 1 sees no increase, so the first denial would go unseen."""
    index = policy(EVERY_ROUTE_KIND)
    for record in (
        connection(index, Detected.TLS, 443, "github.com"),
        connection(index, Detected.OPAQUE, 5432),
    ):
        metrics.connection_opened()
        metrics.connection_decided(record)
    samples = scrape(registry)
    closes = [
        (labels["route_name"], labels["error"], value)
        for family in ("outbound_tls_route_close_total", "outbound_tcp_route_close_total")
        for labels, value in samples[family]
    ]
    assert sorted(closes) == [
        ("postgres", "", 0),
        ("postgres", "forbidden", 0),
        ("tls-egress-deny", "", 0),
        ("tls-egress-deny", "forbidden", 0),
    ]


def test_tcp_target_ip_v6(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = policy(AUDITED.replace("{trafficPolicy: Deny}", "{trafficPolicy: Allow}"))
    destination = Destination(ipaddress.ip_address("2001:db8::7"), 9000)
    decision = index.decide_connection(ConnectionFacts(destination, Detected.OPAQUE, None))
    record = FlowRecord(client=CLIENT, destination=destination, detected=Detected.OPAQUE,
                        sniff_outcome="timeout", decision=decision)  # fmt: skip
    whole_connection(metrics, record)
    labels, _ = only(scrape(registry), "outbound_tcp_route_open_total")
    assert (labels["target_ip"], labels["target_port"], labels["route_name"]) == (
        "2001:db8::7",
        "9000",
        "tcp-egress-allow",
    )


def test_traffic_outside_every_network_has_no_route_samples(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """No EgressNetwork matches: the traffic passes untouched, only operator metrics count it."""
    index = guide_step("linkerd-4-tlsroute.yaml")
    in_cluster = ipaddress.ip_address("10.1.2.3")
    tls = connection(index, Detected.TLS, 443, "internal", address=in_cluster, sent=10,
                     received=20)  # fmt: skip
    http = request(index, "internal", "/", address=in_cluster, status=200)
    assert tls.decision is not None and tls.decision.parent is None
    assert http.decision.parent is None
    whole_connection(metrics, tls)
    metrics.request_finished(http)
    samples = scrape(registry)
    assert not ROUTE_FAMILIES & samples.keys()
    assert "outbound_http_route_request_duration_seconds_count" not in samples
    assert samples["egress_sent_bytes_total"] == [(NO_ROUTE, 10)]
    assert samples["egress_received_bytes_total"] == [(NO_ROUTE, 20)]
    assert samples["egress_connection_duration_seconds_count"] == [(NO_ROUTE, 1)]


def test_audited_denial_counts_would_deny_on_the_deny_route(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    index = policy(AUDITED)
    tls = connection(index, Detected.TLS, 443, "github.com")
    assert tls.decision is not None and tls.decision.audit
    whole_connection(metrics, tls)
    metrics.request_finished(request(index, "httpbin.org", "/get", status=200))
    samples = scrape(registry)
    audited = {"network": "audited"}
    assert unordered(samples["egress_audit_would_deny_total"]) == unordered(
        [
            (route_labels(443, "default", "tcp-egress-deny", **audited, hostname="github.com"), 1),
            (route_labels(80, "default", "http-egress-deny", **audited, hostname="httpbin.org"), 1),
        ]
    )
    http_labels, _ = only(samples, "outbound_http_route_request_statuses_total")
    assert (http_labels["route_name"], http_labels["http_status"], http_labels["error"]) == (
        "http-egress-deny",
        "200",
        "",
    )
    closes = samples["outbound_tcp_route_close_total"]
    assert sorted((labels["route_name"], labels["error"], value) for labels, value in closes) == [
        ("tcp-egress-deny", "", 1),
        ("tcp-egress-deny", "forbidden", 0),
    ]


def test_original_destination_failures_and_loops(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    for error in ("original_dst_failed", "original_dst_failed", "loop"):
        metrics.connection_opened()
        metrics.connection_closed(FlowRecord(client=CLIENT, error=error))
    samples = scrape(registry)
    assert only(samples, "egress_original_destination_failures_total") == ({}, 2)
    assert only(samples, "egress_redirect_loops_total") == ({}, 1)
    assert only(samples, "egress_open_connections") == ({}, 0)
    assert not ROUTE_FAMILIES & samples.keys()


def test_open_connections_gauge(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = policy(EVERY_ROUTE_KIND)
    records = [connection(index, Detected.OPAQUE, 5432) for _ in range(3)]
    for record in records:
        metrics.connection_opened()
        metrics.connection_decided(record)
    assert only(scrape(registry), "egress_open_connections") == ({}, 3)
    metrics.connection_closed(records[0])
    assert only(scrape(registry), "egress_open_connections") == ({}, 2)


def test_http_connection_is_accounted_per_request(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """An HTTP connection's route samples and bytes come from its requests, not its close."""
    index = policy(EVERY_ROUTE_KIND)
    record = connection(index, Detected.HTTP1, 80, "httpbin.org", sent=300, received=900)
    whole_connection(metrics, record)
    metrics.request_finished(
        request(index, "httpbin.org", "/get", status=200, sent=100, received=400)
    )
    samples = scrape(registry)
    assert samples["egress_sent_bytes_total"] == [
        (route_labels(80, "HTTPRoute", "httpbin-get"), 100)
    ]
    assert samples["egress_sniff_outcomes_total"] == [({"outcome": "http1"}, 1)]
    assert {"outbound_tls_route_open_total", "outbound_tcp_route_open_total"}.isdisjoint(samples)


def test_destination_mismatch_counted_by_mode(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    metrics.destination_unconfirmed("destination_mismatch", "httpbin.org", "enforce", 1)
    metrics.destination_unconfirmed("destination_mismatch", "httpbin.org", "enforce", 1)
    metrics.destination_unconfirmed("destination_mismatch", "httpbin.org", "log", 3)
    samples = scrape(registry)
    assert unordered(samples["egress_destination_mismatch_total"]) == unordered(
        [
            ({"hostname": "httpbin.org", "mode": "enforce"}, 2),
            ({"hostname": "httpbin.org", "mode": "log"}, 3),
        ]
    )
    assert "egress_destination_unverified_total" not in samples


def test_destination_unverified_counted_by_mode_with_hostnames_capped(
    registry: CollectorRegistry,
) -> None:
    """No answer from the resolver has a counter of its own, never the mismatch one; its
    hostname label is capped as every other is."""
    metrics = Metrics(registry, max_hostnames=1)
    metrics.destination_unconfirmed("dns_error", "httpbin.org", "enforce", 1)
    for hostname in ("httpbin.org", "example.org"):
        metrics.destination_unconfirmed("dns_error", hostname, "log", 1)
    samples = scrape(registry)
    assert unordered(samples["egress_destination_unverified_total"]) == unordered(
        [
            ({"hostname": "httpbin.org", "mode": "enforce"}, 1),
            ({"hostname": "httpbin.org", "mode": "log"}, 1),
            ({"hostname": "other", "mode": "log"}, 1),
        ]
    )
    assert "egress_destination_mismatch_total" not in samples


def test_policy_reloads_and_generation(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.policy_loaded(1)
    assert only(scrape(registry), "egress_policy_generation") == ({}, 1)
    assert unordered(scrape(registry)["egress_policy_reloads_total"]) == unordered(
        [({"result": "ok"}, 0), ({"result": "error"}, 0)]
    )
    metrics.policy_reloaded(True, 2)
    metrics.policy_reloaded(False, 2)
    metrics.policy_reloaded(False, 2)
    samples = scrape(registry)
    assert only(samples, "egress_policy_generation") == ({}, 2)
    assert unordered(samples["egress_policy_reloads_total"]) == unordered(
        [({"result": "ok"}, 1), ({"result": "error"}, 2)]
    )


def test_a_scan_of_addresses_and_ports_is_counted_under_bounded_labels(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """A workload that tries every port of an allowed network, and many of its addresses:
    the first MAX_TARGETS (target_ip, target_port) pairs and MAX_PARENT_PORTS parent ports
    keep their values, the rest are counted as "other", and every connection is counted."""
    index = policy(AUDITED.replace("{trafficPolicy: Deny}", "{trafficPolicy: Allow}"))
    scanned = [
        (ipaddress.ip_address(f"203.0.113.{1 + number % 200}"), 1024 + number)
        for number in range(MAX_TARGETS + 500)
    ]
    for address, port in scanned:
        whole_connection(metrics, connection(index, Detected.OPAQUE, port, address=address))
    opened = scrape(registry)["outbound_tcp_route_open_total"]
    assert sum(value for _, value in opened) == len(scanned)
    targets = {(labels["target_ip"], labels["target_port"]) for labels, _ in opened}
    assert len(targets) == MAX_TARGETS + 1
    assert ("other", "other") in targets
    assert (str(scanned[0][0]), str(scanned[0][1])) in targets
    ports = {labels["parent_port"] for labels, _ in opened}
    assert ports == {*(str(port) for _, port in scanned[:MAX_PARENT_PORTS]), "other"}
    sent = scrape(registry)["egress_connection_duration_seconds_count"]
    assert sum(value for _, value in sent) == len(scanned)
    assert len(sent) == MAX_PARENT_PORTS + 1


# --- hostname label ------------------------------------------------------------------------


def test_hostname_cap(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, max_hostnames=2)
    index = guide_step("linkerd-1-allow.yaml")
    for host in ("a.example", "b.example", "c.example", "d.example", "a.example", "203.0.113.5"):
        metrics.request_finished(request(index, host, "/", status=200))
    hostnames = {
        labels["hostname"]: value
        for labels, value in scrape(registry)["outbound_http_route_request_statuses_total"]
    }
    assert hostnames == {"a.example": 2, "b.example": 1, "other": 2, "": 1}


def test_hostname_label_off(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, max_hostnames=0)
    index = guide_step("linkerd-4-tlsroute.yaml")
    whole_connection(metrics, connection(index, Detected.TLS, 443, "httpbin.org"))
    metrics.request_finished(request(index, "httpbin.org", "/get", status=403))
    samples = scrape(registry)
    assert only(samples, "outbound_tls_route_open_total")[0]["hostname"] == ""
    assert only(samples, "outbound_http_route_request_statuses_total")[0]["hostname"] == ""


def test_ipv6_literal_hostname_is_empty(registry: CollectorRegistry, metrics: Metrics) -> None:
    index = guide_step("linkerd-1-allow.yaml")
    metrics.request_finished(request(index, "2001:db8::1", "/", status=200))
    assert only(scrape(registry), "outbound_http_route_request_statuses_total")[0]["hostname"] == ""


hostnames = st.lists(st.sampled_from([f"h{n}.example" for n in range(12)]), max_size=40)


@given(names=hostnames, limit=st.integers(min_value=0, max_value=6))
def test_hostname_cap_keeps_the_first_names_seen(names: list[str], limit: int) -> None:
    labels = Metrics(CollectorRegistry(), max_hostnames=limit).hostname
    first_seen = list(dict.fromkeys(names))[:limit]
    for name in names:
        expected = name if name in first_seen else ("other" if limit else "")
        assert labels(name) == expected


# --- values changed directly ------------------------------------------------------------------

durations = st.lists(
    st.one_of(
        st.sampled_from([0.0, *ROUTE_DURATION_BUCKETS, *CONNECTION_DURATION_BUCKETS]),
        st.floats(min_value=0, max_value=1e5, allow_nan=False),
    ),
    max_size=30,
)


@given(amounts=durations)
def test_direct_values_count_what_the_public_api_counts(amounts: list[float]) -> None:
    """The hot path's value_cell and Durations skip prometheus-client's checks; every
    sample must still come out as Counter.inc, Gauge.inc and dec, and Histogram.observe
    make it."""

    def families(direct: bool) -> list[Metric]:
        registry = CollectorRegistry()
        counter = Counter("requests", "h", ("route",), registry=registry).labels("r")
        histogram = Histogram(
            "duration_seconds", "h", ("route",), registry=registry, buckets=ROUTE_DURATION_BUCKETS
        ).labels("r")
        gauge = Gauge("open", "h", registry=registry)
        value, cells, level = value_cell(counter), Durations(histogram), value_cell(gauge)
        for step, amount in enumerate(amounts):
            if direct:
                value.inc(amount)
                cells.observe(amount)
                level.inc(1 if step % 3 else -1)
            else:
                counter.inc(amount)
                histogram.observe(amount)
                if step % 3:
                    gauge.inc()
                else:
                    gauge.dec()
        return list(registry.collect())

    assert families(direct=True) == families(direct=False)


# --- exposition formats ---------------------------------------------------------------------

EXPOSED_FAMILIES = {
    # family type, every sample name it exposes
    "outbound_http_route_request_statuses_total": "counter",
    "outbound_grpc_route_request_statuses_total": "counter",
    "outbound_tls_route_open_total": "counter",
    "outbound_tls_route_close_total": "counter",
    "outbound_tcp_route_open_total": "counter",
    "outbound_tcp_route_close_total": "counter",
    "outbound_http_route_request_duration_seconds": "histogram",
    "outbound_grpc_route_request_duration_seconds": "histogram",
    "egress_destination_mismatch_total": "counter",
    "egress_destination_unverified_total": "counter",
    "egress_audit_would_deny_total": "counter",
    "egress_policy_reloads_total": "counter",
    "egress_policy_generation": "gauge",
    "egress_open_connections": "gauge",
    "egress_event_loop_tasks": "gauge",
    "egress_connection_duration_seconds": "histogram",
    "egress_sent_bytes_total": "counter",
    "egress_received_bytes_total": "counter",
    "egress_sniff_outcomes_total": "counter",
    "egress_upstream_connect_errors_total": "counter",
    "egress_encrypted_client_hellos_total": "counter",
    "egress_original_destination_failures_total": "counter",
    "egress_redirect_loops_total": "counter",
}


def every_kind_of_traffic(metrics: Metrics) -> None:
    index = policy(EVERY_ROUTE_KIND)
    audited = policy(AUDITED)
    metrics.request_finished(request(index, "httpbin.org", "/get", status=502,
                                     error="connect_refused", sent=5))  # fmt: skip
    metrics.upstream_failed("connect_refused")
    metrics.request_finished(request(index, "g.example", "/helloworld.Greeter/SayHello",
                                     50051, grpc=True, grpc_status=0))  # fmt: skip
    metrics.request_finished(request(audited, "httpbin.org", "/", status=200))
    whole_connection(metrics, connection(index, Detected.TLS, 443, "httpbin.org"))
    whole_connection(metrics, connection(index, Detected.OPAQUE, 5432, received=3))
    mismatch = connection(index, Detected.TLS, 443, "httpbin.org", error="destination_mismatch")
    metrics.destination_unconfirmed("destination_mismatch", "httpbin.org", "enforce", 1)
    whole_connection(metrics, mismatch)
    unverified = connection(index, Detected.TLS, 443, "httpbin.org", error="dns_error")
    metrics.destination_unconfirmed("dns_error", "httpbin.org", "enforce", 1)
    whole_connection(metrics, unverified)
    whole_connection(metrics, FlowRecord(client=CLIENT, error="loop"))
    whole_connection(metrics, FlowRecord(client=CLIENT, error="original_dst_failed"))
    metrics.policy_reloaded(True, 2)


def sample_names(family_type: str, name: str) -> set[str]:
    if family_type == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return {name}


def test_exposed_names_in_prometheus_text(registry: CollectorRegistry, metrics: Metrics) -> None:
    every_kind_of_traffic(metrics)
    body, _ = exposition(registry, "text/plain")
    exposed = {
        sample.name: family.type
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    expected = {
        sample: family_type
        for name, family_type in EXPOSED_FAMILIES.items()
        for sample in sample_names(family_type, name)
    }
    assert exposed == expected


def test_exposed_names_in_openmetrics(registry: CollectorRegistry, metrics: Metrics) -> None:
    every_kind_of_traffic(metrics)
    body, content_type = exposition(registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    families = list(openmetrics_families(body.decode()))
    exposed = {sample.name: family.type for family in families for sample in family.samples}
    expected = {
        sample: family_type
        for name, family_type in EXPOSED_FAMILIES.items()
        for sample in sample_names(family_type, name)
    }
    assert exposed == expected
    text = {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in text_string_to_metric_families(exposition(registry, "")[0].decode())
        for sample in family.samples
    }
    openmetrics = {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in families
        for sample in family.samples
    }
    assert openmetrics == text


def test_openmetrics_only_when_asked(registry: CollectorRegistry, metrics: Metrics) -> None:
    for accept in ("", "*/*", "text/plain;version=0.0.4", "application/json"):
        assert exposition(registry, accept)[1].startswith("text/plain; version=0.0.4")
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    assert exposition(registry, accept)[1].startswith("application/openmetrics-text")


@pytest.mark.parametrize(
    "accept",
    [
        "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.1",
        "application/openmetrics-text;version=1.0.0;q=0,text/plain;version=0.0.4",
        "application/openmetrics-text;q=0.2,*/*;q=0.3",
    ],
)
def test_text_when_the_scraper_weighs_it_above_openmetrics(
    registry: CollectorRegistry, metrics: Metrics, accept: str
) -> None:
    """The Accept header's q values say which format the scraper prefers."""
    metrics.policy_loaded(1)
    body, content_type = exposition(registry, accept)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {family.name for family in text_string_to_metric_families(body.decode())}
    assert "egress_policy_generation" in families


# --- --workers: one scrape sums every worker ---------------------------------------------------

CONNECTIONS = 40
STARTUP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def admin_get(port: int, path: str, accept: str = "") -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as response:
        return response.status, response.headers["content-type"], response.read().decode()


def parsed(body: str) -> dict[str, list[Sample]]:
    by_name: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append((sample.labels, sample.value))
    return by_name


def wait_for(condition: str, check: object, timeout: float = STARTUP_TIMEOUT) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {condition}")


def test_workers_keep_one_set_of_capped_values(tmp_path: Path) -> None:
    """The cap holds for the sum a scrape shows: what one worker kept, another keeps too,
    and no worker keeps more once the workers together kept `limit` values."""
    first, second = (HostnameLabels(2, KeptValues(str(tmp_path / "hostnames"))) for _ in "ab")
    assert first("a.example") == "a.example"
    assert second("b.example") == "b.example"
    assert second("c.example") == OTHER, "a and b fill the cap of two"
    assert first("b.example") == "b.example", "kept by the other worker"
    assert first("c.example") == OTHER
    assert first("d.example") == OTHER
    assert second("a.example") == "a.example"
    assert (tmp_path / "hostnames").read_text() == '"a.example"\n"b.example"\n'

    targets = [CappedLabels(1, (OTHER, OTHER), KeptValues(str(tmp_path / "t"))) for _ in "ab"]
    assert targets[0](("203.0.113.5", "5432")) == ("203.0.113.5", "5432")
    assert targets[1](("203.0.113.6", "5432")) == (OTHER, OTHER)
    assert targets[1](("203.0.113.5", "5432")) == ("203.0.113.5", "5432"), "a pair read back"


def test_a_forked_worker_keeps_values_by_its_own_lock(tmp_path: Path) -> None:
    """Workers are forked after the caps are made: each must lock through a descriptor of
    its own (an inherited one would share one lock), and both see one set of values."""
    hostnames = HostnameLabels(1, KeptValues(str(tmp_path / "hostnames")))
    assert hostnames("before.example") == "before.example", "the file is open before the fork"
    child = os.fork()
    if child == 0:
        code = 0 if hostnames("child.example") == OTHER else 1
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hostnames("parent.example") == OTHER


def test_workers_scrape_sums_every_worker(tmp_path: Path) -> None:
    """`run --workers 2`: connections spread over both workers; one scrape counts them all.

    Connecting straight to the listener (no redirect) is a loop or an original-
    destination failure, which each worker counts in its own metric files.
    """
    proxy_port, admin_port = free_port(), free_port()
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text((EXAMPLES / "linkerd-1-allow.yaml").read_text())
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, "-m", "egressproxy", "run", "--allow-root", "--workers", "2",
        "--listen", f"127.0.0.1:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}",
        "--policy", str(policy_file), "--log-format", "json",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=environment, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:

        def ready() -> bool:
            try:
                return admin_get(admin_port, "/ready")[0] == 200
            except OSError:
                return False

        wait_for("/ready", ready)
        for _ in range(CONNECTIONS):
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as client:
                client.settimeout(5)
                assert client.recv(1) == b""

        def counted() -> int:
            samples = parsed(admin_get(admin_port, "/metrics")[2])
            return int(
                sum(value for _, value in samples.get("egress_redirect_loops_total", []))
                + sum(
                    value
                    for _, value in samples.get("egress_original_destination_failures_total", [])
                )
            )

        wait_for(f"{CONNECTIONS} connections counted", lambda: counted() == CONNECTIONS)
        (metrics_dir,) = tmp_path.glob("egressproxy-metrics-*")
        per_worker = [
            sum(
                sample.value
                for metric in MultiProcessCollector.merge([str(file)])  # type: ignore[no-untyped-call]
                for sample in metric.samples
                if sample.name
                in ("egress_redirect_loops_total", "egress_original_destination_failures_total")
            )
            for file in metrics_dir.glob("counter_*.db")
        ]
        busy = [count for count in per_worker if count]
        assert len(busy) == 2 and sum(busy) == CONNECTIONS, per_worker

        samples = parsed(admin_get(admin_port, "/metrics")[2])
        assert only(samples, "egress_open_connections") == ({}, 0)
        assert only(samples, "egress_policy_generation") == ({}, 1)

        process.send_signal(signal.SIGHUP)
        wait_for(
            "the SIGHUP reload",
            lambda: (
                only(parsed(admin_get(admin_port, "/metrics")[2]), "egress_policy_generation")
                == ({}, 2)
            ),
        )
        time.sleep(0.3)
        samples = parsed(admin_get(admin_port, "/metrics")[2])
        assert unordered(samples["egress_policy_reloads_total"]) == unordered(
            [({"result": "ok"}, 1), ({"result": "error"}, 0)]
        )

        _, content_type, body = admin_get(
            admin_port, "/metrics", "application/openmetrics-text; version=1.0.0"
        )
        assert content_type.startswith("application/openmetrics-text")
        loops = [
            sample.value
            for family in openmetrics_families(body)
            for sample in family.samples
            if sample.name
            in ("egress_redirect_loops_total", "egress_original_destination_failures_total")
        ]
        assert sum(loops) == CONNECTIONS
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate(timeout=5)
    assert process.returncode == 0, stderr.decode()
    assert not list(tmp_path.glob("egressproxy-metrics-*")), "the metrics directory is left"
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    assert sum(line.get("log") == "access" for line in lines) == CONNECTIONS


@pytest.mark.parametrize(
    ("accept", "answered"),
    [
        ("application/openmetrics-text;version=abc", "text/plain; version=0.0.4"),
        ("application/openmetrics-text;version=1.x", "text/plain; version=0.0.4"),
        (
            "application/openmetrics-text;version=abc;q=0.9,"
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.1",
            "application/openmetrics-text; version=1.0.0",
        ),
        (
            "text/plain;version=1.0.0;q=0.4,application/openmetrics-text;version=1.0.0;q=0.6",
            "application/openmetrics-text; version=1.0.0",
        ),
        (
            "APPLICATION/OpenMetrics-Text; Version=1.0.0",
            "application/openmetrics-text; version=1.0.0",
        ),
        (
            'application/openmetrics-text; version="1.0.0", text/plain; q=0.5',
            "application/openmetrics-text; version=1.0.0",
        ),
        ('application/openmetrics-text; version="abc"', "text/plain; version=0.0.4"),
    ],
)
def test_any_accept_header_gets_a_scrape(
    registry: CollectorRegistry, metrics: Metrics, accept: str, answered: str
) -> None:
    """Whatever a scraper's Accept says, it gets a scrape in a format it can parse, never
    an error: an OpenMetrics version that is not numbers is one the proxy cannot make, the
    one weighed highest wherever it is named wins, media types are case-insensitive, and a
    parameter's value may be a quoted-string."""
    metrics.policy_loaded(1)
    body, content_type = exposition(registry, accept)
    assert content_type.startswith(answered)
    if answered.startswith("application/openmetrics-text"):
        families = {family.name for family in openmetrics_families(body.decode())}
    else:
        families = {family.name for family in text_string_to_metric_families(body.decode())}
    assert "egress_policy_generation" in families


@pytest.mark.parametrize(
    ("value", "code"),
    [
        *((b"%d" % code, code) for code in range(17)),
        (b"007", 7),
        (b"17", 2),
        (b"99", 2),
        (b"4294967303", 2),
        (b"99999999999", 2),
        (b"0" * 5000, 2),
        (b"abc", 2),
        (b"", 2),
    ],
)
def test_a_grpc_status_that_is_no_code_is_unknown(value: bytes, code: int) -> None:
    """As gRPC clients (and Linkerd, through tonic) read it. As None (no status), a
    trailer's bad status left the head's OK in force, and the call was counted OK; as
    its number (17, 99), the access log said what the metric's UNKNOWN did not."""
    assert grpc_status_of([(b"content-type", b"application/grpc"), (b"grpc-status", value)]) == code


def test_no_grpc_status_is_none() -> None:
    assert grpc_status_of([(b"content-type", b"application/grpc")]) is None
