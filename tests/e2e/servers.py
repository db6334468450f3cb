"""The fake internet's services: one asyncio program run inside the internet namespace.

    ip netns exec NS python servers.py --config FILE

FILE (JSON) lists the hosts: primary name, all names, addresses, certificate
and key. Services (ports are the constants below):

    80    HTTP/1.1 (h11, keep-alive): a JSON echo of method, path, Host, headers,
          body length and sha256, which server address and port got the request
          and from which client address and port; GET /bytes/N streams N bytes of
          the test stream; GET /sunk/TOKEN reports what the sink received
    443   the same over TLS 1.2/1.3 (ALPN http/1.1) with the host's certificate,
          or the certificate of the host named by SNI; the echo adds version, SNI
    25, 2525  banner: "220 <host> ESMTP ready\r\n" first, then an echo
    7     echo; on EOF it flushes, then shuts down its write side
    9000  hash: reads until EOF, answers the sha256 hex and a newline, closes
    9001  source: reads "N\n", sends N bytes of the test stream, closes
    9002  sink: reads "TOKEN\n", answers "ready\n" and shuts down its write side
          first, then records the sha256 and length of everything until EOF

Plain services listen on the wildcard addresses, so every address routed to
the namespace answers; HTTPS listens on each host's own addresses so that a
client without SNI gets that host's certificate. The tests import this module
for `deterministic_chunks` and the ports.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import logging
import random
import resource
import signal
import socket
import ssl
import struct
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import h11
import uvloop

log = logging.getLogger("servers")

HTTP_PORT = 80
HTTPS_PORT = 443
BANNER_PORTS = (25, 2525)
"""25 is in the proxy's default --opaque-ports (never sniffed); 2525 is not (sniff times out)."""
ECHO_PORT = 7
HASH_PORT = 9000
SOURCE_PORT = 9001
SINK_PORT = 9002

BLOCK_SIZE = 64 * 1024
CHUNK_BLOCKS = 16
_BLOCK_TAIL = random.Random(0x5EED).randbytes(BLOCK_SIZE)[8:]
MAX_BYTES = 4 << 30
"""The largest /bytes/N or source request served."""
BACKLOG = 4096
READ_LIMIT = 1 << 20


def deterministic_chunks(total: int) -> Iterator[bytes]:
    """The first `total` bytes of the test stream, in chunks of up to 1 MiB.

    Each 64 KiB block starts with its own index, so a lost, repeated or
    reordered block changes the stream's hash.
    """
    block = 0
    remaining = total
    while remaining > 0:
        chunk = b"".join(
            struct.pack("!Q", index) + _BLOCK_TAIL for index in range(block, block + CHUNK_BLOCKS)
        )
        block += CHUNK_BLOCKS
        yield chunk[:remaining]
        remaining -= len(chunk)


@dataclass(frozen=True)
class Host:
    name: str
    names: tuple[str, ...]
    addresses: tuple[str, ...]
    cert: str
    key: str


class Internet:
    """What every service handler may ask: which host an address belongs to, and the ledger."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.by_address = {address: host for host in hosts for address in host.addresses}
        self.by_name = {name: host for host in hosts for name in host.names}
        self.tls_contexts = {host.name: self._tls_context(host) for host in hosts}
        self.sni_seen: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        self.sink_ledger: dict[str, dict[str, Any]] = {}

    def host_at(self, address: str) -> str:
        """The fake host owning a local address, or the address itself."""
        host = self.by_address.get(address)
        return host.name if host else address

    def _tls_context(self, host: Host) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(host.cert, host.key)
        context.set_alpn_protocols(["http/1.1"])
        context.sni_callback = self._on_sni
        return context

    def _on_sni(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        """Remember the SNI, and answer with the named host's certificate when it is one of ours."""
        if server_name is None:
            return
        self.sni_seen[ssl_object] = server_name
        host = self.by_name.get(server_name)
        if host is not None:
            ssl_object.context = self.tls_contexts[host.name]


def _address(sockname: Any) -> tuple[str, int]:
    return str(sockname[0]), int(sockname[1])


# --- opaque TCP services -------------------------------------------------


