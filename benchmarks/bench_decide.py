"""decide_connection() cost against policy size: it must stay flat from 10 to 100,000 entries.

Run: PYTHONPATH=. python benchmarks/bench_decide.py [--smoke]   (from the repository root;
--smoke: the small sizes and a few calls, to prove the script runs)
Hostnames: one TLSRoute per hostname on port 443 (half exact, half `*.` wildcards);
CIDRs: one EgressNetwork per address (/32) plus a 0.0.0.0/0 one. Each row times hits and misses.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from typing import Any

from egressproxy.policy.decision import (
    Action,
    ConnectionFacts,
    Destination,
    Detected,
    RouteProtocol,
    RouteRef,
)
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.model import (
    Attachment,
    CidrRange,
    Model,
    Network,
    NetworkId,
    Origin,
    Route,
    Rule,
    TrafficPolicy,
)
from egressproxy.settings import Settings

SIZES = (10, 1_000, 100_000)
CALLS = 20_000
SMOKE_SIZES = (10, 1_000)
SMOKE_CALLS = 20
ORIGIN = Origin("bench", 1)
SETTINGS = Settings(namespace="bench")


def egress_network(name: str, ranges: tuple[CidrRange, ...] | None, order: int) -> Network:
    return Network(
        id=NetworkId("policy.linkerd.io", "EgressNetwork", "bench", name),
        ranges=ranges,
        traffic_policy=TrafficPolicy.DENY,
        namespace_scoped=True,
        audit=False,
        verify_destination=None,
        created=None,
        order=order,
        origin=ORIGIN,
    )


def hostname_policy(count: int) -> PolicyIndex:
    network = egress_network("all", None, 0)
    routes = tuple(
        Route(
            ref=RouteRef("gateway.networking.k8s.io", "TLSRoute", "bench", f"r{i}"),
            protocol=RouteProtocol.TLS,
            fixes_protocol=True,
            hostnames=(f"host{i}.example.com" if i % 2 else f"*.zone{i}.example.net",),
            rules=(Rule(name="rules[0]", action=Action.PASS, origin=ORIGIN),),
            attachments=(Attachment(network.id, 443),),
            clients=(),
            created=None,
            order=i + 1,
            origin=ORIGIN,
        )
        for i in range(count)
    )
    return compile_policy(Model("bench", (network,), routes), SETTINGS)


def cidr_policy(count: int) -> PolicyIndex:
    """One EgressNetwork per address of 198.18.0.0/15 (a /32 each), under one 0.0.0.0/0."""
    base = int(ipaddress.ip_address("198.18.0.0"))
    networks = tuple(
        egress_network(f"n{i}", (CidrRange(ipaddress.ip_network(base + i)),), i)
        for i in range(count)
    )
    wide = egress_network("wide", (CidrRange(ipaddress.ip_network("0.0.0.0/0")),), count)
    return compile_policy(Model("bench", (*networks, wide), ()), SETTINGS)


def opaque_facts(address: int | str) -> ConnectionFacts:
    destination = Destination(ipaddress.ip_address(address), 5432)
    return ConnectionFacts(destination, Detected.OPAQUE, None)


def memos(index: PolicyIndex) -> list[dict[Any, Any]]:
    """Every memo a decision of a connection fills: its whole answer, the network of its
    destination, the decisions built, and each host table's levels of a hostname."""
    tables = [
        table
        for network in index.compiled.values()
        for port in [*network.ports.values(), network.every_port]
        for table in (port.http, port.grpc, port.tls, port.grpc_calls)
        if table is not None
    ]
    return [
        index.connection_decisions,
        index.networks,
        index.decisions,
        index.untouched_decisions,
        *(table._levels for table in tables),
    ]


def per_call(index: PolicyIndex, facts: ConnectionFacts, calls: int) -> float:
    """The index's own lookups: every memo is emptied before every call, as a connection
    with a destination and a name not seen lately finds them, so the tables of `entries`
    hostnames and CIDRs are searched each time. The emptying is timed apart and taken off."""
    decide = index.decide_connection
    decide(facts)  # the memos it fills are the ones each call must find empty
    forgets = [memo.clear for memo in memos(index) if memo]
    start = time.perf_counter()
    for _ in range(calls):
        for forget in forgets:
            forget()
    emptying = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(calls):
        for forget in forgets:
            forget()
        decide(facts)
    return (time.perf_counter() - start - emptying) / calls * 1e6


def tls_facts(hostname: str) -> ConnectionFacts:
    destination = Destination(ipaddress.ip_address("203.0.113.5"), 443)
    return ConnectionFacts(destination, Detected.TLS, hostname)


def main() -> None:
    smoke = "--smoke" in sys.argv[1:]
    sizes, calls = (SMOKE_SIZES, SMOKE_CALLS) if smoke else (SIZES, CALLS)
    print(
        f"{'entries':>8} {'hostname hit':>14} {'wildcard hit':>14} {'host miss':>11} "
        f"{'cidr hit':>10} {'cidr miss':>10}   (µs per decide_connection)"
    )
    for size in sizes:
        hosts = hostname_policy(size)
        cidrs = cidr_policy(size)
        exact = tls_facts(f"host{size - 1 if size % 2 == 0 else size - 2}.example.com")
        wildcard = tls_facts(f"a.b.zone{size - 2}.example.net")
        miss = tls_facts("nowhere.example.org")
        assert hosts.decide_connection(exact).action == Action.PASS
        assert hosts.decide_connection(wildcard).action == Action.PASS
        assert hosts.decide_connection(miss).action == Action.DENY
        hit = opaque_facts(int(ipaddress.ip_address("198.18.0.0")) + size - 1)
        outside = opaque_facts("192.0.2.1")
        assert cidrs.decide_connection(hit).parent.name == f"n{size - 1}"  # type: ignore[union-attr]
        assert cidrs.decide_connection(outside).parent.name == "wide"  # type: ignore[union-attr]
        timings = [
            per_call(index, facts, calls)
            for index, facts in [
                (hosts, exact),
                (hosts, wildcard),
                (hosts, miss),
                (cidrs, hit),
                (cidrs, outside),
            ]
        ]
        widths = (14, 14, 11, 10, 10)
        print(
            f"{size:>8} " + " ".join(f"{t:>{w}.2f}" for t, w in zip(timings, widths, strict=True))
        )


if __name__ == "__main__":
    main()
