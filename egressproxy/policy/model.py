"""The one frozen model every dialect produces: networks, and routes attached to their ports.

A Network is what Linkerd calls an EgressNetwork (OSM's MeshConfig and the
native EgressPolicy become one too); a Route is a Gateway API route (OSM
Egress policies and native rules become routes too). Nothing here depends on
the client's identity or the cluster settings: compile_policy bakes those in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from egressproxy.policy.decision import Action, IPAddress, RouteProtocol, RouteRef
from egressproxy.settings import IPNetwork


@dataclass(frozen=True)
class Origin:
    """Where a resource was written, for `check --explain` and error messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class TrafficPolicy(enum.Enum):
    ALLOW = "Allow"
    DENY = "Deny"


@dataclass(frozen=True)
class CidrRange:
    """One `networks` entry: addresses in `cidr` and in none of `excepts`."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def covers(self, address: IPAddress) -> bool:
        return address in self.cidr and not any(address in excluded for excluded in self.excepts)


def within(inner: IPNetwork, outer: IPNetwork) -> bool:
    """Whether every address of inner is in outer (never across address families)."""
    return inner.network_address in outer and inner.broadcast_address in outer


@dataclass(frozen=True)
class NetworkId:
    group: str
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind} {self.name}")
        )


@dataclass(frozen=True)
class Interception:
    """What OSM's sidecar redirect leaves out, from the MeshConfig's traffic lists: that
    traffic never reaches OSM's proxy, so here it matches no network (passes untouched)."""

    included: tuple[IPNetwork, ...] | None
    """outboundIPRangeInclusionList: only these are redirected; None: everything."""
    excluded: tuple[IPNetwork, ...]
    """outboundIPRangeExclusionList, which wins over the inclusion list."""
    excluded_ports: frozenset[int]
    """outboundPortExclusionList."""


@dataclass(frozen=True)
class Network:
    id: NetworkId
    ranges: tuple[CidrRange, ...] | None
    """None: everything outside the cluster networks (EgressNetwork without `networks`)."""
    traffic_policy: TrafficPolicy
    namespace_scoped: bool
    """Linkerd's rule: a client sees its namespace's networks, else the global namespace's."""
    audit: bool
    verify_destination: str | None
    created: datetime | None
    order: int
    """Position in the file: the tie-break after creationTimestamp."""
    origin: Origin
    routes_off: str | None = None
    """Why the routes written for this network are not applied (OSM's MeshConfig with
    featureFlags.enableEgressPolicy false), for `check` and /config; None: they are."""
    interception: Interception | None = None


@dataclass(frozen=True)
class Attachment:
    """A route's parentRef: which network, which port (None: every port)."""

    network: NetworkId
    port: int | None


class MatchKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"


@dataclass(frozen=True)
class PathMatch:
    kind: MatchKind
    value: str


AUTHORITY = ":authority"
"""The header name a match on the request's authority (RequestFacts.authority) takes: OSM
turns an HTTPRouteGroup `host` header match into Envoy's `:authority`, which is the Host of
an HTTP/1 request and the :authority of an HTTP/2 one."""


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter match; header names are lower-case."""

    name: str
    kind: MatchKind
    value: str


@dataclass(frozen=True)
class HttpMatch:
    path: PathMatch | None = None
    method: str | None = None
    """Upper case, compared exactly (as Linkerd and Envoy do) unless method_any_case."""
    method_any_case: bool = False
    """Native rules: a `deny` rule on DELETE must also catch `delete`, which some servers
    take for DELETE."""
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True)
class GrpcMatch:
    service: str | None = None
    method: str | None = None
    kind: MatchKind = MatchKind.EXACT
    headers: tuple[ValueMatch, ...] = ()
    any_method: bool = False
    """Linkerd matches only POST (gRPC's method); native rules any, so a deny is never
    dodged by another method."""


@dataclass(frozen=True)
class ServiceBackend:
    """A Kubernetes Service: becomes NAME.NAMESPACE.svc.<cluster-domain>:PORT at compile time."""

    namespace: str
    name: str
    port: int


@dataclass(frozen=True)
class HostBackend:
    host: str
    port: int


@dataclass(frozen=True)
class Rule:
    name: str
    """Gateway API rule name, native rule name, or `rules[N]`: shown by --explain."""
    http_matches: tuple[HttpMatch, ...] = ()
    grpc_matches: tuple[GrpcMatch, ...] = ()
    """Empty: the rule matches every request (Gateway API's default `/` prefix)."""
    cidrs: tuple[IPNetwork, ...] = ()
    """Empty: any destination address (OSM ipAddresses, native cidrs restrict it)."""
    action: Action = Action.PASS
    backend: ServiceBackend | HostBackend | None = None
    origin: Origin = Origin("", 0)


@dataclass(frozen=True)
class ClientRef:
    """An OSM Egress source: the policy applies only to this client identity."""

    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Route:
    ref: RouteRef
    protocol: RouteProtocol
    fixes_protocol: bool
    """Gateway API routes fix their port's protocol (Linkerd); OSM and native rules do not."""
    hostnames: tuple[str, ...]
    rules: tuple[Rule, ...]
    attachments: tuple[Attachment, ...]
    clients: tuple[ClientRef, ...]
    """Empty: every client."""
    created: datetime | None
    order: int
    origin: Origin
    verify_destination: str | None = None
    """Overrides its network's verify-destination mode for the traffic it matches."""
    rank: int = 0
    """Place among the routes its document wrote, for ties: a native policy's rules, the
    one written first first (a Kubernetes document is one route)."""
    most_specific_host_only: bool = False
    """OSM: Envoy picks one virtual host, the most specific hostname's; a request none of
    its routes match is not tried against a wildcard that also covers it (Gateway API
    routes, as in Linkerd, are)."""
    port_in_host_must_match: bool = False
    """OSM: each host is two Envoy virtual host domains, HOST and HOST:PORT (PORT the
    Egress port), so a Host or :authority naming another port, or an empty one, matches no
    rule of the route. Gateway API hostnames (Linkerd) and native hosts match any port."""
    envoy_filter_chains: bool = False
    """OSM: each Egress port becomes an Envoy filter chain (http: any address; https: SNI
    and ipAddresses; tcp: ipAddresses), and a connection takes the one chain Envoy's match
    picks (longest address prefix, then server name, then HTTP or not), with no fallback
    to another: a request no http Egress takes on a port that a tcp Egress also has is
    denied, not passed through the tcp one."""
    server_first: bool = False
    """OSM `tcp-server-first`: its ports are never sniffed (OSM turns Envoy's TLS and HTTP
    inspectors off on them), as if in --opaque-ports: the client is not waited for."""


@dataclass(frozen=True)
class Model:
    file: str
    networks: tuple[Network, ...]
    routes: tuple[Route, ...]
