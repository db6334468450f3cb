"""What the data plane asks the policy, and what it gets back: plain frozen data.

A Decision says what to do and carries the identity of the parent and route
whose labels the metrics put on every sample, so nothing downstream re-derives
policy.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import NamedTuple

from egressproxy.settings import host_port

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """::ffff:192.0.2.1 is 192.0.2.1 (a dual-stack socket's view of an IPv4 peer)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_ip_literal(hostname: str) -> bool:
    """An IPv4 or IPv6 address (brackets allowed), not a name."""
    try:
        ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        return False
    return True


class _Member(enum.Enum):
    """Members are singletons compared by identity, so they hash by identity too: Enum's
    own __hash__ is a Python call, and decisions are looked up by keys holding members on
    every request."""

    __hash__ = object.__hash__


class Action(_Member):
    PASS = "pass"
    """Forward to the original destination."""
    DENY = "deny"
    ROUTE = "route"
    """Forward to Decision.backend instead of the original destination."""


class RouteProtocol(_Member):
    """Which route family (and metric family) a decision belongs to."""

    HTTP = "http"
    GRPC = "grpc"
    TLS = "tls"
    TCP = "tcp"


class Detected(_Member):
    """What the sniffer saw on the connection."""

    HTTP1 = "http1"
    H2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"


HTTP_PROTOCOL = RouteProtocol.HTTP
GRPC_PROTOCOL = RouteProtocol.GRPC
TLS_PROTOCOL = RouteProtocol.TLS
TCP_PROTOCOL = RouteProtocol.TCP
DENY_ACTION = Action.DENY
"""Members as module constants, for the paths every request takes: Python 3.11's EnumType
defines __getattr__, so each `RouteProtocol.HTTP` is a call of type.__getattribute__
through a method wrapper (about 60 ns), where a module constant is a dict hit."""


@dataclass(frozen=True, slots=True)
class Destination:
    """The original destination recovered with SO_ORIGINAL_DST.

    The policy looks up its network by destination on every request, so the hash is made
    once: an address's own __hash__ is Python code that formats the address as hex. So is
    its __str__, which every upstream connection needs: `host` is made once too."""

    ip: IPAddress
    port: int
    cached_hash: int = field(init=False, repr=False, compare=False)
    host: str = field(init=False, repr=False, compare=False)
    """str(ip): the address as the socket calls take it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cached_hash", hash((self.ip, self.port)))
        object.__setattr__(self, "host", str(self.ip))

    def __hash__(self) -> int:
        return self.cached_hash


class ConnectionFacts(NamedTuple):
    """Everything known when the first bytes have been sniffed.

    Facts are made for every connection and request: a NamedTuple is as immutable as a
    frozen dataclass and several times cheaper to make."""

    destination: Destination
    detected: Detected
    hostname: str | None
    """SNI or HTTP Host without port, lower-case; None when absent."""


class RequestFacts(NamedTuple):
    """One HTTP request (HTTP/1.x or an HTTP/2 stream).

    Its path, query and header values are the bytes sent, decoded as latin-1 (one
    character per byte), as the HTTP layers read them; the index compares the policy's
    text with them in that form (index.wire_text).
    """

    destination: Destination
    hostname: str | None
    method: str
    path: str
    """Path without the query string."""
    query: str
    headers: tuple[tuple[str, str], ...]
    """Header names lower-case, in the order the client sent them."""
    grpc: bool
    """content-type application/grpc: matched against GRPCRoutes."""
    authority: str | None = None
    """The Host or :authority (an absolute target's authority) as sent, port included; None
    when absent. OSM's Egress reads its port and its `host` header matches read all of it."""


@dataclass(frozen=True)
class ParentRef:
    group: str
    kind: str
    namespace: str
    name: str
    port: str


@dataclass(frozen=True)
class RouteRef:
    group: str
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Backend:
    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True)
class Decision:
    action: Action
    protocol: RouteProtocol
    parent: ParentRef | None
    """None when no egress policy applies at all (traffic passes untouched)."""
    route: RouteRef | None
    backend: Backend | None = None
    audit: bool = False
    """The network is in audit mode: a DENY (the policy's, or --ech deny's) is logged and
    counted as would_deny, and the traffic passes; a destination mismatch that enforce
    would deny is only logged."""
    verify_destination: str | None = None
    """Per-network override of --verify-destination (off|log|enforce), else None."""
    reason: str = ""
    """One line saying why, for `check --explain` and debug logs."""