class Echo(asyncio.Protocol):
    """Echoes everything; on EOF it flushes what it owes, then shuts down its write side."""

    def __init__(self, internet: Internet) -> None:
        self.internet = internet
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * READ_LIMIT)
        greeting = self.greeting_for(self.transport)
        if greeting:
            self.transport.write(greeting)

    def greeting_for(self, transport: asyncio.Transport) -> bytes:
        return b""

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.transport.write_eof()
        self.transport.close()
        return True


class Banner(Echo):
    """Server speaks first (SMTP-like), then echoes."""

    def greeting_for(self, transport: asyncio.Transport) -> bytes:
        local, _ = _address(transport.get_extra_info("sockname"))
        return f"220 {self.internet.host_at(local)} ESMTP ready\r\n".encode()


class Hash(asyncio.Protocol):
    """Reads until EOF, then answers the sha256 hex of everything and closes (half-close test)."""

    def __init__(self, internet: Internet) -> None:
        self.digest = hashlib.sha256()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)

    def eof_received(self) -> bool:
        self.transport.write(self.digest.hexdigest().encode() + b"\n")
        self.transport.close()
        return True


async def source(
    internet: Internet, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Client sends a decimal byte count and a newline; that many stream bytes come back."""
    count = (await reader.readline()).strip()
    if not count:
        return
    if not count.isdigit() or int(count) > MAX_BYTES:
        log.warning("source: %r is not a byte count from 0 to %d", count, MAX_BYTES)
        return
    for chunk in deterministic_chunks(int(count)):
        writer.write(chunk)
        await writer.drain()


async def sink(
    internet: Internet, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Server half-closes first, then keeps reading: the reverse half-close test.

    Client sends a token line; the server answers `ready`, shuts down its write
    side, reads everything until EOF and records the sha256 under the token,
    which GET /sunk/<token> on the HTTP service reports.
    """
    token = (await reader.readline()).strip().decode("ascii")
    writer.write(b"ready\n")
    await writer.drain()
    writer.write_eof()
    digest = hashlib.sha256()
    length = 0
    while chunk := await reader.read(READ_LIMIT):
        digest.update(chunk)
        length += len(chunk)
    internet.sink_ledger[token] = {"sha256": digest.hexdigest(), "length": length}


# --- HTTP and HTTPS --------------------------------------------------------


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await reader.read(READ_LIMIT))


def _echo_document(
    internet: Internet,
    request: h11.Request,
    writer: asyncio.StreamWriter,
    body_length: int,
    body_sha256: str,
) -> dict[str, Any]:
    local = _address(writer.get_extra_info("sockname"))
    peer = _address(writer.get_extra_info("peername"))
    headers = [[name.decode("latin-1"), value.decode("latin-1")] for name, value in request.headers]
    host_header = next((value for name, value in headers if name == "host"), None)
    ssl_object = writer.get_extra_info("ssl_object")
    tls = None
    if ssl_object is not None:
        tls = {
            "version": ssl_object.version(),
            "sni": internet.sni_seen.get(ssl_object),
            "alpn": ssl_object.selected_alpn_protocol(),
        }
    return {
        "method": request.method.decode("ascii"),
        "path": request.target.decode("latin-1"),
        "http_version": request.http_version.decode("ascii"),
        "host": host_header,
        "headers": headers,
        "server": {"name": internet.host_at(local[0]), "address": local[0], "port": local[1]},
        "client": {"address": peer[0], "port": peer[1]},
        "tls": tls,
        "body": {"length": body_length, "sha256": body_sha256},
    }


