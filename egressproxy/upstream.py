"""The only place that opens upstream sockets: source port, timeout, SO_MARK, name resolution."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import TypeVar

from egressproxy.errors import DNS_ERROR, NO_FILE_DESCRIPTORS, UpstreamError
from egressproxy.lookups import LookupThreads
from egressproxy.netfilter import PROXY_SOURCE_PORTS, plain_host, set_mark
from egressproxy.policy.decision import Action, Decision, Destination
from egressproxy.relay import close_with_reset
from egressproxy.timeouts import TimeoutQueue

ProtocolT = TypeVar("ProtocolT", bound=asyncio.BaseProtocol)
Connected = TypeVar("Connected")

CONNECT_ERRORS = {
    errno.ECONNREFUSED: "connect_refused",
    errno.ECONNRESET: "reset",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.EACCES: "unreachable",
    errno.ETIMEDOUT: "connect_timeout",
    errno.EMFILE: NO_FILE_DESCRIPTORS,
    errno.ENFILE: NO_FILE_DESCRIPTORS,
}
"""errno of a failed connect → the `error` label. EACCES is a firewall's or a route's
prohibition: ICMPv6 administratively prohibited and `ip route add prohibit` (v4 and v6)
give it where ICMPv4's host or network prohibited give EHOSTUNREACH."""


def address_for(decision: Decision, destination: Destination) -> tuple[str, int]:
    """Where traffic goes: the route's backend, or the original destination."""
    if decision.action is Action.ROUTE and decision.backend is not None:
        return decision.backend.host, decision.backend.port
    return destination.host, destination.port


SocketConnector = Callable[[socket.socket, tuple[str, int]], Awaitable[None]]
"""Connects a non-blocking socket: Splicer.connect (uvloop's sock_connect would resolve
even an address literal in its thread pool)."""


def connect(
    host: str,
    port: int,
    protocol_factory: Callable[[], ProtocolT],
    *,
    timeouts: TimeoutQueue,
    mark: int | None,
    connector: SocketConnector,
    lookups: LookupThreads,
) -> Coroutine[object, object, tuple[asyncio.Transport, ProtocolT]]:
    """Open a TCP connection to host:port from one of PROXY_SOURCE_PORTS within the
    timeouts' delay (the connect timeout); every failure is an UpstreamError with a kind.

    host is an IP literal (original destination) or a name (a route's backend, looked up
    in the worker's lookup threads). With a mark, the socket is made and connected here
    (by connector), then given a transport.

    Not a coroutine itself: it hands back _from_source_port's, to be awaited, so that
    every new connection starts, resumes and returns through one coroutine less.
    """
    loop = timeouts.loop

    async def attempt(ip: str, source: tuple[str, int]) -> tuple[asyncio.Transport, ProtocolT]:
        if mark is not None:
            sock = await _socket_connected(connector, ip, port, source, mark)
            try:
                return await loop.create_connection(protocol_factory, sock=sock)
            except BaseException:
                sock.close()
                raise
        transport, protocol = await loop.create_connection(
            protocol_factory, ip, port, local_addr=source
        )
        sock = transport.get_extra_info("socket")  # None once closed (reset at once)
        if sock is not None:  # before the request goes, so before any answer: see bind_listener
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        if RUNNING_AS_ROOT:
            _remember(transport)
        return transport, protocol

    return _from_source_port(host, port, timeouts, lookups, attempt)


def open_socket(
    host: str,
    port: int,
    *,
    timeouts: TimeoutQueue,
    mark: int | None,
    connector: SocketConnector,
    lookups: LookupThreads,
) -> Coroutine[object, object, socket.socket]:
    """connect() for a relay that splices: the connected non-blocking socket itself."""

    async def attempt(ip: str, source: tuple[str, int]) -> socket.socket:
        sock = await _socket_connected(connector, ip, port, source, mark)
        if mark is None and RUNNING_AS_ROOT:
            _remember(sock)
        return sock

    return _from_source_port(host, port, timeouts, lookups, attempt)


