"""One client connection: original destination → sniff → decide → hand to the actor.

The only module that reads a client before a protocol handler takes over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from egressproxy import http1, http1_lean, http2, upstream
from egressproxy.errors import (
    FORBIDDEN,
    NO_FILE_DESCRIPTORS,
    PROXY_ERROR,
    UpstreamError,
    log_proxy_error,
)
from egressproxy.netfilter import (
    is_local_address,
    local_destination,
    original_destination,
    plain_host,
)
from egressproxy.policy.decision import (
    Action,
    ConnectionFacts,
    Decision,
    Destination,
    Detected,
    RouteProtocol,
)
from egressproxy.policy.store import PolicyStore, Snapshot
from egressproxy.records import Accounting, FlowRecord
from egressproxy.relay import WRITE_BUFFER_HIGH, RelayResult, abort_with_reset, close_with_reset
from egressproxy.settings import EchPolicy, Settings, VerifyDestination, host_port
from egressproxy.sniff import (
    NEED_MORE,
    SNIFF_BUFFER_LIMIT,
    H2Preface,
    HttpRequestHead,
    Opaque,
    Sniffed,
    TlsHello,
)
from egressproxy.sniff.detect import Sniffer, sniff
from egressproxy.sniff.http import authority_host, could_begin_request
from egressproxy.sniff.tls import BEFORE_A_HELLO, FIRST_RECORD_TYPES
from egressproxy.splice import MAX_PIPES, SplicedRelay, Splicer
from egressproxy.timeouts import IdleSweep, PendingTimeout, TimeoutQueue
from egressproxy.verify import REFUSALS, Resolver, verification_mode

log = logging.getLogger("egressproxy.flow")


class OpenFlows:
    """The open connections of a worker; tells the acceptor when it is full and when not."""

    def __init__(self, limit: int, on_full: Callable[[], None], on_room: Callable[[], None]):
        self.limit = limit
        self.flows: set[Flow] = set()
        self.extra = 0
        """Upstream connections past a connection's first (an h2 connection's, which
        multiplexes streams to several), each counted as a connection: the limit is what
        the descriptors allow, two a connection."""
        self.full = False
        self._on_full = on_full
        self._on_room = on_room

    def __len__(self) -> int:
        return len(self.flows)

    def __contains__(self, flow: Flow) -> bool:
        return flow in self.flows

    def add(self, flow: Flow) -> None:
        self.flows.add(flow)
        self._check()

    def discard(self, flow: Flow) -> None:
        self.flows.discard(flow)
        self._check()

    def take_extra(self) -> bool:
        """Room for one more upstream connection of an open one; False when full."""
        if self.full:
            return False
        self.extra += 1
        self._check()
        return True

    def give_back_extra(self) -> None:
        self.extra -= 1
        self._check()

    def _check(self) -> None:
        full = len(self.flows) + self.extra >= self.limit
        if full != self.full:
            self.full = full
            (self._on_full if full else self._on_room)()


@dataclass
class FlowContext:
    """What every connection of a worker shares."""

    settings: Settings
    policy: PolicyStore
    open_flows: OpenFlows
    accounting: Accounting
    max_pipes: int = MAX_PIPES
    """Pipes the worker's splices may hold (server.descriptor_budget)."""
    draining: bool = False
    """Set on SIGTERM: keep-alive connections close after the request in flight."""
    resolver: Resolver = field(default_factory=Resolver)
    listener_ports: frozenset[int] = field(init=False)
    loop: asyncio.AbstractEventLoop = field(init=False)
    """The worker's loop, made once: asyncio.get_running_loop() costs a getpid() each time."""
    idle_sweep: IdleSweep = field(init=False)
    sniff_timeouts: TimeoutQueue = field(init=False)
    """--sniff-timeout from the accept: no byte yet."""
    hello_timeouts: TimeoutQueue = field(init=False)
    """Settings.sniff_complete_timeout (10 s) from the first byte: the rest of a hello."""
    head_timeouts: TimeoutQueue = field(init=False)
    """From the first byte of what looks like a request head: --header-timeout if shorter."""
    connect_timeouts: TimeoutQueue = field(init=False)
    splicer: Splicer = field(init=False)
    watch_loops: bool = field(init=False)
    """Only root without --mark remembers its upstream connections to catch a loop."""

    def __post_init__(self) -> None:
        self.listener_ports = frozenset(endpoint.port for endpoint in self.settings.listen)
        self.loop = asyncio.get_running_loop()
        settings = self.settings
        self.idle_sweep = IdleSweep(self.loop, settings.idle_timeout)
        self.sniff_timeouts = TimeoutQueue(self.loop, settings.sniff_timeout)
        self.hello_timeouts = TimeoutQueue(self.loop, settings.sniff_complete_timeout)
        self.head_timeouts = TimeoutQueue(
            self.loop, min(settings.sniff_complete_timeout, settings.header_timeout)
        )
        self.connect_timeouts = TimeoutQueue(self.loop, settings.connect_timeout)
        self.splicer = Splicer(self.loop, self.max_pipes)
        self.watch_loops = upstream.RUNNING_AS_ROOT and self.settings.mark is None