async def _respond(
    connection: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: Iterable[bytes],
    length: int,
) -> None:
    headers = [("content-type", content_type), ("content-length", str(length))]
    writer.write(connection.send(h11.Response(status_code=status, headers=headers)) or b"")
    for chunk in body:
        writer.write(connection.send(h11.Data(data=chunk)) or b"")
        await writer.drain()
    writer.write(connection.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def _json_answer(status: int, document: Any) -> tuple[int, str, Iterable[bytes], int]:
    body = json.dumps(document, indent=1).encode() + b"\n"
    return status, "application/json", [body], len(body)


def _answer(
    internet: Internet,
    request: h11.Request,
    writer: asyncio.StreamWriter,
    body_length: int,
    sha: str,
) -> tuple[int, str, Iterable[bytes], int]:
    """(status, content type, body chunks, length) for one request."""
    path = request.target.decode("latin-1")
    if request.method in (b"GET", b"HEAD") and path.startswith("/bytes/"):
        count = path.removeprefix("/bytes/")
        if not count.isdigit() or int(count) > MAX_BYTES:
            return _json_answer(400, {"error": f"/bytes/N takes N from 0 to {MAX_BYTES}"})
        return 200, "application/octet-stream", deterministic_chunks(int(count)), int(count)
    if request.method in (b"GET", b"HEAD") and path.startswith("/sunk/"):
        record = internet.sink_ledger.get(path.removeprefix("/sunk/"))
        return _json_answer(200 if record else 404, record)
    return _json_answer(200, _echo_document(internet, request, writer, body_length, sha))


async def _serve_request(
    internet: Internet,
    connection: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Answer one request; False when the connection is done."""
    request = await _next_event(connection, reader)
    if not isinstance(request, h11.Request):
        return False
    digest = hashlib.sha256()
    length = 0
    while not isinstance(event := await _next_event(connection, reader), h11.EndOfMessage):
        if not isinstance(event, h11.Data):
            return False
        digest.update(event.data)
        length += len(event.data)
    status, content_type, body, size = _answer(
        internet, request, writer, length, digest.hexdigest()
    )
    if request.method == b"HEAD":
        body = []
    await _respond(connection, writer, status, content_type, body, size)
    return connection.our_state is not h11.MUST_CLOSE


async def http(
    internet: Internet, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """JSON echo of each request; GET /bytes/N streams the test stream; keep-alive."""
    connection = h11.Connection(h11.SERVER)
    try:
        while await _serve_request(internet, connection, reader, writer):
            connection.start_next_cycle()
    except h11.RemoteProtocolError as error:
        log.info("http: not a valid request: %s", error)


# --- wiring -----------------------------------------------------------------

StreamService = Callable[[Internet, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _stream_handler(
    internet: Internet, service: StreamService
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await service(internet, reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as error:
            log.info("%s: connection ended: %r", service.__name__, error)
        finally:
            writer.close()

    return handle


def _listening_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(internet: Internet) -> None:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    protocols: dict[int, type[Echo | Hash]] = {ECHO_PORT: Echo, HASH_PORT: Hash}
    protocols.update(dict.fromkeys(BANNER_PORTS, Banner))
    streams: dict[int, StreamService] = {HTTP_PORT: http, SOURCE_PORT: source, SINK_PORT: sink}
    for wildcard in ("0.0.0.0", "::"):
        for port, protocol in protocols.items():
            sock = _listening_socket(wildcard, port)
            servers.append(
                await loop.create_server(
                    functools.partial(protocol, internet), sock=sock, backlog=BACKLOG
                )
            )
        for port, service in streams.items():
            sock = _listening_socket(wildcard, port)
            servers.append(
                await asyncio.start_server(
                    _stream_handler(internet, service), sock=sock, backlog=BACKLOG, limit=READ_LIMIT
                )
            )
    for host in internet.hosts:
        for address in host.addresses:
            servers.append(
                await asyncio.start_server(
                    _stream_handler(internet, http),
                    sock=_listening_socket(address, HTTPS_PORT),
                    backlog=BACKLOG,
                    limit=READ_LIMIT,
                    ssl=internet.tls_contexts[host.name],
                )
            )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("serving %d listeners", len(servers))
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON file naming the hosts")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(args.config, encoding="utf-8") as handle:
        config = json.load(handle)
    hosts = [
        Host(
            name=entry["name"],
            names=tuple(entry["names"]),
            addresses=tuple(entry["addresses"]),
            cert=entry["cert"],
            key=entry["key"],
        )
        for entry in config["hosts"]
    ]
    uvloop.run(serve(Internet(hosts)))


if __name__ == "__main__":
    main()
