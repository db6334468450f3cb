"""What happened to a connection or a request: the record metrics and the access log read."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from egressproxy.errors import DNS_ERROR
from egressproxy.policy.decision import Decision, Destination, Detected, RouteProtocol

GRPC_UNKNOWN = 2
MAX_GRPC_CODE = 16
"""UNAUTHENTICATED, the last code gRPC defines."""
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_CODE_OF_ANSWER = {
    400: GRPC_INTERNAL,
    403: GRPC_PERMISSION_DENIED,
    421: GRPC_PERMISSION_DENIED,
    431: GRPC_RESOURCE_EXHAUSTED,
    502: GRPC_UNAVAILABLE,
    504: GRPC_UNAVAILABLE,
}
"""The proxy's own HTTP answers, each with the code a gRPC client gets for the same cause:
a deny (or a destination mismatch) PERMISSION_DENIED, an unreachable upstream UNAVAILABLE,
a timeout too (INTERFACE §3 gives gRPC one answer, grpc-status 14, for both); a request
it cannot read INTERNAL (as gRPC maps an HTTP 400), metadata past --max-header-bytes
RESOURCE_EXHAUSTED (as gRPC servers answer it)."""


def grpc_code_of_answer(status: int, error: str) -> int | None:
    """The gRPC code of the proxy's own answer `status` for the cause `error`: a resolver
    without an answer is UNAVAILABLE, which a client may retry, whatever the status
    (enforce's 421 for it is no deny)."""
    return GRPC_UNAVAILABLE if error == DNS_ERROR else GRPC_CODE_OF_ANSWER.get(status)


def grpc_status_of(fields: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The grpc-status of response headers or trailers (lower-case names), None if none;
    UNKNOWN for one that is no code of gRPC's (0 to 16), as gRPC clients read it, so the
    access log's number is the metric's label (and int() of over 4,300 digits raises, on
    the loop)."""
    for name, value in fields:
        if name == b"grpc-status":
            code = int(value) if value.isdigit() and len(value) <= 10 else GRPC_UNKNOWN
            return code if code <= MAX_GRPC_CODE else GRPC_UNKNOWN
    return None


@dataclass(slots=True)
class FlowRecord:
    """One client connection, filled in as it goes."""

    client: str
    destination: Destination | None = None
    detected: Detected | None = None
    hostname: str | None = None
    sniff_outcome: str = ""
    """tls, http1, h2, or the reason it is opaque (timeout, eof, not_tls, opaque_port …)."""
    ech: bool = False
    decision: Decision | None = None
    error: str = ""
    """"" on success; forbidden, connect_refused, reset, idle_timeout, loop …"""
    status: int | None = None
    """The proxy's own answer (403, 421, 502, 504) to an HTTP/1 client on a connection
    decided whole, which has no request lines to show it; None when it wrote none (a
    spliced connection's responses are the upstream's bytes, never read)."""
    bytes_from_client: int = 0
    bytes_from_upstream: int = 0
    requests: int = 0
    """HTTP requests reported on this connection (each with its own access line)."""
    started: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request or gRPC call on an HTTP/1.x or HTTP/2 connection."""

    client: str
    destination: Destination
    protocol: str
    """http1 or h2."""
    hostname: str | None
    method: str
    path: str
    grpc: bool
    decision: Decision
    status: int | None = None
    """The HTTP status the client got (the proxy's own 403/502/504 included); for the proxy's
    trailers-only answer to a gRPC call (HTTP 200 on the wire), the status of its cause, so
    where the call's route is an HTTP one, its metric and log line show a deny as 403."""
    grpc_status: int | None = None
    error: str = ""
    bytes_from_client: int = 0
    bytes_from_upstream: int = 0
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def unread(cls, flow: FlowRecord, protocol: str) -> RequestRecord:
        """A request the proxy could not read (no method, no path): counted under its
        connection's decision."""
        assert flow.destination is not None and flow.decision is not None
        return cls(
            client=flow.client,
            destination=flow.destination,
            protocol=protocol,
            hostname=flow.hostname,
            method="",
            path="",
            grpc=False,
            decision=flow.decision,
        )

    def answered_by_proxy(self, status: int, error: str) -> None:
        """The proxy answered `status` itself (403, 421, 502, 504 …). A request in the gRPC
        route family also gets the gRPC code of the same cause, whatever its content-type:
        its family, not its wire form, picks its metric and its label."""
        self.status, self.error = status, error
        if self.decision.protocol is RouteProtocol.GRPC:
            self.grpc_status = grpc_code_of_answer(status, error)


class Accounting(Protocol):
    """Where the data plane reports: server.Reporting, which hands it on to the metrics
    and the access log."""

    def connection_opened(self) -> None: ...

    def connection_decided(self, record: FlowRecord) -> None:
        """The decision is made (route open counters)."""

    def connection_closed(self, record: FlowRecord) -> None: ...

    def request_finished(self, record: RequestRecord) -> None: ...

    def upstream_failed(self, error: str) -> None:
        """A connect to an upstream failed (or the connection it made could not be taken
        over): once per connect, however many requests were waiting for it."""

    def policy_reloaded(self, ok: bool, generation: int) -> None: ...

    def destination_unconfirmed(self, error: str, hostname: str, mode: str, times: int) -> None:
        """--verify-destination in mode (log, enforce) found hostname elsewhere (error
        destination_mismatch) or got no answer for it (dns_error), for times connections or
        requests."""

    def tasks_counted(self, alive: int) -> None:
        """The event loop's tasks now, reported every second: a count that keeps growing
        while connections do not is a leak."""