OPAQUE_REASONS = frozenset(
    {"timeout", "incomplete", "eof", "opaque_port", "unknown_protocol", "not_http", "not_tls"}
)
"""Sniff outcomes that mean "not HTTP or TLS at all"; any other reason the parsers give
means an HTTP head or ClientHello that is malformed or too large to read."""
HEADER_TIMEOUT = "header_timeout"
"""The sniff outcome of a request head still incomplete at --header-timeout."""
HEAD_CUT_BY_EOF = "eof_in_head"
"""The sniff outcome of a request head the client ended (EOF) before it was whole: HTTP's
to refuse with 400, like one the header timeout ends with 408. Relayed as opaque bytes it
would slip past the HTTP rules, and some servers act on a head that ends at EOF."""


def _denied(decision: Decision, why: str, audit: bool) -> Decision:
    """The hello's decision, on the same route, made a denial (--ech deny, an evasive
    hello). In an audited network, or anywhere under --audit (audit: traffic no network
    covers has no network to be audited by), it passes as would_deny, to where the
    original decision sends it."""
    if decision.action is Action.DENY:
        return decision
    return dataclasses.replace(
        decision,
        action=Action.DENY,
        audit=decision.audit or audit,
        reason=f"{why}; else {decision.reason}",
    )


def _classify(sniffed: Sniffed, first_bytes: bytes) -> tuple[Detected, str | None, str]:
    """Detected protocol, hostname (one trailing dot dropped) and sniff outcome word.

    A malformed or oversized head still counts as its protocol, with no hostname: relayed
    as opaque bytes it would slip past host rules (a second Host, userinfo in the target),
    and the HTTP handler answers it 400 or 431 as it should.
    """
    if isinstance(sniffed, TlsHello):
        return Detected.TLS, _without_root_dot(sniffed.sni), "tls"
    if isinstance(sniffed, HttpRequestHead):
        return Detected.HTTP1, _without_root_dot(sniffed.host), "http1"
    if isinstance(sniffed, H2Preface):
        return Detected.H2, None, "h2"
    if sniffed.reason in OPAQUE_REASONS:
        return Detected.OPAQUE, None, sniffed.reason
    if first_bytes and first_bytes[0] in FIRST_RECORD_TYPES:
        return Detected.TLS, None, sniffed.reason  # a hello the sniffer cannot read
    return Detected.HTTP1, None, sniffed.reason


def lean_head(buffer: bytes, limit: int) -> tuple[http1_lean.LeanRequest, str] | None:
    """A request head the HTTP handler's lean path reads (tidy HTTP/1.1, origin form) and
    the hostname of its Host: what sniff and _classify would find for it (the property
    test in tests/unit/test_flow_classify.py holds them to it), read once for both the
    connection's decision and the handler's first request instead of by each.

    limit is the handler's (--max-header-bytes); a head past the sniffer's own smaller
    one is left to the sniffer, which calls it too large whether it came whole or not."""
    if not buffer[:1].isupper():
        return None
    request = http1_lean.parse_request(buffer, min(limit, SNIFF_BUFFER_LIMIT))
    if not isinstance(request, http1_lean.LeanRequest) or not request.target.startswith(b"/"):
        return None
    hostname = authority_host(request.host)
    if hostname is None:
        return None
    return request, sys.intern(hostname)


