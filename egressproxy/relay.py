"""Opaque relay between two transports: backpressure, half-close, idle timeout, reset.

For the tunnels HTTP/1 opens (Upgrade, CONNECT), whose two ends are transports already.
TLS and other opaque connections go through splice.py, whose os.splice costs less per
byte than copies through transports.

A side's EOF reaches the other side as a FIN, its reset as a reset: a stream cut by a
crash must not look complete (a close-delimited response, an aborted upload). The bytes
a side sent before its reset still go first, as far as the proxy has them. A cut by the
proxy itself (the drain timeout) resets both sides for the same reason.

A reset from a side whose EOF came first is passed on all the same, but is no failure of
the connection (its error stays empty): that end had sent everything and closed its
socket, whose kernel refuses what came after. curl and browsers end TLS that way, with
their close_notify and FIN and a close at once, so the server's close_notify meets a
closed socket: counted as a reset, every download they finish would be one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
from dataclasses import dataclass
from typing import Protocol, cast

from egressproxy.timeouts import IdleCounting, IdleSweep

WRITE_BUFFER_HIGH = 256 * 1024
"""Above this many unsent bytes towards one side, reading from the other pauses."""
WRITE_BUFFER_LOW = 64 * 1024
PAUSED_CHECK_SECONDS = 1.0
"""How often a side whose reading is paused is asked for a pending error: paused, its
socket is not polled, and a reset from that peer would go unseen until the idle timeout."""
SENT_CHECK_SECONDS = 0.01
"""First wait before asking again whether a side to be reset has sent what it was given;
doubled each time, up to its RESET_GRACE_SECONDS."""
RESET_GRACE_SECONDS = 2.0
"""How long the bytes sent before a reset have to leave the proxy; then the reset goes
without the rest. A reset, unlike a FIN, waits on no window: a receiver reading nothing
must not hold both connections until the idle timeout."""
RESET_ON_CLOSE = struct.pack("ii", 1, 0)
"""struct linger {l_onoff = 1, l_linger = 0}: close() then sends an RST, not a FIN, and
drops whatever the socket has not sent yet."""
SIOCOUTQNSD = 0x894B
"""linux/sockios.h: the bytes of a socket's send queue not sent yet."""


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes given to the socket that have not left it: a reset now would drop them."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, bytes(4)))[0])