async def _from_source_port(
    host: str,
    port: int,
    timeouts: TimeoutQueue,
    lookups: LookupThreads,
    attempt: Callable[[str, tuple[str, int]], Awaitable[Connected]],
) -> Connected:
    """Resolve host, then attempt its addresses in the resolver's order (a backend's name
    may have several, and one that refuses, is unreachable or cannot be used here is
    skipped), each from one source port after another until one is free; all within one
    connect timeout, of which each address but the last gets an equal share of what is
    left (as Go's dialer does), so one that drops packets does not use it up. When every
    address fails, the first failure is the one reported."""
    deadline = _Deadline(timeouts)
    resolved = False
    try:
        ips = (host,) if _is_ip_literal(host) else await _resolve(lookups, host, port)
        resolved = True
        first_failure: OSError | UpstreamError | None = None
        left = len(ips)
        for ip in ips:
            ip = plain_host(ip)
            wildcard = "::" if ":" in ip else "0.0.0.0"
            share = _Share(deadline, left) if left > 1 else None
            left -= 1
            try:
                for _ in range(SOURCE_PORT_ATTEMPTS):
                    try:
                        return await attempt(ip, (wildcard, _source_ports.take()))
                    except OSError as error:
                        if error.errno not in SOURCE_PORT_TAKEN:
                            raise
            except asyncio.CancelledError:
                if share is None or not share.expired or deadline.expired:
                    raise
                share.task.uncancel()  # its share ran out: it drops packets, say
                first_failure = first_failure or OSError(errno.ETIMEDOUT, "timed out")
                continue
            except OSError as error:
                first_failure = first_failure or error
                continue
            finally:
                if share is not None:
                    share.timer.cancel()
            # Every port taken, or the address's family unusable here (IPv6 disabled:
            # EADDRNOTAVAIL whatever the port).
            first_failure = first_failure or UpstreamError(
                "no_source_port",
                f"{host}:{port}: {SOURCE_PORT_ATTEMPTS} source ports in a row were taken",
            )
        assert first_failure is not None, "a lookup answers with an address or raises"
        raise first_failure
    except asyncio.CancelledError:
        if not deadline.expired:
            raise
        deadline.task.uncancel()
        if not resolved:
            raise UpstreamError("dns_timeout", host) from None
        raise UpstreamError("connect_timeout", f"{host}:{port}") from None
    except OSError as error:
        kind = CONNECT_ERRORS.get(error.errno or 0, "connect_error")
        raise UpstreamError(kind, f"{host}:{port}: {error.strerror}") from None
    finally:
        deadline.pending.cancel()


class _Share:
    """One of several addresses' share of the time left before the deadline: the task is
    cancelled when it runs out, and goes on to the next address."""

    __slots__ = ("expired", "task", "timer")

    def __init__(self, deadline: _Deadline, addresses_left: int) -> None:
        self.task = deadline.task
        self.expired = False
        loop = self.task.get_loop()
        now = loop.time()
        self.timer = loop.call_at(
            now + (deadline.pending.when - now) / addresses_left, self._expire
        )

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()