def head_end_came(buffer: bytes, new: int) -> bool:
    """Whether the last `new` bytes of buffer end a head (CRLF CRLF), the only reads after
    the first where lean_head may find one: none is whole before, and one that came earlier
    it found no lean head in then (nor would now). Tried at every read with a line end, a
    head of short lines that came a few bytes at a time was read whole again at each line."""
    return buffer.find(b"\r\n\r\n", max(0, len(buffer) - new - 3)) >= 0


def _without_root_dot(hostname: str | None) -> str | None:
    """`example.com.` is `example.com`: a rule must not be sidestepped by the root label.

    Interned: the record of every connection keeps its hostname until it closes, and
    thousands of idle connections to one host then share one string.
    """
    if not hostname:
        return hostname
    if hostname.endswith("."):
        hostname = hostname[:-1]
        if not hostname:
            return None
    return sys.intern(hostname)


class Flow(asyncio.Protocol):
    """Owns the client transport until a relay or HTTP handler takes it over."""

    __slots__ = (
        "buffer",
        "client_eof",
        "client_gone",
        "context",
        "first_byte_at",
        "handler",
        "peer",
        "record",
        "relay",
        "snapshot",
        "sniff_timer",
        "sniffer",
        "sniffing",
        "task",
        "transport",
    )

    def __init__(self, context: FlowContext) -> None:
        self.context = context
        self.transport: asyncio.Transport
        self.buffer = b""
        self.sniffing = True
        self.sniffer: Sniffer | None = None
        """Once two reads found the bytes incomplete: sniffs them as more come, each read
        only as far as the answer could change with it."""
        self.client_eof = False
        self.client_gone = False
        self.sniff_timer: PendingTimeout | None = None
        self.task: asyncio.Task[None] | None = None
        self.peer: tuple[str, int] | None = None
        """The client's address, kept only where upstream.is_own_connection can say yes."""
        self.first_byte_at: float | None = None
        """Loop time of the client's first byte: a request head's deadline counts from it."""
        self.handler: http1.Http1Proxy | http2.H2Proxy | None = None
        """The per-request handler, once an HTTP connection is handed over."""
        self.relay: SplicedRelay | None = None
        """The splice, once a TLS or opaque connection is handed over."""
        self.record = FlowRecord(client="")
        self.snapshot: Snapshot | None = None
        """The policy in force when the connection opened, until it is decided by it: kept
        no longer, so that no open connection holds a policy a reload has replaced."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.context.open_flows.add(self)
        self.context.accounting.connection_opened()
        peer = transport.get_extra_info("peername")
        if self.context.watch_loops:
            self.peer = peer
        if peer:  # written as the access line's other addresses are: [IPv6]:PORT
            self.record.client = host_port(plain_host(peer[0]), peer[1])
        else:
            self.record.client = "?"
        try:
            destination = original_destination(
                transport.get_extra_info("socket"), peer[0] if peer else ""
            )
        except OSError as error:
            log.warning("no original destination for %s: %s", self.record.client, error)
            self._refuse("original_dst_failed")
            return
        self.record.destination = destination
        if self._is_own_listener(destination):
            log.warning("%s connected to the proxy itself, not redirected", self.record.client)
            self._refuse("loop")
            return
        self.snapshot = snapshot = self.context.policy.current
        index = snapshot.index
        if destination.port in index.unsniffed_ports and index.never_sniffed(destination):
            self._decide(Opaque("opaque_port"))
            return
        self.sniff_timer = self.context.sniff_timeouts.start(self._sniff_timed_out, "timeout")

    def _is_own_listener(self, destination: Destination) -> bool:
        """A connection meant for the proxy's own port (no redirect, or a loop through it)."""
        if destination.port not in self.context.listener_ports:
            return False
        sockname = self.transport.get_extra_info("sockname")
        return destination == local_destination(sockname) or is_local_address(destination.ip)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.sniffing:  # decided, verifying or connecting: kept for the upstream
            if len(self.buffer) > WRITE_BUFFER_HIGH:
                self.transport.pause_reading()
            return
        sniffer = self.sniffer
        if data.find(b"\n") >= 0 and (sniffer is None or head_end_came(self.buffer, len(data))):
            lean = lean_head(self.buffer, self.context.settings.max_header_bytes)
            if lean is not None:
                self._decide_as(Detected.HTTP1, lean[1], "http1", ech=False, first_request=lean)
                return
        if sniffer is not None:
            result = sniffer.sniff(self.buffer)
        else:
            result = sniff(self.buffer)
            if result is NEED_MORE:
                if len(self.buffer) == len(data):
                    self._restart_sniff_timer()
                else:  # a head or hello in three reads or more: sniffed as they come
                    self.sniffer = Sniffer(self.buffer)
        if result is not NEED_MORE:
            self._decide(result)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.sniffing:
            self._decide(Opaque(HEAD_CUT_BY_EOF if could_begin_request(self.buffer) else "eof"))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_gone = True
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
        if self.task is None:
            self.finish(self.record.error or ("reset" if exc else ""))
        elif not self.task.done():  # gone while verifying or connecting: waiting is for no one
            self.record.error = self.record.error or "reset"
            self.task.cancel()

    def _restart_sniff_timer(self) -> None:
        """The first bytes came: the hello or request head now has its own, longer deadline.

        A request head gets --header-timeout (when shorter), and running out of it is
        HTTP's own failure: the HTTP handler answers 408 rather than the bytes going
        through as opaque TCP past the host rules.
        """
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
        context = self.context
        self.first_byte_at = context.loop.time()
        if could_begin_request(self.buffer):
            self.sniff_timer = context.head_timeouts.start(self._sniff_timed_out, HEADER_TIMEOUT)
        else:
            self.sniff_timer = context.hello_timeouts.start(self._sniff_timed_out, "incomplete")

    def _sniff_timed_out(self, reason: str) -> None:
        if self.sniffing:
            self._decide(Opaque(reason))

    def _looped(self) -> bool:
        """The client is this proxy's own upstream connection, redirected back to it.

        Asked once bytes came (the hop before wrote them after it connected, so it is
        known by then) and again before connecting.
        """
        destination = self.record.destination
        if not self.peer or destination is None:
            return False
        if not upstream.is_own_connection(self.peer, destination):
            return False
        log.warning(
            "%s is the proxy's own upstream connection: a redirect loop", self.record.client
        )
        self._refuse("loop")
        return True

    def _decide(self, sniffed: Sniffed) -> None:
        detected, hostname, outcome = _classify(sniffed, self.buffer)
        self._decide_as(detected, hostname, outcome, isinstance(sniffed, TlsHello) and sniffed.ech)

    def _decide_as(
        self,
        detected: Detected,
        hostname: str | None,
        outcome: str,
        ech: bool,
        first_request: tuple[http1_lean.LeanRequest, str] | None = None,
    ) -> None:
        """Decide the connection and hand it on; first_request: lean_head's reading of the
        client's first request, for the HTTP handler not to parse it again."""
        self.sniffing = False
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        if self._looped():
            return
        assert self.record.destination is not None
        self.record.detected, self.record.hostname = detected, hostname
        self.record.sniff_outcome = outcome
        self.record.ech = ech
        facts = ConnectionFacts(self.record.destination, detected, hostname)
        snapshot, self.snapshot = self.snapshot, None
        assert snapshot is not None
        decision = snapshot.index.decide_connection(facts)
        settings = self.context.settings
        ech_denied = self.record.ech and settings.ech is EchPolicy.DENY
        self.record.decision = decision
        if ech_denied:
            self.record.decision = _denied(
                decision, "Encrypted Client Hello denied (--ech deny)", settings.audit
            )
        elif detected is Detected.TLS and outcome != "tls" and outcome not in BEFORE_A_HELLO:
            # A hello the sniffer cannot read (split into too many records, over 16 KiB,
            # an SNI that is no host name, malformed): a server may read a name in it all
            # the same (OpenSSL takes all of these), and as TLS without a name it would
            # pass every host rule of an allowing policy. No client sends one but to hide
            # its SNI: denied whatever the policy says of its address.
            self.record.decision = _denied(
                decision, f"ClientHello the proxy cannot read ({outcome})", settings.audit
            )
            outcome_word = "would deny (audit)" if self.record.decision.audit else "denied"
            log.info(
                "%s: ClientHello unreadable (%s), %s", self.record.client, outcome, outcome_word
            )
        self.context.accounting.connection_decided(self.record)
        if decision.protocol in (RouteProtocol.HTTP, RouteProtocol.GRPC):
            if detected is Detected.HTTP1:
                self.handler = http1.Http1Proxy(self)
                self.handler.start(first_request)
                return
            if detected is Detected.H2:
                self.handler = http2.H2Proxy(self)
                self.handler.start()
                return
        recorded = self.record.decision
        if recorded.action is Action.DENY and not recorded.audit:
            if ech_denied:
                log.info("%s: Encrypted Client Hello denied (--ech deny)", self.record.client)
            self._deny(detected)
            return
        host, port = upstream.address_for(decision, self.record.destination)
        self.task = self.context.loop.create_task(
            self._connect(host, port, detected), name=f"connect {self.record.client}→{host}:{port}"
        )

    def _deny(self, detected: Detected) -> None:
        """A denied TLS or opaque connection is closed before anything goes upstream
        (error="forbidden" on its TLS or TCP route). An HTTP/1 client that landed on such
        a route, plain HTTP on a port of TLSRoutes say, is told why with a 403 first."""
        if detected is Detected.HTTP1:
            self._answer(403, "traffic not allowed")
        self.record.error = FORBIDDEN
        self.transport.close()

    def _answer(self, status: int, body: str) -> None:
        """The proxy's own answer to an HTTP/1 client on a connection decided whole, kept
        in the record: the connection's access line is the only one to show it."""
        self.record.status = status
        self.transport.write(http1.error_response(status, body))

    async def _destination_verified(self, detected: Detected) -> bool:
        """False when --verify-destination enforce found the name pointing elsewhere, or
        got no answer from the resolver (the connection is then closed, as that error).
        log never waits for the answer."""
        record, context = self.record, self.context
        assert record.decision is not None and record.destination is not None
        mode = verification_mode(
            record.decision, record.hostname, context.settings.verify_destination
        )
        if mode is VerifyDestination.OFF or record.hostname is None:
            return True
        resolver, accounting = context.resolver, context.accounting
        if mode is VerifyDestination.LOG:
            resolver.observe(record.hostname, record.destination, record.client, accounting)
            return True
        error = await resolver.check(record.hostname, record.destination, record.client, accounting)
        if not error:
            return True
        record.error = error
        if detected is Detected.HTTP1 and not self.client_gone:
            self._answer(421, REFUSALS[error])
        self.transport.close()
        self.finish(record.error)
        return False

    async def _connect(self, host: str, port: int, detected: Detected) -> None:
        """Verify, connect and splice. The flow is finished however this ends: cancelled
        too (the client's reset, the drain timeout's abort, or the worker's loop closing).

        The client is still read meanwhile, so that a reset is seen; its bytes wait in the
        buffer (reading pauses past WRITE_BUFFER_HIGH) and go first to the upstream.
        """
        try:
            await self._verify_connect_and_splice(host, port, detected)
        except asyncio.CancelledError:
            self.transport.abort()
            self.finish("drain")
            raise
        except Exception as error:
            log_proxy_error(log, f"{self.record.client} → {host}:{port}", error)
            if self.relay is not None:
                self.relay.cut(PROXY_ERROR)
            self.transport.abort()
            self.finish(PROXY_ERROR)

    async def _verify_connect_and_splice(self, host: str, port: int, detected: Detected) -> None:
        if self._looped():
            self.finish("loop")  # the client's connection_lost leaves finishing to this task
            return
        if not await self._destination_verified(detected):
            return
        try:
            upstream_socket = await upstream.open_socket(
                host,
                port,
                timeouts=self.context.connect_timeouts,
                mark=self.context.settings.mark,
                connector=self.context.splicer.connect,
                lookups=self.context.resolver.threads,
            )
        except UpstreamError as error:
            log.info("%s → %s:%s: %s", self.record.client, host, port, error)
            self.context.accounting.upstream_failed(error.kind)
            self.record.error = error.kind
            if detected is Detected.HTTP1 and not self.client_gone:
                self._answer(http1.unavailable_status(error.kind), error.kind)
            elif error.kind == "reset" and not self.client_gone:
                # Made, then reset before the loop saw it made: passed on as a reset, as the
                # relay passes one on (a FIN would make the empty stream look complete).
                abort_with_reset(self.transport)
            self.transport.close()
            self.finish(error.kind)
            return
        if self.client_gone or self.transport.is_closing():
            # is_closing: the loop read the client's reset, and tells the protocol only
            # later (connection_lost): spliced, the reset would reach the upstream as a FIN.
            close_with_reset(upstream_socket)
            self.finish("reset")
            return
        try:
            client_socket = self._take_socket()
        except OSError as error:
            log.warning("%s: cannot take over the connection: %s", self.record.client, error)
            close_with_reset(upstream_socket)
            self.transport.abort()
            self.context.accounting.upstream_failed(NO_FILE_DESCRIPTORS)
            self.finish(NO_FILE_DESCRIPTORS)
            return
        context = self.context
        self.relay = SplicedRelay(
            client_socket,
            upstream_socket,
            splicer=context.splicer,
            idle_sweep=context.idle_sweep,
            owner=self,
        )
        self.relay.start(self.buffer, self.client_eof)
        self.buffer = b""
        self.task = self.first_byte_at = None

    def _take_socket(self) -> socket.socket:
        """The client's socket out of uvloop's hands, for the splice: a duplicate of its
        descriptor, then the transport closed with no protocol left to tell.

        Closed from a task (never inside the loop's poll), libuv takes the descriptor out
        of its epoll set at once, before closing it, so the duplicate is not polled twice.
        """
        sock = self.transport.get_extra_info("socket")
        duplicate = os.dup(sock.fileno())
        taken = socket.socket(sock.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, duplicate)
        taken.setblocking(False)
        self.transport.set_protocol(_HandedOver())
        self.transport.abort()
        return taken

    def relayed(self, result: RelayResult) -> None:
        self.record.bytes_from_client = result.bytes_from_client
        self.record.bytes_from_upstream = result.bytes_from_upstream
        self.finish(result.error)

    def _refuse(self, error: str) -> None:
        self.sniffing = False
        self.record.error = error
        self.transport.abort()

    def finish(self, error: str) -> None:
        if self not in self.context.open_flows:
            return
        self.context.open_flows.discard(self)
        self.record.error = self.record.error or error
        self.context.accounting.connection_closed(self.record)

    def drain(self) -> None:
        """The server stops: HTTP connections close after their exchanges in flight.

        Spliced connections have no request boundary; they run until they end or
        the drain timeout cuts them.
        """
        if self.handler is not None:
            self.handler.drain()

    def abort(self) -> None:
        """Drain ran out of time: cut the connection, resetting what is spliced and any
        HTTP/1 exchange in flight, so that no end takes the cut for a complete stream."""
        self.record.error = self.record.error or "drain"
        if self.relay is not None:
            self.relay.cut("drain")
        elif self.handler is not None:
            self.handler.cut()
        else:
            self.transport.abort()
            if self.task is not None:  # still verifying or connecting
                self.task.cancel()


class _HandedOver(asyncio.Protocol):
    """The protocol of a client transport whose socket went to a spliced relay."""