def held_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written to transport that have not left the proxy (its buffer, then its
    socket's send queue): their going out is a slow reader's progress."""
    held = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):  # closed: fileno() is -1
            held += unsent_bytes(sock)
    return held


class WatchedForIdleness(Protocol):
    """An HTTP handler the idle sweep ticks: what it held unsent last time, and when bytes
    last moved."""

    held: int
    last_activity: float


def quiet_for(watched: WatchedForIdleness, held: int, now: float) -> float:
    """How long no byte moved: bytes held unsent that changed since the last tick went out
    to a slow reader, and count as traffic too."""
    if held != watched.held:
        watched.held, watched.last_activity = held, now
    return now - watched.last_activity


def close_with_reset(sock: socket.socket) -> None:
    """Close with an RST: a peer whose stream was cut must not take it for complete."""
    with contextlib.suppress(OSError):  # not connected yet: nothing to reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
    sock.close()


def abort_with_reset(transport: asyncio.Transport) -> None:
    """Close with an RST: abort() alone only skips the write buffer and sends a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
    transport.abort()


@dataclass(frozen=True)
class RelayResult:
    bytes_from_client: int
    bytes_from_upstream: int
    error: str
    """"" for a clean close; else a short word (reset, idle_timeout, drain)."""


class _Side(asyncio.Protocol):
    """One end of the splice; writes what it reads to its peer's transport."""

    __slots__ = (
        "eof",
        "lost",
        "paused_check",
        "peer",
        "received",
        "relay",
        "reset",
        "sent_check",
        "transport",
        "write_paused",
    )

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.paused_check: asyncio.TimerHandle | None = None
        self.sent_check: asyncio.TimerHandle | None = None
        """Set while this side waits to send what it was given before its reset."""
        self.transport: asyncio.Transport
        self.peer: _Side
        self.received = 0
        self.eof = False
        self.lost = False
        self.reset = False
        """The far end reset this connection (or it failed): the other side is reset in
        turn."""
        self.write_paused = False
        """Past its transport's high-water mark: its peer is not read until it drains."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.half_closed()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self.peer.transport.pause_reading()
        self.relay.watch_paused(self.peer)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.peer.transport.resume_reading()
        self.relay.unwatch_paused(self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)


class RelayOwner(Protocol):
    """Whom a relay reports to when both sides are done."""

    def relayed(self, result: RelayResult) -> None: ...


class Relay(IdleCounting):
    """Splices client and upstream until both are done, then reports once (to its owner,
    not to a bound method: one object less for each of thousands of idle connections)."""

    __slots__ = (
        "_error",
        "_idle_sweep",
        "_owner",
        "_reported",
        "client",
        "upstream",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        *,
        idle_sweep: IdleSweep,
        owner: RelayOwner,
    ) -> None:
        """Prepare both sides; `upstream` is the protocol to connect the upstream with.

        Bytes the upstream sends before start() (a server-speaks-first banner)
        already go to the client.
        """
        super().__init__()
        self._owner = owner
        self._error = ""
        self._reported = False
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.client.transport = client
        self._idle_sweep = idle_sweep

    def adopt(
        self,
        upstream: asyncio.Transport,
        to_client: bytes,
        *,
        client_write_paused: bool,
        upstream_write_paused: bool,
    ) -> None:
        """Splice an upstream that is already connected (an Upgrade or CONNECT it accepted).

        to_client: bytes the upstream sent after its answer that are already read.
        The paused flags: which transport's protocol was told to pause writing and not yet
        to resume. A transport tells only once, and its resume comes to this relay's
        side, so the side starts paused. Call start() next.
        """
        self.upstream.transport = upstream
        self.client.write_paused = client_write_paused
        self.upstream.write_paused = upstream_write_paused
        upstream.set_protocol(self.upstream)
        self.client.transport.set_protocol(self.client)
        if to_client:
            self.upstream.received += len(to_client)
            self.client.transport.write(to_client)

    def start(self, first_bytes: bytes, client_eof: bool) -> None:
        """Take over the client once the upstream is connected, sending what was sniffed;
        then read each side whose peer takes more (the writes here may have paused it)."""
        client, upstream = self.client.transport, self.upstream.transport
        client.set_protocol(self.client)
        for transport in (client, upstream):
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        if first_bytes:
            self.client.received += len(first_bytes)
            upstream.write(first_bytes)
        self._idle_sweep.add(self)
        if client_eof:
            self.client.eof = True
            self.half_closed()
        for side in (self.client, self.upstream):
            if side.peer.write_paused:
                side.transport.pause_reading()
                self.watch_paused(side)
            else:
                side.transport.resume_reading()

    def half_closed(self) -> None:
        """Pass an EOF on; when both directions are finished, close."""
        for side in (self.client, self.upstream):
            peer = side.peer.transport
            if side.eof and not peer.is_closing() and peer.can_write_eof():
                peer.write_eof()
        if self.client.eof and self.upstream.eof:
            self.close()

    def close(self, error: str = "") -> None:
        """Close both sides gracefully (pending bytes are flushed first)."""
        if error and not self._error:
            self._error = error
        self.client.transport.close()
        self.upstream.transport.close()

    def abort(self, error: str) -> None:
        """Cut both sides at once. One whose peer was reset is reset too, and so is one
        that would lose bytes held for it: its buffer, or its send queue before its
        peer's FIN (a FIN after them would make a cut stream look complete)."""
        if not self._error:
            self._error = error
        for side in (self.client, self.upstream):
            if side.lost:
                continue
            transport = side.transport
            if (
                side.peer.reset
                or transport.get_write_buffer_size()
                or (not side.peer.eof and held_bytes(transport))
            ):
                abort_with_reset(transport)
            else:
                transport.abort()

    def cut(self, error: str) -> None:
        """Reset both sides at once: the proxy ends the stream (the drain timeout), and a
        FIN would let either end take the cut for its peer's end."""
        if not self._error:
            self._error = error
        for side in (self.client, self.upstream):
            if not side.lost:
                abort_with_reset(side.transport)

    def watch_paused(self, side: _Side) -> None:
        if side.paused_check is None:
            side.paused_check = self._idle_sweep.loop.call_later(
                PAUSED_CHECK_SECONDS, self._check_paused, side
            )

    def unwatch_paused(self, side: _Side) -> None:
        if side.paused_check is not None:
            side.paused_check.cancel()
            side.paused_check = None

    def _check_paused(self, side: _Side) -> None:
        side.paused_check = None
        sock = side.transport.get_extra_info("socket")
        if sock is None or side.lost:
            return
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            # Read past its error (taken by the check) the socket would end with an EOF;
            # what it holds unread is dropped with it, its peer being backed up anyway.
            side.reset = True
            side.transport.abort()
            return
        self.watch_paused(side)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None or side.reset:
            side.reset = True
            if not self._error and not side.eof:  # see the module's docstring
                self._error = "reset"
            deadline = self._idle_sweep.loop.time() + RESET_GRACE_SECONDS
            self._reset_when_sent(side.peer, SENT_CHECK_SECONDS, deadline)
        else:
            side.peer.transport.close()
        if self.client.lost and self.upstream.lost:
            for each in (self.client, self.upstream):
                self.unwatch_paused(each)
                if each.sent_check is not None:
                    each.sent_check.cancel()
            self._idle_sweep.discard(self)
            if not self._reported:
                self._reported = True
                self._owner.relayed(
                    RelayResult(self.client.received, self.upstream.received, self._error)
                )

    def _reset_when_sent(self, side: _Side, delay: float, deadline: float) -> None:
        """Reset side once the bytes it was given have left the proxy (a reset drops what
        is not sent yet) or at the deadline, asking again after `delay`, doubled each
        time. Not read meanwhile: what it sends has nowhere to go."""
        side.sent_check = None
        if side.lost:
            return
        transport = side.transport
        transport.pause_reading()
        loop = self._idle_sweep.loop
        now = loop.time()
        if now < deadline and held_bytes(transport):
            delay = min(delay, deadline - now)
            side.sent_check = loop.call_later(
                delay, self._reset_when_sent, side, 2 * delay, deadline
            )
            return
        abort_with_reset(transport)

    def tick(self) -> None:
        """A quarter of the idle timeout has passed: close when no byte moved in four,
        read or sent (a slow reader taking what the proxy holds for it is no idle one)."""
        received = self.client.received + self.upstream.received
        held = sum(held_bytes(side.transport) for side in (self.client, self.upstream))
        if self.idle_for_the_timeout(2 * received - held):
            self._idle_sweep.discard(self)
            self.abort("idle_timeout")