class _Deadline:
    """asyncio.timeout for the connect, for less: every new connection pays for it.

    The context manager looks the running loop up twice (a getpid() each) and arms a
    loop timer of its own; this one joins the worker's queue of connect timeouts.
    """

    __slots__ = ("expired", "pending", "task")

    def __init__(self, timeouts: TimeoutQueue) -> None:
        task = asyncio.current_task(timeouts.loop)
        assert task is not None, "connect runs in a task"
        self.task = task
        self.expired = False
        self.pending = timeouts.start(self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()


SOURCE_PORT_ATTEMPTS = 32
SOURCE_PORT_TAKEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
"""A listener holds the port (bind), or a connection, perhaps in TIME_WAIT, already links
it to the same destination (connect): the next port will do."""


class SourcePorts:
    """PROXY_SOURCE_PORTS in turn: a port comes back to a destination only after the whole
    range, and the start is random per process, so a restarted proxy does not begin where
    its predecessor's connections (perhaps in TIME_WAIT) are. Workers take disjoint
    shares of the range (take_worker_share).

    Sockets bind with SO_REUSEADDR (libuv sets it), so one port serves any number of
    destinations; the kernel refuses only a repeated address pair.
    """

    def __init__(self, ports: range = PROXY_SOURCE_PORTS) -> None:
        self.ports = ports
        self.position: int | None = None

    def take(self) -> int:
        if self.position is None:
            self.position = random.randrange(len(self.ports))
        port = self.ports[self.position]
        self.position = (self.position + 1) % len(self.ports)
        return port


_source_ports = SourcePorts()


def take_worker_share(index: int, workers: int) -> None:
    """Worker `index` of `workers` draws its source ports from every workers-th port only.

    Workers walking one range from random starts collide once one's start falls inside
    the stretch another holds (many connections to one destination): it then meets
    SOURCE_PORT_ATTEMPTS taken ports in a row and refuses connections until it is past.
    """
    global _source_ports
    _source_ports = SourcePorts(PROXY_SOURCE_PORTS[index::workers])


RUNNING_AS_ROOT = os.geteuid() == 0
"""Root without --mark is the one set-up the redirect cannot exempt (it returns the
proxy's uid or mark): only then are upstream connections remembered to catch a loop.
Elsewhere a workload's redirected connection may show up with the same address and
port: it shares the proxy's address, and the redirect's NAT may give it any source port
to keep its reply tuple unique (so not even PROXY_SOURCE_PORTS tell the two apart)."""
_own_endpoints: dict[tuple[str, int], asyncio.BaseTransport | socket.socket] = {}
"""Local address and port of the upstream connections this process opened (closed ones
are purged now and then): a client connecting from one of them is the proxy itself."""
_purge_at = 1024


def _remember(connection: asyncio.BaseTransport | socket.socket) -> None:
    global _purge_at
    if isinstance(connection, socket.socket):
        sockname = connection.getsockname()
    else:
        sockname = connection.get_extra_info("sockname")
    if not sockname:
        return
    _own_endpoints[(sockname[0], sockname[1])] = connection
    if len(_own_endpoints) >= _purge_at:
        for endpoint, known in list(_own_endpoints.items()):
            if _closed(known):
                del _own_endpoints[endpoint]
        _purge_at = max(1024, 2 * len(_own_endpoints))


def _closed(connection: asyncio.BaseTransport | socket.socket) -> bool:
    if isinstance(connection, socket.socket):
        return connection.fileno() == -1
    return connection.is_closing()


def _remote(connection: asyncio.BaseTransport | socket.socket) -> tuple[str, int] | None:
    if isinstance(connection, socket.socket):
        try:
            peer: tuple[str, int] = connection.getpeername()
        except OSError:
            return None
        return peer
    remote: tuple[str, int] | None = connection.get_extra_info("peername")
    return remote


def is_own_connection(
    peer: tuple[str, int] | tuple[str, int, int, int], destination: Destination
) -> bool:
    """Whether a client is one of this process's own upstream connections, redirected back.

    That happens when the redirect does not exempt the proxy (root without --mark, or a
    mark the rules do not return); each hop would otherwise open another. The whole
    4-tuple must match: the kernel reuses a local port towards other destinations, so a
    workload sharing the proxy's address may well have the same (address, port).
    """
    known = _own_endpoints.get((plain_host(peer[0]), peer[1]))
    if known is None or _closed(known):
        return False
    remote = _remote(known)
    return remote is not None and (remote[0], remote[1]) == (destination.host, destination.port)


async def _socket_connected(
    connector: SocketConnector,
    ip: str,
    port: int,
    source: tuple[str, int],
    mark: int | None,
) -> socket.socket:
    """A socket of our own: for a splice, or to mark before it connects (SO_MARK must
    come first). A transport without a mark is cheaper: create_connection with IP
    literals connects inside uvloop with no Python in between."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # see bind_listener
        if mark is not None:
            set_mark(sock, mark)
        sock.bind(source)
        await connector(sock, (ip, port))
    except BaseException:
        close_with_reset(sock)  # cancelled once made: the client is gone, so is the stream
        raise
    return sock


def _is_ip_literal(host: str) -> bool:
    """An address create_connection takes as it is (inet_pton: a C call, no parsing in Python).

    Anything else, a scoped IPv6 address included, goes through getaddrinfo.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        return False
    return True


async def _resolve(lookups: LookupThreads, host: str, port: int) -> list[str]:
    try:
        found = await lookups.addresses(host, port)
    except OSError as error:
        raise UpstreamError(DNS_ERROR, f"{host}: {error}") from None
    if not found:
        raise UpstreamError(DNS_ERROR, f"{host}: no addresses")
    return found
