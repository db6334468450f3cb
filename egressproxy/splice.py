"""Opaque relay by os.splice: bytes go socket → pipe → socket without entering Python.

Measured in the benchmark world, a relay that splices costs a sixth to a third less
CPU per byte than one that copies through uvloop's transports (the floor-splice and
floor-uvloop rows; docs/performance.md). A direction borrows a pipe from its worker's
pool only while it has bytes in flight, so an idle connection holds its two sockets
and nothing else; without a pipe to be had (the budget spent, or no descriptor left) a
direction copies through Python instead.

The spliced sockets of a worker are in one epoll set of their own, which the loop
watches as one descriptor. uvloop polls a descriptor given to add_reader through
libuv, which treats EPOLLERR as a fatal error of the poll handle (a peer's reset can
silence a reader that way); in our own set EPOLLERR is an event like any other, and
the relay reads the reset from the socket.

A side's EOF reaches the other side as a FIN, its reset as a reset (a stream cut by a
crash must not look complete). What the reset side sent before is read to its end and
passed on first, and the other socket is reset only once its send queue has sent it:
TCP_NOTSENT_LOWAT 1 makes epoll report room only then (a zero-linger close would drop it).
A cut by the proxy itself (the drain timeout) resets both sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
import sys

from egressproxy.relay import (
    RESET_GRACE_SECONDS,
    RESET_ON_CLOSE,
    RelayOwner,
    RelayResult,
    unsent_bytes,
)
from egressproxy.timeouts import IdleCounting, IdleSweep

PIPE_SIZE = 1 << 20
"""/proc/sys/fs/pipe-max-size by default: the largest pipe an unprivileged process may
ask for. Past the user's pipe-user-pages-soft, pipes keep the kernel's default size."""
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
MAX_PIPES = 256
"""Pipes a worker holds at most, lent and pooled (past them, directions copy): their
descriptors are kept out of the connections' share of the open-file limit."""
MAX_POOLED_PIPES = 64
"""Empty pipes kept for the next burst; the rest are closed when given back."""
COPY_CHUNK = 256 * 1024
"""What a direction without a pipe reads at once (uvloop's transports read as much)."""
MAX_EVENTS = 512
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
SIOCATMARK = 0x8905
"""ioctl(2), linux/sockios.h: whether a socket's next byte is TCP's urgent byte."""


