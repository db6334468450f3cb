"""HTTP/1.x request by request on h11: decide, forward, answer 403/502/504, splice upgrades.

Each request on a keep-alive connection is decided on its own. Allowed requests go to
the original destination or the route's backend over upstream connections kept per
(host, port) for the life of the client connection. Heads are written from h11's raw
items so names, case, order and the request-target reach the upstream as sent; bodies
stream through h11's framing with backpressure both ways.

The common exchange (a bodiless HTTP/1.1 request answered with a Content-Length
response, on a new or a kept upstream connection; not a request in the gRPC route
family, whose response's grpc-status is read) takes a lean path that skips h11:
http1_lean parses the heads with h11's grammar and the body is counted through. Anything
else, at any point before the client has seen a byte of the response (a failed connect
included), is replayed into h11 and handled there. h11's connections are only made when
an exchange needs them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

import h11

from egressproxy import http1_lean
from egressproxy import upstream as upstream_connector
from egressproxy.errors import PROXY_ERROR, UpstreamError, log_proxy_error
from egressproxy.http1_lean import (
    MAX_RESPONSE_HEAD,
    NEED_MORE,
    LeanRequest,
    LeanResponse,
    is_grpc_content_type,
)
from egressproxy.policy.decision import (
    DENY_ACTION,
    GRPC_PROTOCOL,
    Action,
    Decision,
    Destination,
    RequestFacts,
    RouteProtocol,
)
from egressproxy.policy.index import RequestDecider
from egressproxy.records import RequestRecord, grpc_status_of
from egressproxy.relay import (
    WRITE_BUFFER_HIGH,
    WRITE_BUFFER_LOW,
    Relay,
    RelayResult,
    abort_with_reset,
    held_bytes,
    quiet_for,
)
from egressproxy.settings import VerifyDestination
from egressproxy.sniff import NotThis
from egressproxy.sniff.http import (
    EMPTY_LINES_ALLOWED,
    authority_address,
    authority_host,
    empty_lines_before,
    target_authority,
)
from egressproxy.verify import REFUSALS, verification_mode

if TYPE_CHECKING:
    from egressproxy.flow import Flow

log = logging.getLogger("egressproxy.http1")

DENIED_BODY = "traffic not allowed"
MAX_IDLE_UPSTREAMS = 1
"""Idle upstream connections kept per client connection: one, closed before another
upstream is opened, so a client connection holds two descriptors at most (the
connection limit counts on it)."""
LINGER_SECONDS = 2.0
"""After an error answer, keep reading (and dropping) this long so the client sees it."""

_PAUSED_BY_UPSTREAM = 1
_PAUSED_BY_BACKLOG = 2
_PAUSED_BY_CLIENT_WRITE = 4
"""The client reads nothing of what is written to it: its next requests wait (the proxy's
own answers, a 403 longer than its request, would else pile up without bound)."""
_PAUSED_BY_TURN = 8
"""MAX_BODY_EVENTS_PER_TURN of the client's body were handled: the rest on a later turn."""

MAX_BODY_EVENTS_PER_TURN = 1024
"""Body pieces (h11 Data events) one side's bytes are handled in before the loop serves
the other connections: a chunked body of 1-byte chunks is 40,000 of them in one 256 KiB
read, and took the worker 250 ms, every other connection waiting."""

_LINE_ENDS = (b"\r", b"\n")
"""The first bytes of an empty line, which RFC 9112 2.2 lets precede a request line."""

_PROTOCOL_ERRORS = {400: "bad_request", 431: "header_too_large", 501: "not_implemented"}
_BARE_LINE_FEED = re.compile(rb"(?<!\r)\n")
"""A line of a chunked body ended by LF alone: h11 waits for the CRLF that ends a chunk
line, and both sides would wait out the idle timeout. Like llhttp (Node, Envoy), the
proxy refuses it at once, from either side: framing its peers may read otherwise."""


TIMEOUT_ERRORS = frozenset({"connect_timeout", "dns_timeout", "idle_timeout"})


def unavailable_status(error: str) -> int:
    """The proxy's own answer to a request its upstream failed before any response:
    504 when the upstream timed out (its name's lookup included), else 502 (HTTP/1, h2
    and an HTTP/1 connection spliced whole alike)."""
    return 504 if error in TIMEOUT_ERRORS else 502


