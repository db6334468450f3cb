"""The only place that opens upstream sockets: timeout, SO_MARK, name resolution."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import TypeVar

from egressproxy.errors import UpstreamError
from egressproxy.netfilter import set_mark

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
    address = await _resolve(loop, host, port, timeout)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            set_mark(sock, mark)
        async with asyncio.timeout_at(deadline):
            await loop.sock_connect(sock, address)
        transport, protocol = await loop.create_connection(protocol_factory, sock=sock)
    except TimeoutError:
        sock.close()
        raise UpstreamError("connect_timeout", f"{host}:{port}") from None
    except OSError as error:
        sock.close()
        kind = CONNECT_ERRORS.get(error.errno or 0, "connect_error")
        raise UpstreamError(kind, f"{host}:{port}: {error.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return transport, protocol


async def _resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float
) -> tuple[str, int]:
    try:
        return (str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise UpstreamError("dns_timeout", host) from None
    except OSError as error:
        raise UpstreamError("dns_error", f"{host}: {error}") from None
    if not infos:
        raise UpstreamError("dns_error", f"{host}: no addresses")
    return (str(infos[0][4][0]), port)