class Pipes:
    """Empty pipes to lend to a direction while it has bytes in flight; kept while the
    worker has spliced connections, so a quiet worker holds no descriptor for them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.idle: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int] | None:
        """A pipe (read end, write end), or None past the limit or the descriptors."""
        if self.idle:
            return self.idle.pop()
        if self.open >= self.limit:
            return None
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if error.errno in NO_DESCRIPTORS:
                return None
            raise
        self.open += 1
        with contextlib.suppress(OSError):  # past the user's pipe pages: the default size
            fcntl.fcntl(pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        return pipe

    def give(self, pipe: tuple[int, int], *, empty: bool = True) -> None:
        if empty and len(self.idle) < MAX_POOLED_PIPES:
            self.idle.append(pipe)
            return
        self.open -= 1
        for end in pipe:
            os.close(end)

    def close(self) -> None:
        while self.idle:
            self.give(self.idle.pop(), empty=False)


class Splicer:
    """A worker's spliced sockets: one epoll set, watched by the loop as one descriptor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_pipes: int = MAX_PIPES) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.sides: dict[int, _Side] = {}
        self.connecting: dict[int, asyncio.Future[None]] = {}
        self.pipes = Pipes(max_pipes)
        loop.add_reader(self.epoll.fileno(), self._ready)

    def _ready(self) -> None:
        for fd, events in self.epoll.poll(0, MAX_EVENTS):
            side = self.sides.get(fd)
            if side is not None:
                side.relay.ready(side, events)
                continue
            waiter = self.connecting.get(fd)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def connect(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Connect a non-blocking socket, waiting in this set, where a refusal is an event
        (uvloop's sock_connect waits through add_writer, and resolves the address literal
        in its thread pool first)."""
        error = sock.connect_ex(address)
        if error == errno.EINPROGRESS:
            fd = sock.fileno()
            waiter = self.connecting[fd] = self.loop.create_future()
            self.epoll.register(fd, select.EPOLLOUT)
            try:
                await waiter
            finally:
                del self.connecting[fd]
                self.epoll.unregister(fd)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))

    def watch(self, side: _Side) -> None:
        """Poll side; a socket the set refused (ENOSPC past max_user_watches) is not its."""
        self.epoll.register(side.fd, side.events)
        self.sides[side.fd] = side

    def update(self, side: _Side, events: int) -> None:
        if side.resting:
            if events:
                side.resting = False
                side.events = events
                self.epoll.register(side.fd, events)
        elif events != side.events:
            side.events = events
            self.epoll.modify(side.fd, events)

    def rest(self, side: _Side) -> None:
        """Stop polling a socket that hung up and that nothing waits on for now: epoll
        reports a hang-up whatever it is asked for, and would wake the loop until then."""
        if not side.resting:
            side.resting = True
            self.epoll.unregister(side.fd)

    def forget(self, side: _Side) -> None:
        """Take a socket out of the set; the last one out takes the pooled pipes along."""
        if self.sides.pop(side.fd, None) is not None and not side.resting:
            self.epoll.unregister(side.fd)
        if not self.sides:
            self.pipes.close()

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
        self.pipes.close()


class _Side:
    """One socket of a spliced pair and the direction of the bytes it reads."""

    __slots__ = (
        "eof",
        "events",
        "fd",
        "in_pipe",
        "peer",
        "pending",
        "pipe",
        "received",
        "relay",
        "reset",
        "resting",
        "shut",
        "sock",
    )

    def __init__(self, relay: SplicedRelay, sock: socket.socket) -> None:
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = self
        self.events = 0
        self.resting = False
        self.received = 0
        self.eof = False
        """This socket sent its last byte (or its EOF came before the relay started)."""
        self.shut = False
        """Its last byte reached the peer, followed by our FIN (by a reset once both are
        done, when this socket was reset); or its peer was reset, and it is not read."""
        self.reset = False
        """The far end reset this connection (or it failed): nothing more can be written
        to it, and the other side is reset in turn."""
        self.pending = b""
        """Read from this socket, not yet written to the peer (first bytes, or copies)."""
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0

    @property
    def backlog(self) -> bool:
        """Bytes this side read still wait for the peer to take them."""
        return bool(self.pending) or self.in_pipe > 0

    def held(self) -> int:
        """Bytes read from the peer that have not left the proxy towards this socket."""
        held = len(self.peer.pending) + self.peer.in_pipe
        with contextlib.suppress(OSError, ValueError):  # closed: fileno() is -1
            held += unsent_bytes(self.sock)
        return held

    def wanted(self) -> int:
        """Read while nothing waits for the peer; watch for room while the peer's do."""
        events = 0
        if not self.eof and not self.backlog:
            events |= select.EPOLLIN
        if self.peer.backlog:
            events |= select.EPOLLOUT
        return events


class SplicedRelay(IdleCounting):
    """Splices client and upstream sockets until both directions end, then reports once:
    backpressure, half-close, idle timeout and resets as the transport Relay has them."""

    __slots__ = (
        "_error",
        "_idle_sweep",
        "_owner",
        "_reset_deadline",
        "_splicer",
        "client",
        "closed",
        "upstream",
    )

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        splicer: Splicer,
        idle_sweep: IdleSweep,
        owner: RelayOwner,
    ) -> None:
        super().__init__()
        self._splicer = splicer
        self._idle_sweep = idle_sweep
        self._owner = owner
        self._error = ""
        self._reset_deadline: asyncio.TimerHandle | None = None
        """Set once a side was reset: the other one is reset by then whatever is left."""
        self.closed = False
        self.client = _Side(self, client)
        self.upstream = _Side(self, upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client

    def start(self, first_bytes: bytes, client_eof: bool) -> None:
        """Relay from now on, sending what was sniffed first."""
        self.client.pending = first_bytes
        self.client.received = len(first_bytes)
        self.client.eof = client_eof
        self._idle_sweep.add(self)
        self._flush(self.client)
        if self.closed:
            return
        for side in (self.client, self.upstream):
            side.events = side.wanted()
            self._splicer.watch(side)
        self._settle()

    def ready(self, side: _Side, events: int) -> None:
        if (
            events & select.EPOLLERR
            and not side.reset
            and side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        ):
            self._lost(side)
        peer = side.peer
        if peer.backlog and events & (select.EPOLLOUT | select.EPOLLHUP):
            self._flush(peer)
        if not self.closed and not side.eof and not side.backlog and events & ~select.EPOLLOUT:
            self._pump(side)
        if self.closed:
            return
        self._settle()
        if not self.closed and events & select.EPOLLHUP and not side.events:
            self._splicer.rest(side)

    def _pump(self, side: _Side) -> None:
        """Read what side has into its pipe (or its pending bytes) and pass it on."""
        if side.pipe is None:
            side.pipe = self._splicer.pipes.take()
        try:
            moved = self._read(side)
        except BlockingIOError:
            self._give_back(side)  # nothing came: the pipe is lent only while bytes are
            return
        except OSError:
            self._lost(side)
            moved = 0  # a read fails only once nothing is left before the error
        if not moved:
            side.eof = True
        side.received += moved
        self._flush(side)

    def _read(self, side: _Side) -> int:
        """splice(2) stops at TCP's urgent mark: nothing more comes through it (EAGAIN, or 0
        once the peer sent its FIN) until a read takes the urgent byte, inline on our
        sockets (SO_OOBINLINE). Else the epoll would report the socket for ever, and the
        FIN would pass for the end with the bytes after the mark lost."""
        if side.pipe is not None:
            try:
                moved = os.splice(side.fd, side.pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
            except BlockingIOError:
                if not at_urgent_mark(side.fd):
                    raise
            else:
                if moved or not at_urgent_mark(side.fd):
                    side.in_pipe = moved
                    return moved
            self._give_back(side)
        data = side.sock.recv(COPY_CHUNK)
        side.pending = data
        return len(data)

    def _flush(self, side: _Side) -> None:
        """Write what side read to its peer, as far as the peer takes it."""
        target = side.peer.sock
        try:
            while side.pending:
                sent = target.send(side.pending)
                side.pending = side.pending[sent:]
            if side.pipe is not None:
                while side.in_pipe:
                    side.in_pipe -= os.splice(
                        side.pipe[0], target.fileno(), side.in_pipe, flags=SPLICE_FLAGS
                    )
                self._give_back(side)
        except BlockingIOError:
            return
        except OSError:
            self._lost(side.peer)
            return
        if side.eof and not side.shut:
            side.shut = True
            if side.reset:
                return  # its peer gets a reset, not a FIN (_settle)
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                self._lost(side.peer)

    def _lost(self, side: _Side) -> None:
        """side's connection was reset: what it sent before is still read and passed on
        (its reads end at its error or EOF); what the other side sends now has nowhere to
        go and is dropped."""
        if side.reset:
            return
        side.reset = True
        if not self._error and not side.eof:  # after its EOF: no failure (relay's docstring)
            self._error = "reset"
        if self._reset_deadline is None:
            self._reset_deadline = self._splicer.loop.call_later(
                RESET_GRACE_SECONDS, self.abort, "reset"
            )
        peer = side.peer
        peer.pending = b""
        self._give_back(peer)
        peer.in_pipe = 0
        peer.eof = peer.shut = True

    def _give_back(self, side: _Side) -> None:
        """Return side's pipe to the pool; one that still holds bytes is closed instead."""
        if side.pipe is not None:
            self._splicer.pipes.give(side.pipe, empty=not side.in_pipe)
            side.pipe = None

    def _settle(self) -> None:
        """Close once both directions are done; else poll each socket for what it waits on."""
        if self.closed:
            return
        if self.client.shut and self.upstream.shut:
            self._end()
            return
        for side in (self.client, self.upstream):
            self._splicer.update(side, side.wanted())

    def _end(self) -> None:
        """Both directions are done: close, unless a socket to be reset (its peer was)
        still holds bytes to send; then wait for epoll to report room, which with a
        TCP_NOTSENT_LOWAT of 1 it does once they are all sent."""
        for side in (self.client, self.upstream):
            if side.peer.reset and not side.reset and unsent_bytes(side.sock):
                side.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 1)
                self._splicer.update(side, select.EPOLLOUT)
                self._splicer.update(side.peer, 0)
                return
        self.close()

    def close(self, error: str = "", *, reset_both: bool = False) -> None:
        """End both sockets: whatever is still in flight is dropped (abort) or was sent.
        A socket whose peer was reset is reset too, and so is one that would lose bytes
        held for it before its peer's FIN (a FIN would make a cut stream look complete);
        with reset_both, every socket is."""
        if self.closed:
            return
        self.closed = True
        if error and not self._error:
            self._error = error
        if self._reset_deadline is not None:
            self._reset_deadline.cancel()
        self._idle_sweep.discard(self)
        for side in (self.client, self.upstream):
            self._give_back(side)
        for side in (self.client, self.upstream):
            self._splicer.forget(side)
            if reset_both or side.peer.reset or (not side.peer.shut and side.held()):
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            side.sock.close()
        self._owner.relayed(RelayResult(self.client.received, self.upstream.received, self._error))

    def abort(self, error: str) -> None:
        self.close(error)

    def cut(self, error: str) -> None:
        """Reset both sides at once: the proxy ends the stream (the drain timeout), and a
        FIN would let either end take the cut for its peer's end."""
        self.close(error, reset_both=True)

    def tick(self) -> None:
        """A quarter of the idle timeout has passed: close when no byte moved in four,
        read or sent (a slow reader taking what the proxy holds for it is no idle one)."""
        client, upstream = self.client, self.upstream
        held = client.held() + upstream.held()
        if self.idle_for_the_timeout(2 * (client.received + upstream.received) - held):
            self.abort("idle_timeout")


def at_urgent_mark(fd: int) -> bool:
    return bool(int.from_bytes(fcntl.ioctl(fd, SIOCATMARK, bytes(4)), sys.byteorder))
