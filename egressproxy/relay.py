"""Opaque relay between two transports: backpressure, half-close, idle timeout, reset.

For the tunnels HTTP/1 opens (Upgrade, CONNECT), whose two ends are transports already.
TLS and other opaque connections go through splice.py, whose os.splice costs less per
byte than copies through transports.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Protocol, cast

from egressproxy.timeouts import IdleCounting, IdleSweep

WRITE_BUFFER_HIGH = 256 * 1024
"""Above this many unsent bytes towards one side, reading from the other pauses."""
WRITE_BUFFER_LOW = 64 * 1024
PAUSED_CHECK_SECONDS = 1.0
"""How often a side whose reading is paused is asked for a pending error: paused, its
socket is not polled, and a reset from that peer would go unseen until the idle timeout."""


@dataclass(frozen=True)
class RelayResult:
    bytes_from_client: int
    bytes_from_upstream: int
    error: str
    """"" for a clean close; else a short word (reset, idle_timeout, drain)."""


class _Side(asyncio.Protocol):
    """One end of the splice; writes what it reads to its peer's transport."""

    __slots__ = ("eof", "lost", "paused_check", "peer", "received", "relay", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.paused_check: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport
        self.peer: _Side
        self.received = 0
        self.eof = False
        self.lost = False

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
        self.peer.transport.pause_reading()
        self.relay.watch_paused(self.peer)

    def resume_writing(self) -> None:
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

    def adopt(self, upstream: asyncio.Transport, to_client: bytes) -> None:
        """Splice an upstream that is already connected (an Upgrade or CONNECT it accepted).

        to_client: bytes the upstream sent after its answer that are already read.
        Call start() next.
        """
        self.upstream.transport = upstream
        upstream.set_protocol(self.upstream)
        upstream.resume_reading()
        if to_client:
            self.upstream.received += len(to_client)
            self.client.transport.write(to_client)

    def start(self, first_bytes: bytes, client_eof: bool) -> None:
        """Take over the client once the upstream is connected, sending what was sniffed."""
        client, upstream = self.client.transport, self.upstream.transport
        for transport in (client, upstream):
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        client.set_protocol(self.client)
        if first_bytes:
            self.client.received += len(first_bytes)
            upstream.write(first_bytes)
        self._idle_sweep.add(self)
        if client_eof:
            self.client.eof = True
            self.half_closed()
        client.resume_reading()

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
        if not self._error:
            self._error = error
        self.client.transport.abort()
        self.upstream.transport.abort()

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
            self.abort("reset")
            return
        self.watch_paused(side)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None:
            self.abort("reset")
        else:
            side.peer.transport.close()
        if self.client.lost and self.upstream.lost:
            self.unwatch_paused(self.client)
            self.unwatch_paused(self.upstream)
            self._idle_sweep.discard(self)
            if not self._reported:
                self._reported = True
                self._owner.relayed(
                    RelayResult(self.client.received, self.upstream.received, self._error)
                )

    def tick(self) -> None:
        """A quarter of the idle timeout has passed: close when no byte moved in four."""
        if self.idle_for_the_timeout(self.client.received + self.upstream.received):
            self._idle_sweep.discard(self)
            self.abort("idle_timeout")