def error_response(status: int, body: str, *, close: bool = True) -> bytes:
    """A complete, small HTTP/1.1 response; the body is plain text ending in a newline."""
    payload = (body + "\n").encode()
    reason = HTTPStatus(status).phrase
    headers = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: text/plain",
        f"content-length: {len(payload)}",
    ]
    if close:
        headers.append("connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + payload


DENIED_RESPONSE = error_response(403, DENIED_BODY, close=False)
"""The 403 as h11 writes it on a connection that stays open."""
DENIED_HEAD = DENIED_RESPONSE[: DENIED_RESPONSE.index(b"\r\n\r\n") + 4]
DENIED_CLOSING_HEAD = DENIED_HEAD[:-2] + b"Connection: close\r\n\r\n"
"""The 403 head as h11 writes it to a client that sent Connection: close."""
DENIED_CLOSING_RESPONSE = DENIED_CLOSING_HEAD + DENIED_RESPONSE[len(DENIED_HEAD) :]


def request_head(request: h11.Request) -> bytes:
    """The request head as the client wrote it: raw names, their order, the target's form."""
    parts = [b"%s %s HTTP/%s\r\n" % (request.method, request.target, request.http_version)]
    parts.extend(b"%s: %s\r\n" % item for item in request.headers.raw_items())
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(response: h11.Response | h11.InformationalResponse) -> bytes:
    """The response head as the upstream wrote it, but for a Transfer-Encoding on a 204 or
    304, which has no body: http.client (and requests, botocore) would wait for the chunks
    it announces, which the proxy does not forward (nginx drops it too)."""
    parts = [b"HTTP/%s %d %s\r\n" % (response.http_version, response.status_code, response.reason)]
    fields = response.headers.raw_items()
    if response.status_code in (204, 304):
        fields = [field for field in fields if field[0].lower() != b"transfer-encoding"]
    parts.extend(b"%s: %s\r\n" % item for item in fields)
    parts.append(b"\r\n")
    return b"".join(parts)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 9.2.2: only these are retried on a new connection when a kept one closed under
the request; a proxy must not retry another, which the upstream may have acted on."""


@dataclass(frozen=True)
class ParsedRequest:
    """What the policy and the framing logic need from one request head."""

    facts: RequestFacts
    has_body: bool
    smuggling: bool
    """Content-Length beside Transfer-Encoding, or Transfer-Encoding below HTTP/1.1 (RFC 9112
    6.1: faulty framing; h11 also reads `HTTP/0.9`), or a body on a CONNECT (RFC 9110
    9.3.6: it has none, so an upstream refusing the tunnel reads the body as its next
    request, one no policy decided): the policy and the upstream could frame the body
    differently, and the head is forwarded raw, so it is refused (400). (A second Host h11
    refuses itself.)"""
    head_size: int
    """Bytes of the request line and header lines (h11 only bounds an incomplete head)."""
    h2c_upgrade: bool
    """Upgrade: h2c asked for: after a 101 the rest would be HTTP/2 no policy sees."""
    bad_authority: bool
    """A Host or target authority that is not `host[:port]` (sniff.http.authority_host)."""
    bad_target: bool
    """A target no server reads as the policy would (400): not origin-form (`/…`), absolute
    form, `*` for OPTIONS or CONNECT's authority (`admin`, which some servers take for
    `/admin`); a `#`, which nginx takes for the end of the path (`/admin#x`); or an
    absolute form whose host or port differs from the Host's, which the upstream may read
    instead."""


def same_server(named: str, host_header: str, scheme: str) -> bool:
    """Whether an absolute-form target's authority and the Host name one server, host and
    port (where either names none, the scheme's), as a policy reading the port (OSM's
    host:port) and the upstream reading the Host would each take it."""
    default_port = 443 if scheme.lower() == "https" else 80
    return authority_address(named, default_port) == authority_address(host_header, default_port)


def parse_request(request: h11.Request, destination: Destination) -> ParsedRequest:
    """RequestFacts and framing flags of an h11 request (names already lower-case)."""
    host_header: str | None = None
    content_length = b""
    chunked = False
    grpc = False
    h2c_upgrade = False
    headers: list[tuple[str, str]] = []
    head_size = len(request.method) + len(request.target) + 14
    for name, value in request.headers:
        head_size += len(name) + len(value) + 4
        text_name, text_value = name.decode("latin-1"), value.decode("latin-1")
        headers.append((text_name, text_value))
        if name == b"host":
            host_header = text_value
        elif name == b"content-length":
            content_length = value
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"content-type":
            grpc = is_grpc_content_type(text_value)
        elif name == b"upgrade":
            h2c_upgrade = h2c_upgrade or "h2c" in text_value.lower()
    target = request.target.decode("latin-1")
    is_connect = request.method == b"CONNECT"
    authority = host_header
    bad_target = b"#" in request.target or isinstance(
        target_authority(request.method, request.target), NotThis
    )
    if is_connect:  # decided, as forward proxies tunnel, on the target, whatever the Host
        authority, path, query = target, "/", ""
    elif target.startswith("/") or target == "*":
        path, _, query = target.partition("?")
    else:
        try:
            absolute = urlsplit(target)
        except ValueError:  # an unbalanced [ or ] in its authority: no target at all
            absolute, bad_target = urlsplit(""), True
        named = absolute.netloc.rpartition("@")[2]
        authority = named or host_header
        path, query = absolute.path or "/", absolute.query
        if host_header is not None and not same_server(named, host_header, absolute.scheme):
            bad_target = True
    hostname = authority_host(authority) if authority else None
    facts = RequestFacts(
        destination=destination,
        hostname=hostname,
        method=request.method.decode("latin-1"),
        path=path,
        query=query,
        headers=tuple(headers),
        grpc=grpc,
        authority=authority or None,
    )
    has_body = chunked or content_length.lstrip(b"0") != b""
    return ParsedRequest(
        facts=facts,
        has_body=has_body,
        smuggling=(chunked and (content_length != b"" or request.http_version < b"1.1"))
        or (is_connect and has_body),
        head_size=head_size,
        h2c_upgrade=h2c_upgrade,
        bad_authority=bool(authority) and hostname is None,
        bad_target=bad_target,
    )


def as_sent_by_h11(request: h11.Request) -> h11.Request:
    """The event that puts an h11 client in the state a request leaves the upstream in.

    h11 only sends HTTP/1.1; an HTTP/1.0 request (whose own head is what goes out) is
    one without keep-alive, and a Host only to satisfy h11.
    """
    if request.http_version == b"1.1":
        return request
    headers = [*request.headers.raw_items(), (b"connection", b"close")]
    if not any(name == b"host" for name, _ in request.headers):
        headers.append((b"host", b"http-1.0"))
    return h11.Request(method=request.method, target=request.target, headers=headers)


def without_upgrade(request: h11.Request) -> h11.Request:
    """The request minus its Upgrade and HTTP2-Settings headers, the one header the proxy
    takes out (h11's framing aside): an h2c upgrade would carry requests past the
    per-request policy."""
    headers = [
        (name, value)
        for name, value in request.headers.raw_items()
        if name.lower() not in (b"upgrade", b"http2-settings")
    ]
    return h11.Request(
        method=request.method,
        target=request.target,
        headers=headers,
        http_version=request.http_version,
    )


def _as_http11(response: h11.Response) -> h11.Response:
    """h11 writes HTTP/1.1 only: an HTTP/1.0 upstream's response, for the client's h11, is
    the same response as 1.1 (the head the client gets is the upstream's when it delimits
    itself; else h11 frames the body for the client)."""
    if response.http_version == b"1.1":
        return response
    return h11.Response(
        status_code=response.status_code, headers=response.headers, reason=response.reason
    )


def _closing(response: h11.Response) -> h11.Response:
    """The response with `Connection: close` (a `keep-alive` one dropped), raw names kept."""
    fields = [
        (name, value)
        for name, value in response.headers.raw_items()
        if name.lower() != b"connection" or value.strip().lower() != b"keep-alive"
    ]
    if not any(
        name.lower() == b"connection" and b"close" in value.lower() for name, value in fields
    ):
        fields.append((b"Connection", b"close"))
    return h11.Response(
        status_code=response.status_code,
        headers=fields,
        http_version=response.http_version,
        reason=response.reason,
    )


def closing_head(head: bytes) -> bytes:
    """A lean response head (CRLF lines) with `Connection: close`, as _closing makes it."""
    status_line, *fields = head[:-4].split(b"\r\n")
    kept = [
        field
        for field in fields
        if field.partition(b":")[0].lower() != b"connection"
        or field.partition(b":")[2].strip().lower() != b"keep-alive"
    ]
    return b"\r\n".join((status_line, *kept, b"Connection: close")) + b"\r\n\r\n"


def _framed_twice(response: h11.Response) -> bool:
    """Content-Length beside Transfer-Encoding (RFC 9112 6.3: "ought to be handled as an
    error"): the head goes to the client as the upstream wrote it, so a client trusting the
    length would read the body differently from us."""
    names = {name for name, _ in response.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _head_size(response: h11.Response) -> int:
    """About the bytes of its head as written: h11 bounds only a head still incomplete, so
    one that came whole in one read would pass MAX_RESPONSE_HEAD however large."""
    size = len(response.reason) + 15
    for name, value in response.headers.raw_items():
        size += len(name) + len(value) + 4
    return size


def _self_delimited(response: h11.Response, request_method: bytes) -> bool:
    """The response body's end is marked in the message itself (not by closing)."""
    if response.status_code in (204, 304) or request_method == b"HEAD":
        return True
    if request_method == b"CONNECT" and 200 <= response.status_code < 300:
        return True
    return any(name in (b"content-length", b"transfer-encoding") for name, _ in response.headers)


class _SeenRequest(NamedTuple):
    """A lean request as the client wrote it and what the proxy made of it."""

    raw: bytes
    """The head's bytes as they came: a head that starts the inbox with them is this one."""
    fields: bytes
    """http1_lean.field_lines of the request: a head with them after its request line is
    read by its request line alone."""
    request: LeanRequest
    hostname: str | None
    method: str
    path: str
    decision: Decision


class _SeenResponse(NamedTuple):
    """A lean response head as the upstream wrote it, parsed for a request with method."""

    raw: bytes
    method: bytes
    response: LeanResponse


class _Upstream(asyncio.Protocol):
    """One upstream HTTP/1.x connection; events go to the proxy that owns it."""

    __slots__ = ("_h11", "key", "proxy", "reused", "transport")

    def __init__(self, proxy: Http1Proxy, key: tuple[str, int]) -> None:
        self.proxy = proxy
        self.key = key
        self._h11: h11.Connection | None = None
        self.transport: asyncio.Transport
        self.reused = False

    @property
    def h11(self) -> h11.Connection:
        """Made on first use: lean exchanges leave it fresh, so most connections never need it."""
        if self._h11 is None:
            self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        return self._h11

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)

    def data_received(self, data: bytes) -> None:
        self.proxy.upstream_data(self, data)

    def eof_received(self) -> bool:
        self.proxy.upstream_data(self, b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.proxy.upstream is self:
            self.proxy.pause_client(_PAUSED_BY_UPSTREAM)

    def resume_writing(self) -> None:
        self.proxy.resume_client(_PAUSED_BY_UPSTREAM)


def _discard(upstream: _Upstream) -> None:
    """Let go of an upstream between exchanges with a reset, not a FIN: a FIN sent first
    leaves the proxy's end in TIME_WAIT for a minute, holding one of its source ports
    towards that destination (HAProxy resets the server side for the same reason).
    abort() alone only skips the write buffer; a zero linger makes the close a reset."""
    abort_with_reset(upstream.transport)


class Http1Proxy(asyncio.Protocol):
    """The client side of an HTTP/1.x connection after sniffing: one exchange at a time.

    h11 keeps pipelined requests queued (PAUSED) until the current response is done,
    so answers go out in order without any queue of our own.
    """

    __slots__ = (
        "_client",
        "accounting",
        "backlog",
        "batch",
        "client_write_paused",
        "closed",
        "connecting",
        "decider",
        "draining",
        "empty_lines",
        "error",
        "exchange",
        "exchange_close",
        "exchange_reusable",
        "flow",
        "forwarding",
        "generation",
        "head_deadline",
        "head_scanned",
        "held",
        "host_header",
        "hostname",
        "idle",
        "inbox",
        "inbox_eof",
        "last_activity",
        "lean",
        "lean_verdict",
        "loop",
        "parsed",
        "paused",
        "policy",
        "processing",
        "record",
        "repeated_request",
        "repeated_response",
        "request",
        "request_body_sent",
        "response_received",
        "response_remaining",
        "response_started",
        "settings",
        "target",
        "targeted",
        "timer",
        "transport",
        "tunnel",
        "tunnel_relay",
        "upstream",
        "upstream_turn",
    )

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.settings = flow.context.settings
        self.accounting = flow.context.accounting
        self.transport = flow.transport
        self.loop = flow.context.loop
        self.policy = flow.context.policy
        """Each request is decided by the policy in force when its head comes, as Linkerd
        routes each request by the routes it last heard of: a reload reaches the next
        request of a keep-alive connection."""
        self.generation = self.policy.current.generation
        """The policy's generation when the lean path last looked for a head found again."""
        self.decider: RequestDecider | None = None
        """The lean path's decider for this connection's destination, by the policy in force
        when it was made."""
        self._client: h11.Connection | None = None
        self.idle: dict[tuple[str, int], _Upstream] = {}
        self.upstream: _Upstream | None = None
        """The upstream of the exchange in progress."""
        self.upstream_turn: _Upstream | None = None
        """An upstream not read while the rest of what it sent waits for a later turn."""
        self.request: h11.Request | None = None
        self.parsed: ParsedRequest | None = None
        self.record: RequestRecord | None = None
        self.tunnel: RequestRecord | None = None
        """The Upgrade or CONNECT request whose tunnel is open, reported when it ends."""
        self.tunnel_relay: Relay | None = None
        self.forwarding = False
        """The current request goes upstream (else its body is dropped: denied or failed)."""
        self.connecting: asyncio.Task[None] | None = None
        self.response_started = False
        self.request_body_sent = False
        self.paused = 0
        self.backlog = 0
        self.client_write_paused = False
        self.closed = False
        self.held = 0
        """Bytes written that had not left the proxy, as the idle sweep last saw them:
        their going out to a slow reader is traffic too."""
        self.batch: list[bytes] | None = None
        """Client-bound bytes collected while one upstream read is handled."""
        self.processing = False
        self.draining = flow.context.draining
        """The server stops: this connection closes after its exchange in flight. Set here
        for a connection still sniffing when the drain began, and by drain() for the rest."""
        self.error = ""
        self.last_activity = self.loop.time()
        self.head_deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.lean = True
        """Between exchanges h11 is bypassed: client bytes wait in inbox, h11 stays fresh."""
        self.inbox = b""
        self.head_scanned = 0
        """How much of inbox the lean parser last found to be a head still incomplete."""
        self.empty_lines = 0
        """Empty lines skipped before the head now awaited, at most EMPTY_LINES_ALLOWED as
        in the sniffer: past them h11 reads the next one and answers 400."""
        self.inbox_eof = False
        """The client sent its EOF: it sends nothing more."""
        self.exchange: LeanRequest | None = None
        """The request on the lean path whose response is awaited or coming."""
        self.response_received = b""
        """Its response's bytes before the head is complete."""
        self.repeated_request: _SeenRequest | None = None
        self.repeated_response: _SeenResponse | None = None
        """The last lean request head that left the connection open, and the last lean
        response head, each with what was made of it. A client that polls, a health
        check, a load generator send the same head again and again, and an upstream
        answers them alike (its Date changes once a second): such a head, found again
        byte for byte at the start of what came, is neither parsed nor decided again,
        while the policy it was decided by is in force (generation)."""
        self.response_remaining = -1
        """Its response's body bytes still to come; -1 until the head is through."""
        self.exchange_reusable = True
        """False once the upstream sent more than the response, or either side closes: not kept."""
        self.exchange_close = False
        """The request or the response said Connection: close: the client connection ends too."""
        self.targeted: Decision | None = None
        self.target = ("", 0)
        """The last decision _target answered, and its answer."""
        self.host_header = ""
        self.hostname: str | None = None
        """The last Host header and its hostname: a connection mostly sends one."""
        self.lean_verdict: tuple[Decision | None, str | None, bool] = (None, None, False)
        """The last decision and hostname _lean_verdict answered, and its answer."""

    @property
    def client(self) -> h11.Connection:
        """h11's view of the client, made when an exchange leaves the lean path."""
        if self._client is None:
            self._client = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes
            )
        return self._client

    # ---- life of the client connection -------------------------------------------------

    def start(self, first_request: tuple[LeanRequest, str] | None) -> None:
        """Take over the client transport and the bytes the flow has already read (the
        first request among them already read, with its hostname, when it is lean)."""
        flow = self.flow
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self.transport.set_protocol(self)
        self.head_deadline = (flow.first_byte_at or self.loop.time()) + self.settings.header_timeout
        flow.context.idle_sweep.add(self)
        self.inbox = flow.buffer
        flow.record.bytes_from_client += len(flow.buffer)
        flow.buffer = b""
        self.inbox_eof = flow.client_eof
        self.transport.resume_reading()
        if first_request is not None:
            request, self.hostname = first_request
            self.host_header = request.host
            if not self._lean_request(request, None):
                self._leave_lean()
                return
        self._process_lean()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.flow.record.bytes_from_client += len(data)
        if self.lean:
            exchange = self.exchange
            if exchange is None:
                self.inbox += data
                self._process_lean()
            elif not exchange.close:
                self.inbox += data
                if len(self.inbox) > WRITE_BUFFER_HIGH:
                    self.pause_client(_PAUSED_BY_BACKLOG)
            # else: bytes after Connection: close are dropped; the connection ends with the answer
            return
        if self.client.their_state is h11.MUST_CLOSE:
            return  # after a request that said close: dropped, the answer ends the connection
        if self.head_deadline is None and self.client.their_state is h11.IDLE:
            self._await_head()
        self.client.receive_data(data)
        if self.connecting is not None:
            self._count_backlog(len(data))
            return
        self._process()

    def eof_received(self) -> bool:
        self.inbox_eof = True
        if self.lean:
            if self.exchange is None:
                self._process_lean()
            return True
        self.client.receive_data(b"")
        if self.connecting is None:
            self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.record is not None:  # cut by the drain timeout (Flow.abort), or by the client
            error = "" if self._answered_whole_locally() else self.flow.record.error or "reset"
            self._request_failed(error)
        self._close_upstreams()
        self._stop()
        self.flow.finish(self.error or ("reset" if exc else ""))

    def pause_writing(self) -> None:
        self.client_write_paused = True
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_write_paused = False
        if self.upstream is not None and self.upstream is not self.upstream_turn:
            self.upstream.transport.resume_reading()
        if self.paused & _PAUSED_BY_CLIENT_WRITE:
            self.resume_client(_PAUSED_BY_CLIENT_WRITE)
            if self.lean and not self.processing:
                self._process_lean()

    def drain(self) -> None:
        """The server is stopping: finish the request in flight, then close."""
        self.draining = True
        if self.record is None and self.client.their_state is h11.IDLE:
            self._close()

    def cut(self) -> None:
        """The drain timeout ends the connection: a tunnel's two sides, or the client with
        the exchange in flight, are reset (_cut)."""
        if self.tunnel_relay is not None:
            self.tunnel_relay.cut("drain")
        else:
            self._cut()

    def _cut(self) -> None:
        """End the client's connection mid-exchange with a reset: a FIN would let a body
        framed by the close (an HTTP/1.0 client's) look whole."""
        abort_with_reset(self.transport)

    def pause_client(self, reason: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_client(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused:
                self.transport.resume_reading()

    def _hold_backlog(self) -> None:
        """After an exchange, as data_received does: pipelined requests past
        WRITE_BUFFER_HIGH wait unread while the next exchange runs. Reading again at the end
        of every exchange let one more read in each time: a client pipelining faster than
        the upstream answered grew the inbox without end."""
        if self.lean and self.exchange is not None and len(self.inbox) > WRITE_BUFFER_HIGH:
            self.pause_client(_PAUSED_BY_BACKLOG)

    def _count_backlog(self, size: int) -> None:
        """Bytes waiting for the exchange in progress; too many: stop reading the client."""
        self.backlog += size
        if self.backlog > WRITE_BUFFER_HIGH:
            self.pause_client(_PAUSED_BY_BACKLOG)

    def _close(self) -> None:
        """Close once what is written has gone out; connection_lost does the accounting.

        While bytes are still unsent the idle sweep stays on: a client that stopped
        reading would otherwise hold the connection (and its place) for ever.
        """
        self._stop()
        self._flush_batch()
        self.closed = True
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self.flow.context.idle_sweep.add(self)

    def _stop(self) -> None:
        self.flow.context.idle_sweep.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None

    def _close_upstreams(self) -> None:
        for idle in self.idle.values():
            _discard(idle)
        self.idle.clear()
        if self.upstream is not None:
            self.upstream.transport.abort()
            self.upstream = None

    # ---- timers: header deadline (408) and idle timeout -----------------------------

    def _await_head(self) -> None:
        """A request head is incomplete: it must be whole by head_deadline (set from now
        unless it is already running)."""
        if self.head_deadline is None:
            self.head_deadline = self.loop.time() + self.settings.header_timeout
        if self.timer is None or self.timer.when() > self.head_deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(self.head_deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.head_deadline is None:
            return
        if self.loop.time() >= self.head_deadline:
            self._head_timed_out()
            return
        self._await_head()

    def tick(self) -> None:
        """The idle sweep's check, every quarter of --idle-timeout."""
        now = self.loop.time()
        held = held_bytes(self.transport)
        if self.upstream is not None and not self.closed:
            held += held_bytes(self.upstream.transport)
        if quiet_for(self, held, now) < self.settings.idle_timeout:
            return
        if self.closed:
            log.info(
                "%s: closing, nothing read for %ss",
                self.flow.record.client,
                self.settings.idle_timeout,
            )
            self.error = self.error or "idle_timeout"
            self._cut()
            return
        if self._awaiting_response():
            assert self.upstream is not None
            log.info(
                "%s: no answer from %s:%s for %ss",
                self.flow.record.client,
                *self.upstream.key,
                self.settings.idle_timeout,
            )
            self._upstream_broken(self.upstream, "idle_timeout")
            self.last_activity = now
            return
        if self.connecting is not None and self.record is not None:
            log.info(
                "%s: no upstream for %s after %ss",
                self.flow.record.client,
                self.record.hostname or self.flow.record.destination,
                self.settings.idle_timeout,
            )
            self._upstream_not_ready()
            self.last_activity = now
            return
        log.info("%s: idle for %ss, closing", self.flow.record.client, self.settings.idle_timeout)
        self.error = "idle_timeout"
        self._close_upstreams()
        if self.record is not None:
            self._request_failed("idle_timeout")
            self._cut()
        else:
            self.transport.abort()

    def _upstream_not_ready(self) -> None:
        """--idle-timeout ran out while the exchange's upstream was still being verified or
        connected (a connect timeout or a resolver slower than it): 504 idle_timeout, as for
        an upstream that never answers and as h2 answers it, not a reset without answer."""
        assert self.connecting is not None
        self.connecting.cancel()
        self.connecting = None
        if self.exchange is not None:
            self._lean_to_h11(None, b"")
        self._upstream_unavailable("idle_timeout")
        self._resume_after_backlog()

    def _awaiting_response(self) -> bool:
        """A request went upstream and no response has started: a stall is the upstream's."""
        return self.upstream is not None and self.record is not None and not self.response_started

    def _head_timed_out(self) -> None:
        log.info(
            "%s: request head incomplete after %ss",
            self.flow.record.client,
            self.settings.header_timeout,
        )
        self._protocol_failure(408, "header_timeout")

    # ---- client events ------------------------------------------------------------------

    def _process(self) -> None:
        """Pull client events until h11 needs bytes or waits for the current response."""
        self.processing = True
        try:
            self._pull_client_events()
        finally:
            self.processing = False
        if self.lean:
            self._process_lean()

    def _pull_client_events(self) -> None:
        client = self.client
        pieces = 0
        while not self.closed and not self.lean:
            if client.their_state is h11.MUST_CLOSE:
                return  # the request said close (RFC 9112 9.6): no later request is read
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as error:
                self._client_protocol_error(error)
                return
            kind = type(event)
            if kind is h11.Data:
                self._request_data(event)  # type: ignore[arg-type]
                pieces += 1
                if pieces == MAX_BODY_EVENTS_PER_TURN:
                    self.pause_client(_PAUSED_BY_TURN)
                    self.loop.call_soon(self._next_client_turn)
                    return
            elif kind is h11.Request:
                self._request_started(event)  # type: ignore[arg-type]
                if self.connecting is not None:
                    return
            elif kind is h11.EndOfMessage:
                self._request_ended(event)  # type: ignore[arg-type]
            elif event is h11.NEED_DATA:
                if client.their_state is h11.IDLE and client.trailing_data[0]:
                    self._await_head()
                elif client.their_state is h11.SEND_BODY and _BARE_LINE_FEED.search(
                    client.trailing_data[0]
                ):
                    self._client_protocol_error(
                        h11.RemoteProtocolError("chunk line ended by LF alone", 400)
                    )
                return
            elif event is h11.PAUSED:
                # after a request, or an Upgrade or CONNECT awaiting its answer (h11's
                # MIGHT_SWITCH_PROTOCOL); once switched, the tunnel's relay reads
                if client.their_state is not h11.SWITCHED_PROTOCOL:
                    self.backlog = 0
                    self._count_backlog(len(client.trailing_data[0]))
                return
            else:  # ConnectionClosed: the client sends no more; finish what is in flight
                if self.record is None:
                    self._close()
                return

    def _next_client_turn(self) -> None:
        self.resume_client(_PAUSED_BY_TURN)
        if not self.closed and not self.lean:
            self._process()

    def _process_lean(self) -> None:
        """Serve requests from the inbox while each is lean; hand the first other to h11."""
        while self.lean and not self.closed and self.exchange is None:
            if self.client_write_paused:
                self.pause_client(_PAUSED_BY_CLIENT_WRITE)
                return
            skipped = (
                empty_lines_before(self.inbox, EMPTY_LINES_ALLOWED - self.empty_lines)
                if self.inbox[:1] in _LINE_ENDS
                else 0
            )
            if skipped:  # RFC 9112 2.2; the head deadline still runs over them
                self.empty_lines += self.inbox.count(b"\n", 0, skipped)
                self.inbox = self.inbox[skipped:]
            partial_line = self.inbox == b"\r"  # an empty line's CR, its LF yet to come
            if (partial_line or (skipped and not self.inbox)) and not self.inbox_eof:
                self._await_head()
                return
            if not self.inbox:
                if self.inbox_eof:
                    self._close()
                return
            generation = self.policy.current.generation
            if generation != self.generation:  # a reload: no head is decided as before it
                self.generation, self.repeated_request = generation, None
            repeated = self.repeated_request
            if repeated is not None and self.inbox.startswith(repeated.raw):
                self.head_scanned = self.empty_lines = 0
                self._serve_lean(repeated.request, repeated)
                continue
            limit = self.settings.max_header_bytes
            if (
                self.head_scanned
                and not self.inbox_eof
                and http1_lean.still_incomplete(self.inbox, self.head_scanned, limit)
            ):
                if not self._refused_request_line():
                    self.head_scanned = len(self.inbox)
                return  # its deadline runs
            like = (
                http1_lean.parse_request_like(self.inbox, repeated.request, repeated.fields, limit)
                if repeated is not None and repeated.fields
                else None
            )
            request = like or http1_lean.parse_request(self.inbox, limit)
            if request is NEED_MORE:
                if self.inbox_eof:
                    self._leave_lean()
                elif not self._refused_request_line():
                    self.head_scanned = len(self.inbox)
                    self._await_head()
                return
            self.head_scanned = self.empty_lines = 0
            if request is None or not self._lean_request(request, repeated if like else None):
                self._leave_lean()
                return

    def _refused_request_line(self) -> bool:
        """A head still incomplete whose first line no server would take: 400 now."""
        line = http1_lean.refused_request_line(self.inbox, self.head_scanned)
        if line is None:
            return False
        log.info("%s: bad request line: %r", self.flow.record.client, line[:100])
        self._protocol_failure(400, "bad_request")
        return True

    def _leave_lean(self) -> None:
        """From the next request on, h11 reads the client (until the exchange ends)."""
        self.lean = False
        self.client.receive_data(self.inbox)
        self.inbox = b""
        if self.inbox_eof:
            self.client.receive_data(b"")
        self._process()

    def _lean_request(self, request: LeanRequest, like: _SeenRequest | None) -> bool:
        """Decide and deny or forward a lean request; False: h11 must take it (nothing done).

        like: the request seen before whose field lines this one's repeat (parse_request_like)."""
        index = self.policy.current.index
        target = request.target.decode("latin-1")
        if not target.startswith("/") or "#" in target:
            return False  # h11's path answers it (see ParsedRequest.bad_target)
        path, _, query = target.partition("?")
        if (
            like is not None
            and path == like.path
            and request.method == like.request.method
            and not index.reads_query
        ):  # the same Host, headers, method and path: the same decision
            self._serve_lean(request, like)
            return True
        if request.host != self.host_header:
            hostname = authority_host(request.host)
            if hostname is None and request.host:
                return False  # h11's path answers it 400
            self.host_header, self.hostname = request.host, hostname
        method = request.method.decode("latin-1")
        decider = self.decider
        if decider is None or decider.index is not index:
            destination = self.flow.record.destination
            assert destination is not None
            decider = self.decider = RequestDecider(index, destination)
        decision = decider.decide(
            self.hostname, method, path, query, request.headers, request.grpc, request.host or None
        )
        known_decision, known_hostname, lean = self.lean_verdict
        if decision is not known_decision or self.hostname is not known_hostname:
            lean = self._lean_verdict(decision)
        if not lean:
            return False
        raw = request.head if like else self.inbox[: request.size]  # a like head is as it came
        if request.close:
            fields = b""
        else:
            fields = like.fields if like else http1_lean.field_lines(request, raw)
        seen = tuple.__new__(  # a C call, where _SeenRequest(...) runs a Python __new__
            _SeenRequest, (raw, fields, request, self.hostname, method, path, decision)
        )
        self.repeated_request = None if request.close else seen
        self._serve_lean(request, seen)
        return True

    def _serve_lean(self, request: LeanRequest, seen: _SeenRequest) -> None:
        """Deny or forward a lean request decided (by _lean_request, now or before): seen is
        request or one with its method, path and field lines."""
        decision = seen.decision
        flow = self.flow
        destination = flow.record.destination
        assert destination is not None
        self.host_header, self.hostname = request.host, seen.hostname
        self.inbox = self.inbox[request.size :]
        self.head_deadline = None
        record = RequestRecord(  # by position: by keyword it costs nearly twice as much
            flow.record.client,
            destination,
            "http1",
            seen.hostname,
            seen.method,
            seen.path,
            request.grpc,
            decision,
        )
        if decision.action is DENY_ACTION:
            record.answered_by_proxy(403, "")
            closing = request.close or self.draining
            if closing:  # said, so no client sends its next request into the close
                denial = DENIED_CLOSING_HEAD if seen.method == "HEAD" else DENIED_CLOSING_RESPONSE
            else:
                denial = DENIED_HEAD if seen.method == "HEAD" else DENIED_RESPONSE
            self._write_client(denial)
            self._report(record)
            if closing:
                self._close()
            return
        self.record = record
        self.exchange = request
        self.response_received, self.response_remaining = b"", -1
        self.exchange_reusable, self.exchange_close = True, request.close
        self.forwarding = True
        key = self._target(decision)
        upstream = self.idle.pop(key, None)
        if upstream is None:
            self._connect_for(key)
            return
        upstream.reused = True
        self._send_lean(upstream, request)

    def _send_lean(self, upstream: _Upstream, request: LeanRequest) -> None:
        self.upstream = upstream
        upstream.transport.write(request.head)
        if self.client_write_paused:
            upstream.transport.pause_reading()

    def _lean_response(self, upstream: _Upstream, request: LeanRequest, data: bytes) -> None:
        record = self.record
        assert record is not None
        if self.response_remaining < 0:
            received = self.response_received + data if self.response_received else data
            response = self._lean_response_head(received, request.method)
            if response is NEED_MORE:
                self.response_received = received
                return
            self.response_received = b""  # not kept past the head: an idle connection holds none
            if response is None:
                self._lean_to_h11(upstream, received)
                return
            record.status = response.status
            self.response_started = True
            end = response.size + response.body_length
            body = received[response.size : end]
            self.exchange_close = self.exchange_close or response.close
            self.exchange_reusable = len(received) <= end and not self.exchange_close
            self.response_remaining = response.body_length - len(body)
            record.bytes_from_upstream += len(body)
            head = response.head
            if self.draining and not response.close:
                head = closing_head(head)  # the connection ends with this answer: say so
            if self.batch is not None:
                self.batch.extend((head, body))
            else:
                self.transport.writelines((head, body))
        else:
            body = data
            if len(body) > self.response_remaining:
                body = body[: self.response_remaining]
                self.exchange_reusable = False
            self.response_remaining -= len(body)
            record.bytes_from_upstream += len(body)
            self._write_client(body)
        if self.response_remaining == 0:
            self._lean_exchange_done(upstream)

    def _lean_response_head(
        self, received: bytes, method: bytes
    ) -> LeanResponse | http1_lean.Incomplete | None:
        """The lean response head that starts received, NEED_MORE, or None (h11's)."""
        repeated = self.repeated_response
        if repeated is not None and received.startswith(repeated.raw) and method == repeated.method:
            return repeated.response
        if self.response_received and http1_lean.still_incomplete(
            received, len(self.response_received), MAX_RESPONSE_HEAD
        ):
            return NEED_MORE
        response = http1_lean.parse_response(received, method)
        if isinstance(response, LeanResponse):
            self.repeated_response = _SeenResponse(received[: response.size], method, response)
        return response

    def _lean_exchange_done(self, upstream: _Upstream) -> None:
        self.exchange = None
        self.upstream = None
        self.response_started = self.forwarding = False
        if self.exchange_reusable:
            self._keep_idle(upstream)
        else:
            _discard(upstream)
        record, self.record = self.record, None
        assert record is not None
        self._report(record)
        if self.exchange_close or self.draining:
            self.resume_client(_PAUSED_BY_UPSTREAM)
            self._close()
            return
        if self.paused:
            self.resume_client(_PAUSED_BY_UPSTREAM | _PAUSED_BY_BACKLOG)
        if self.inbox or self.inbox_eof:
            self._process_lean()
            self._hold_backlog()

    def _lean_to_h11(self, upstream: _Upstream | None, received: bytes) -> None:
        """Replay the lean request into h11 (both sides), then let h11 read the response.

        Only while the client has seen nothing of the response: from here on the
        exchange is exactly as if h11 had read it from the start. Without an upstream
        (the connect failed) only the client side is replayed, for the proxy's answer.
        """
        lean, self.exchange = self.exchange, None
        assert lean is not None
        self.response_received = b""
        self.lean = False
        client = self.client
        client.receive_data(lean.head + self.inbox)
        self.inbox = b""
        if self.inbox_eof:
            client.receive_data(b"")
        request = client.next_event()
        assert isinstance(request, h11.Request)
        assert isinstance(client.next_event(), h11.EndOfMessage)
        destination = self.flow.record.destination
        assert destination is not None
        self.request, self.parsed = request, parse_request(request, destination)
        if upstream is None:
            return
        upstream.h11.send(request)
        upstream.h11.send(h11.EndOfMessage())
        if received:
            self._upstream_events(upstream, received)

    def _request_started(self, request: h11.Request) -> None:
        self.head_deadline = None
        flow = self.flow
        assert flow.record.destination is not None
        parsed = parse_request(request, flow.record.destination)
        decision = self.policy.current.index.decide_request(parsed.facts)
        self.request, self.parsed = request, parsed
        self.record = RequestRecord(
            client=flow.record.client,
            destination=flow.record.destination,
            protocol="http1",
            hostname=parsed.facts.hostname,
            method=parsed.facts.method,
            path=parsed.facts.path,
            grpc=parsed.facts.grpc,
            decision=decision,
        )
        if parsed.head_size > self.settings.max_header_bytes:
            self._protocol_failure(431, "header_too_large")
            return
        if parsed.smuggling or parsed.bad_authority or parsed.bad_target:
            self._protocol_failure(400, "bad_request")
            return
        if decision.action is Action.DENY:
            if not decision.audit:
                self._respond_locally(403, DENIED_BODY, "")
                return
            log.info(
                "%s: would deny %s %s (audit)",
                flow.record.client,
                parsed.facts.method,
                parsed.facts.hostname,
            )
        if parsed.h2c_upgrade:
            self.request = without_upgrade(request)
        mode = verification_mode(decision, parsed.facts.hostname, self.settings.verify_destination)
        if mode is VerifyDestination.LOG:
            self._observe_destination()
        elif mode is VerifyDestination.ENFORCE:
            self.backlog = 0
            self.connecting = self.loop.create_task(
                self._verify_then_forward(decision),
                name=f"http1 verify {flow.record.client} {parsed.facts.hostname}",
            )
            return
        self._forward(self._target(decision))

    def _observe_destination(self) -> None:
        """--verify-destination log: the Host's addresses are checked while the request goes on."""
        record, destination = self.record, self.flow.record.destination
        assert record is not None and record.hostname is not None and destination is not None
        self.flow.context.resolver.observe(
            record.hostname, destination, record.client, self.accounting
        )

    async def _verify_then_forward(self, decision: Decision) -> None:
        """--verify-destination enforce: the Host must resolve to the original destination."""
        record, destination = self.record, self.flow.record.destination
        assert record is not None and record.hostname is not None and destination is not None
        try:
            resolver = self.flow.context.resolver
            error = await resolver.check(
                record.hostname, destination, record.client, self.accounting
            )
            self.connecting = None
            if error:
                self._respond_locally(421, REFUSALS[error], error)
                self._resume_after_backlog()
                return
            self._forward(self._target(decision))
            if self.connecting is None:
                self._resume_after_backlog()
        except Exception as unforeseen:
            self._failed_in_task(unforeseen, f"verifying {record.hostname}")

    def _lean_verdict(self, decision: Decision) -> bool:
        """Whether the lean path serves a request of this decision and hostname (remembered
        in lean_verdict: a connection's requests mostly share both). Not a request in the
        gRPC route family (h11's path reads the grpc-status of its response), nor an audited
        denial, nor one whose destination is to be verified."""
        if decision.protocol is GRPC_PROTOCOL:
            lean = False
        elif decision.action is DENY_ACTION:
            lean = not decision.audit
        else:
            mode = verification_mode(decision, self.hostname, self.settings.verify_destination)
            lean = mode is VerifyDestination.OFF
        self.lean_verdict = (decision, self.hostname, lean)
        return lean

    def _target(self, decision: Decision) -> tuple[str, int]:
        """address_for, asked once per decision: a connection's requests mostly share one."""
        if decision is not self.targeted:
            destination = self.flow.record.destination
            assert destination is not None
            self.target = upstream_connector.address_for(decision, destination)
            self.targeted = decision
        return self.target

    def _forward(self, key: tuple[str, int]) -> None:
        self.forwarding = True
        idle = self.idle.pop(key, None)
        if idle is not None:
            idle.reused = True
            self._send_request(idle)
            return
        self._connect_for(key)

    def _connect_for(self, key: tuple[str, int]) -> None:
        """Open a new upstream, closing the idle one first (two descriptors per client)."""
        for other in self.idle.values():
            _discard(other)
        self.idle.clear()
        self.backlog = 0
        self.connecting = self.loop.create_task(
            self._connect(key), name=f"http1 connect {self.flow.record.client}→{key[0]}:{key[1]}"
        )

    async def _connect(self, key: tuple[str, int]) -> None:
        try:
            _, connected = await upstream_connector.connect(
                key[0],
                key[1],
                lambda: _Upstream(self, key),
                timeouts=self.flow.context.connect_timeouts,
                mark=self.settings.mark,
                connector=self.flow.context.splicer.connect,
                lookups=self.flow.context.resolver.threads,
            )
            self.upstream_ready(connected)
        except UpstreamError as error:
            self.connecting = None
            log.info("%s → %s:%s: %s", self.flow.record.client, key[0], key[1], error)
            self.accounting.upstream_failed(error.kind)
            if self.exchange is not None:
                self._lean_to_h11(None, b"")
            self._upstream_unavailable(error.kind)
            self._resume_after_backlog()
        except Exception as unforeseen:
            self._failed_in_task(unforeseen, f"connecting to {key[0]}:{key[1]}")

    def _failed_in_task(self, error: Exception, doing: str) -> None:
        """The proxy itself failed the exchange while its task waited (a bug, or a resource
        the kernel refused): reset, and counted as proxy_error once connection_lost comes.
        A task has no transport to close it as a failing callback has; connection_lost
        cancels a task still running (the failed one is over by then)."""
        log_proxy_error(log, f"{self.flow.record.client}: {doing}", error)
        self.error = PROXY_ERROR
        if self.record is not None:
            self.record.error = PROXY_ERROR
        self._close_upstreams()
        self._cut()

    def _resume_after_backlog(self) -> None:
        self.backlog = 0
        self.resume_client(_PAUSED_BY_BACKLOG)
        self._process()

    def upstream_ready(self, upstream: _Upstream) -> None:
        """A freshly connected upstream: send the waiting request and go on reading."""
        self.connecting = None
        if self.closed:
            upstream.transport.abort()
            return
        if self.exchange is not None:
            self._send_lean(upstream, self.exchange)
            return
        self._send_request(upstream)
        self._resume_after_backlog()

    def _send_request(self, upstream: _Upstream) -> None:
        assert self.request is not None
        self.upstream = upstream
        upstream.h11.send(as_sent_by_h11(self.request))
        upstream.transport.write(request_head(self.request))
        if self.client.their_state is not h11.SEND_BODY:
            # a retry on a fresh connection: the (bodiless) request had already ended
            upstream.transport.write(upstream.h11.send(h11.EndOfMessage()) or b"")
        if self.client_write_paused:
            upstream.transport.pause_reading()

    def _request_data(self, data: h11.Data) -> None:
        upstream = self.upstream
        if upstream is None or not self.forwarding:
            return
        assert self.record is not None
        self.record.bytes_from_client += len(data.data)
        self.request_body_sent = True
        pieces = upstream.h11.send_with_data_passthrough(data)
        if pieces:
            upstream.transport.writelines(pieces)

    def _request_ended(self, end: h11.EndOfMessage) -> None:
        upstream = self.upstream
        if upstream is not None and self.forwarding:
            tail = upstream.h11.send(end)
            if tail:
                upstream.transport.write(tail)
        self._maybe_next_cycle()

    def _maybe_next_cycle(self) -> None:
        """Both halves of the exchange are done: reuse the upstream, await the next request."""
        client = self.client
        ours, theirs = client.our_state, client.their_state
        if ours not in (h11.DONE, h11.MUST_CLOSE) or theirs is h11.SEND_BODY:
            return
        self._finish_exchange()
        if ours is not h11.DONE or theirs is not h11.DONE or self.draining:
            self._close()
            return
        rest, self.inbox_eof = client.trailing_data
        self._client = None
        self.lean, self.inbox, self.head_scanned, self.empty_lines = True, bytes(rest), 0, 0
        self.backlog = 0
        self.resume_client(_PAUSED_BY_BACKLOG)
        if not self.processing:
            self._process_lean()
            self._hold_backlog()

    def _finish_exchange(self) -> None:
        self.response_started = self.request_body_sent = False
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self._release(upstream)
            # a full upstream write buffer paused the client; that upstream is done with
            self.resume_client(_PAUSED_BY_UPSTREAM)
        if self.record is not None:
            self._report(self.record)
            self.record = None
        self.request = self.parsed = None
        self.forwarding = False

    def _release(self, upstream: _Upstream) -> None:
        """Keep the upstream for the next request to the same (host, port), if it can be."""
        connection = upstream.h11
        if (
            connection.our_state is h11.DONE
            and connection.their_state is h11.DONE
            # no bytes past the response (not to be trusted), nor its end by the close
            and connection.trailing_data == (b"", False)
        ):
            connection.start_next_cycle()
            self._keep_idle(upstream)
        else:
            _discard(upstream)

    def _keep_idle(self, upstream: _Upstream) -> None:
        if self.client_write_paused:
            upstream.transport.resume_reading()
        previous = self.idle.pop(upstream.key, None)
        if previous is not None:
            _discard(previous)
        if len(self.idle) >= MAX_IDLE_UPSTREAMS:
            oldest = next(iter(self.idle))
            _discard(self.idle.pop(oldest))
        self.idle[upstream.key] = upstream

    # ---- upstream events ----------------------------------------------------------------

    def upstream_data(self, upstream: _Upstream, data: bytes) -> None:
        if upstream is not self.upstream:
            self._forget_idle(upstream)
            _discard(upstream)
            return
        self.last_activity = self.loop.time()
        self.flow.record.bytes_from_upstream += len(data)
        exchange = self.exchange
        if exchange is not None:
            if data:
                self._lean_response(upstream, exchange, data)
            return
        self._upstream_events(upstream, data)

    def _upstream_events(self, upstream: _Upstream, data: bytes) -> None:
        connection = upstream.h11
        connection.receive_data(data)
        self.batch = []
        try:
            self._pull_upstream_events(upstream, connection, data)
        finally:
            self._flush_batch()

    def _next_upstream_turn(self, upstream: _Upstream) -> None:
        """The rest of what the upstream sent, and its reading again once that is done."""
        if self.upstream_turn is upstream:
            self.upstream_turn = None
        if upstream is not self.upstream or self.closed:
            return
        self.batch = []
        try:
            self._pull_upstream_events(upstream, upstream.h11, b"")
        finally:
            self._flush_batch()
        if (
            upstream is not self.upstream_turn
            and not upstream.transport.is_closing()
            and (upstream is not self.upstream or not self.client_write_paused)
        ):  # current, or kept idle once its response ended
            upstream.transport.resume_reading()

    def _flush_batch(self) -> None:
        """Write what one read of the upstream produced with one system call."""
        batch, self.batch = self.batch, None
        if batch:
            self.transport.writelines(batch)

    def _pull_upstream_events(
        self, upstream: _Upstream, connection: h11.Connection, data: bytes
    ) -> None:
        pieces = 0
        while upstream is self.upstream:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as error:
                log.info(
                    "%s: bad response from %s:%s: %s", self.flow.record.client, *upstream.key, error
                )
                # bytes of a response that never made one (an EOF cut them): not a reset,
                # and the request is not sent again to an upstream that answered it
                received = data or connection.trailing_data[0]
                self._upstream_broken(upstream, "bad_response" if received else "reset")
                return
            kind = type(event)
            if kind is h11.Data:
                self._response_data(event)  # type: ignore[arg-type]
                pieces += 1
                if pieces == MAX_BODY_EVENTS_PER_TURN:
                    upstream.transport.pause_reading()
                    self.upstream_turn = upstream
                    self.loop.call_soon(self._next_upstream_turn, upstream)
                    return
            elif kind is h11.Response:
                if _framed_twice(event):  # type: ignore[arg-type]
                    client = self.flow.record.client
                    log.info("%s: response from %s:%s framed twice", client, *upstream.key)
                    self._upstream_broken(upstream, "bad_response")
                    return
                if _head_size(event) > MAX_RESPONSE_HEAD:  # type: ignore[arg-type]
                    client = self.flow.record.client
                    log.info("%s: response head from %s:%s too large", client, *upstream.key)
                    self._upstream_broken(upstream, "bad_response")
                    return
                self._response_started(event)  # type: ignore[arg-type]
            elif kind is h11.EndOfMessage:
                self._response_ended(event)  # type: ignore[arg-type]
            elif kind is h11.InformationalResponse:
                self._informational(event)  # type: ignore[arg-type]
            elif event is h11.PAUSED:
                if connection.their_state is h11.SWITCHED_PROTOCOL:
                    self._switch(upstream)
                return
            else:  # NEED_DATA, or ConnectionClosed after the response
                if connection.their_state is h11.SEND_BODY and _BARE_LINE_FEED.search(
                    connection.trailing_data[0]
                ):
                    client = self.flow.record.client
                    log.info("%s: chunk line from %s:%s ended by LF alone", client, *upstream.key)
                    self._upstream_broken(upstream, "bad_response")
                return

    def upstream_lost(self, upstream: _Upstream) -> None:
        if upstream is not self.upstream:
            self._forget_idle(upstream)
            return
        if self.closed:
            return
        # a lean response head an EOF left incomplete: as in _pull_upstream_events
        cut_head = self.exchange is not None and self.response_received
        self._upstream_broken(upstream, "bad_response" if cut_head else "reset")

    def _forget_idle(self, upstream: _Upstream) -> None:
        if self.idle.get(upstream.key) is upstream:
            del self.idle[upstream.key]

    def _upstream_broken(self, upstream: _Upstream, error: str) -> None:
        """The upstream failed mid-exchange: retry, answer 502, or cut the client."""
        if self.exchange is not None:
            if self.response_started:
                self.exchange = None
            else:
                self._lean_to_h11(upstream, b"")
        self.upstream = None
        upstream.transport.abort()
        self.resume_client(_PAUSED_BY_UPSTREAM)
        if self.response_started:
            if self._client is not None and self.client.our_state in (h11.DONE, h11.MUST_CLOSE):
                # The answer went out whole (an early 413, say) before the upstream closed:
                # the exchange is over; the rest of the body is dropped, not reset away.
                self._request_failed("")
                self._linger()
                return
            self._request_failed(error)
            self.error = error
            self._cut()
            return
        if (
            error == "reset"
            and upstream.reused
            and not self.request_body_sent
            and not self._expects_body()
            and self.parsed is not None
            and self.parsed.facts.method in IDEMPOTENT_METHODS
        ):
            log.debug(
                "%s: reused upstream %s:%s closed, retrying", self.flow.record.client, *upstream.key
            )
            self.connecting = self.loop.create_task(
                self._connect(upstream.key),
                name=f"http1 reconnect {self.flow.record.client}→{upstream.key[0]}",
            )
            return
        self._upstream_unavailable(error)

    def _expects_body(self) -> bool:
        return self.parsed is not None and self.parsed.has_body

    def _upstream_unavailable(self, error: str) -> None:
        self._respond_locally(unavailable_status(error), f"upstream {error}", error)

    def _informational(self, response: h11.InformationalResponse) -> None:
        if response.status_code == 101:
            self._respond_upstream_head(response)
            return
        assert self.request is not None
        if self.request.http_version >= b"1.1":  # RFC 9110 15.2: no 1xx below HTTP/1.1
            self._write_client(self.client.send(response))

    def _response_started(self, response: h11.Response) -> None:
        assert self.record is not None and self.request is not None
        self.record.status = response.status_code
        self._read_grpc_status(response.headers)
        self.response_started = True
        if (
            self.client.their_state is h11.SEND_BODY  # an early answer: see _answered_early
            or self.draining
        ):
            response = _closing(response)  # the connection ends with this answer: say so
        head = self.client.send(_as_http11(response))
        if self.request.http_version == b"1.1" and _self_delimited(response, self.request.method):
            head = response_head(response)
        self._write_client(head)

    def _respond_upstream_head(self, response: h11.InformationalResponse) -> None:
        assert self.record is not None
        self.record.status = response.status_code
        self.response_started = True
        self.client.send(response)
        self._write_client(response_head(response))

    def _response_data(self, data: h11.Data) -> None:
        assert self.record is not None
        self.record.bytes_from_upstream += len(data.data)
        pieces = self.client.send_with_data_passthrough(data)
        if not pieces:
            return
        if self.batch is not None:
            self.batch.extend(pieces)
        else:
            self.transport.writelines(pieces)

    def _read_grpc_status(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        """A call in the gRPC route family takes its status from the response's headers or
        trailers (a chunked body's), whichever says it last, as over h2 and in Linkerd."""
        assert self.record is not None
        if self.record.decision.protocol is RouteProtocol.GRPC:
            status = grpc_status_of(fields)
            if status is not None:
                self.record.grpc_status = status

    def _response_ended(self, end: h11.EndOfMessage) -> None:
        self._read_grpc_status(end.headers)
        if end.headers and self.request is not None and self.request.http_version < b"1.1":
            end = h11.EndOfMessage()  # its body ends at the close: no place for trailers
        self._write_client(self.client.send(end))
        if self.client.their_state is h11.SEND_BODY:
            self._answered_early()
            return
        self._maybe_next_cycle()

    def _answered_early(self) -> None:
        """The upstream answered before the request body was all in (a 401 to an Expect,
        a 413, or an upstream that reads no body where it was told of one: CL.0). The rest
        of the body is not forwarded, since an upstream done with the request may read it
        as requests of its own, which the proxy never decided; that upstream is not kept,
        and the connection ends, the body still coming dropped (the answer said close)."""
        self._finish_exchange()
        self._linger()

    def _write_client(self, data: bytes | None) -> None:
        if not data:
            return
        if self.batch is not None:
            self.batch.append(data)
        else:
            self.transport.write(data)

    def _switch(self, upstream: _Upstream) -> None:
        """The upstream accepted an Upgrade or CONNECT: from now on an opaque splice."""
        if self.client.our_state is not h11.SWITCHED_PROTOCOL:
            self._upstream_broken(upstream, "bad_response")
            return
        self.upstream = None
        self.tunnel, self.record = self.record, None
        self._stop()
        self._flush_batch()
        for idle in self.idle.values():
            _discard(idle)
        self.idle.clear()
        client_rest, client_eof = self.client.trailing_data
        upstream_rest = upstream.h11.trailing_data[0]
        record = self.flow.record  # read already; the relay counts them again, as the tunnel's
        record.bytes_from_client -= len(client_rest)
        record.bytes_from_upstream -= len(upstream_rest)
        upstream_write_paused = bool(self.paused & _PAUSED_BY_UPSTREAM)
        self.paused = 0
        relay = Relay(self.transport, idle_sweep=self.flow.context.idle_sweep, owner=self)
        self.tunnel_relay = relay
        self.closed = True
        relay.adopt(
            upstream.transport,
            upstream_rest,
            client_write_paused=self.client_write_paused,
            upstream_write_paused=upstream_write_paused,
        )
        relay.start(client_rest, client_eof)

    def relayed(self, result: RelayResult) -> None:
        """The tunnel ended: its request is reported now, with the tunnel's bytes, time
        and end (an Upgrade's or CONNECT's exchange is the whole tunnel). Cut by the drain
        timeout (Flow.abort), its end is the flow's "drain": the relay saw only a close."""
        record = self.flow.record
        record.bytes_from_client += result.bytes_from_client
        record.bytes_from_upstream += result.bytes_from_upstream
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.bytes_from_client += result.bytes_from_client
            tunnel.bytes_from_upstream += result.bytes_from_upstream
            tunnel.error = tunnel.error or result.error or record.error
            self._report(tunnel)
        self.flow.finish(result.error)

    # ---- answers of the proxy itself -------------------------------------------------

    def _respond_locally(self, status: int, text: str, error: str) -> None:
        """Answer this request ourselves (403, 400, 502, 504); the client's body is dropped.

        The connection stays usable, except when the client holds its body back for a
        100 Continue it will not get: then it is closed after the answer.
        """
        assert self.record is not None and self.request is not None
        self.forwarding = False
        self.record.answered_by_proxy(status, error)
        if self.client.our_state is not h11.SEND_RESPONSE:
            self._request_failed(error)
            self._cut()
            return
        payload = (text + "\n").encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(payload))]
        close = self.client.they_are_waiting_for_100_continue and self._expects_body()
        if close or self.draining:
            headers.append((b"connection", b"close"))
        reason = HTTPStatus(status).phrase.encode()
        head = h11.Response(status_code=status, headers=headers, reason=reason)
        self._write_client(self.client.send(head))
        if self.request.method != b"HEAD":
            self._write_client(self.client.send(h11.Data(data=payload)))
        self._write_client(self.client.send(h11.EndOfMessage()))
        if close:
            self._finish_exchange()
            self._linger()
            return
        self._maybe_next_cycle()

    def _report(self, record: RequestRecord) -> None:
        self.flow.record.requests += 1
        self.accounting.request_finished(record)

    def _request_failed(self, error: str) -> None:
        record, self.record = self.record, None
        if record is not None:
            record.error = record.error or error
            self._report(record)

    def _client_protocol_error(self, error: h11.RemoteProtocolError) -> None:
        status = error.error_status_hint
        kind = _PROTOCOL_ERRORS.get(status, "bad_request")
        log.info("%s: bad request: %s", self.flow.record.client, error)
        if self.upstream is not None:
            # the body was malformed while it streamed: the upstream request is broken too
            self.upstream.transport.abort()
            self.upstream = None
        if self._answered_whole_locally():  # the rest of a body nothing waits for came short
            self._request_failed("")
            self._linger()
            return
        self._protocol_failure(status, kind)

    def _answered_whole_locally(self) -> bool:
        """The proxy's own answer (403, 502 …) went out whole while the client still sends
        its body: the exchange is over as far as anyone reads it. A client that then stops
        sending (curl and Go's net/http end an upload on a final answer) or resets changes
        neither its outcome nor its error."""
        return (
            self.record is not None
            and not self.forwarding
            and self._client is not None
            and self.client.our_state in (h11.DONE, h11.MUST_CLOSE)
        )

    def _protocol_failure(self, status: int, kind: str) -> None:
        """A request the proxy cannot parse: answer (if it can), record, and close."""
        flow = self.flow
        if self.record is None:
            self.record = RequestRecord.unread(flow.record, "http1")
            if self.head_deadline is not None:  # the head began header_timeout before it
                began = self.head_deadline - self.settings.header_timeout
                self.record.started -= self.loop.time() - began
        can_answer = self.client.our_state in (h11.IDLE, h11.SEND_RESPONSE)
        if can_answer:  # a gRPC call's code too: the one its client gets for that cause
            self.record.answered_by_proxy(status, kind)
        self._request_failed(kind)
        self.error = kind
        if not can_answer:
            self._close_upstreams()
            self._cut()
            return
        self._write_client(error_response(status, HTTPStatus(status).phrase.lower()))
        self._linger()

    def _linger(self) -> None:
        """Close after an answer that leaves request bytes unread (an error answer, an early
        one) without resetting them away.

        The upstreams go now; the flow is finished when the client's socket closes.
        """
        self._stop()
        self._flush_batch()
        self._close_upstreams()
        self.closed = True
        if self.inbox_eof:
            self._close()  # the client sends nothing more: nothing to drop
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.set_protocol(_Linger(self.flow, self.error))


class _Linger(asyncio.Protocol):
    """Drops what the client still sends until it closes or LINGER_SECONDS pass; the
    connection counts as open until then (--max-connections, the open-connections gauge)."""

    def __init__(self, flow: Flow, error: str) -> None:
        self.flow = flow
        self.error = error
        self.transport = transport = flow.transport
        self.timer = flow.context.loop.call_later(LINGER_SECONDS, self._over)
        transport.resume_reading()

    def _over(self) -> None:
        """Closed; cut if the client has not even taken the answer yet (closing would wait
        for it for ever)."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Dropped: the request was already answered."""

    def eof_received(self) -> bool:
        self.timer.cancel()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.flow.finish(self.error)
