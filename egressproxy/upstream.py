"""The only place that opens upstream sockets: timeout, SO_MARK, name resolution."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from typing import TypeVar

from egressproxy.errors import UpstreamError
from egressproxy.netfilter import set_mark
from egressproxy.policy.decision import Action, Decision, Destination

ProtocolT = TypeVar("ProtocolT", bound=asyncio.BaseProtocol)

CONNECT_ERRORS = {
    errno.ECONNREFUSED: "connect_refused",
    errno.ECONNRESET: "reset",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.ETIMEDOUT: "connect_timeout",
    errno.EMFILE: "no_file_descriptors",
    errno.ENFILE: "no_file_descriptors",
}


def address_for(decision: Decision, destination: Destination) -> tuple[str, int]:
    """Where traffic goes: the route's backend, or the original destination."""
    if decision.action is Action.ROUTE and decision.backend is not None:
        return decision.backend.host, decision.backend.port
    return str(destination.ip), destination.port


async def connect(
    host: str,
    port: int,
    protocol_factory: Callable[[], ProtocolT],
    *,
    timeout: float,
    mark: int | None,
) -> tuple[asyncio.Transport, ProtocolT]:
    """Open a TCP connection to host:port; every failure is an UpstreamError with a kind.

    host is an IP literal (original destination) or a name (a route's backend).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ip = host if _is_ip_literal(host) else await _resolve(loop, host, port, timeout)
    try:
        async with asyncio.timeout_at(deadline):
            if mark is None:
                transport, protocol = await loop.create_connection(protocol_factory, ip, port)
            else:
                transport, protocol = await _connect_marked(loop, ip, port, mark, protocol_factory)
    except TimeoutError:
        raise UpstreamError("connect_timeout", f"{host}:{port}") from None
    except OSError as error:
        kind = CONNECT_ERRORS.get(error.errno or 0, "connect_error")
        raise UpstreamError(kind, f"{host}:{port}: {error.strerror}") from None
    if mark is None and RUNNING_AS_ROOT:
        _remember(transport)
    return transport, protocol


RUNNING_AS_ROOT = os.geteuid() == 0
"""Root without --mark is the one set-up the redirect cannot exempt (it returns the
proxy's uid or mark): only then are upstream connections remembered to catch a loop.
Elsewhere a workload may legitimately reuse such an address and port (it shares the
proxy's address, and a port it just aborted), so matching there would refuse it."""
_own_endpoints: dict[tuple[str, int], asyncio.BaseTransport] = {}
"""Local address and port of the upstream connections this process opened (closed ones
are purged now and then): a client connecting from one of them is the proxy itself."""
_purge_at = 1024


def _remember(transport: asyncio.BaseTransport) -> None:
    global _purge_at
    sockname = transport.get_extra_info("sockname")
    if not sockname:
        return
    _own_endpoints[(sockname[0], sockname[1])] = transport
    if len(_own_endpoints) >= _purge_at:
        for endpoint, known in list(_own_endpoints.items()):
            if known.is_closing():
                del _own_endpoints[endpoint]
        _purge_at = max(1024, 2 * len(_own_endpoints))


def is_own_connection(
    peer: tuple[str, int] | tuple[str, int, int, int], destination: Destination
) -> bool:
    """Whether a client is one of this process's own upstream connections, redirected back.

    That happens when the redirect does not exempt the proxy (root without --mark, or a
    mark the rules do not return); each hop would otherwise open another. The whole
    4-tuple must match: the kernel reuses a local port towards other destinations, so a
    workload sharing the proxy's address may well have the same (address, port).
    """
    host = peer[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    known = _own_endpoints.get((host, peer[1]))
    if known is None or known.is_closing():
        return False
    remote = known.get_extra_info("peername")
    return bool(remote) and (remote[0], remote[1]) == (str(destination.ip), destination.port)


async def _connect_marked(
    loop: asyncio.AbstractEventLoop,
    ip: str,
    port: int,
    mark: int,
    protocol_factory: Callable[[], ProtocolT],
) -> tuple[asyncio.Transport, ProtocolT]:
    """The slower path: SO_MARK must be on the socket before it connects.

    Without a mark, create_connection with an IP literal connects inside uvloop
    with no Python in between, which is most of the cost of a new connection.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_mark(sock, mark)
        await loop.sock_connect(sock, (ip, port))
        return await loop.create_connection(protocol_factory, sock=sock)
    except BaseException:
        sock.close()
        raise


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


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float) -> str:
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise UpstreamError("dns_timeout", host) from None
    except OSError as error:
        raise UpstreamError("dns_error", f"{host}: {error}") from None
    if not infos:
        raise UpstreamError("dns_error", f"{host}: no addresses")
    return str(infos[0][4][0])
