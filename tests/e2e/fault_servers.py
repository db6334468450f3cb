"""Faulty upstreams for the reliability tests: run inside the world's internet namespace.

    ip netns exec NS python fault_servers.py --address 203.0.113.60

Each port misbehaves in one way, whatever the client sends (HTTP or opaque bytes),
so one server covers the TCP and the HTTP variant of a fault:

    9101  reset      after the first bytes: an HTTP head promising 1 MiB, 64 KiB of it, RST
    9102  stall      reads and drops everything, never answers
    9103  close      after the first bytes: a clean close (FIN) without a word
    9104  garbage    after the first bytes: bytes that are no HTTP response, then FIN
    9105  truncate   after the first bytes: an HTTP head promising 1 MiB, 64 KiB of it, FIN
    9106  no-read    never reads (tiny receive buffer): the sender's bytes pile up upstream

"ready" is printed once every port listens. The address must be in the internet
namespace's local range and the ports unused by servers.py and http_servers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import struct
from typing import cast

RESET_PORT = 9101
STALL_PORT = 9102
CLOSE_PORT = 9103
GARBAGE_PORT = 9104
TRUNCATE_PORT = 9105
NO_READ_PORT = 9106
PORTS = (RESET_PORT, STALL_PORT, CLOSE_PORT, GARBAGE_PORT, TRUNCATE_PORT, NO_READ_PORT)

PROMISED = 1 << 20
SENT_BEFORE_FAULT = 64 << 10
PARTIAL_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
    b"content-length: %d\r\n\r\n" % PROMISED
) + b"x" * SENT_BEFORE_FAULT
GARBAGE = b"\x00\xff\xfeNOT HTTP AT ALL\r\n\r\n" + bytes(range(256)) * 4
TINY_BUFFER = 4096
BACKLOG = 1024


class Fault(asyncio.Protocol):
    """Waits for the client's first bytes, then misbehaves (subclasses say how)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport
        self.triggered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.triggered:
            self.triggered = True
            self.misbehave()

    def eof_received(self) -> bool:
        return True

    def misbehave(self) -> None:
        """Stall: nothing at all."""


class Reset(Fault):
    def misbehave(self) -> None:
        self.transport.write(PARTIAL_RESPONSE)
        asyncio.get_running_loop().call_later(0.2, self.reset)

    def reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class Close(Fault):
    def misbehave(self) -> None:
        self.transport.close()


class Garbage(Fault):
    def misbehave(self) -> None:
        self.transport.write(GARBAGE)
        self.transport.close()


class Truncate(Fault):
    def misbehave(self) -> None:
        self.transport.write(PARTIAL_RESPONSE)
        self.transport.close()


class NoRead(Fault):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # after the transport's own call_soon that starts reading (asyncio in 3.11)
        asyncio.get_running_loop().call_soon(self.transport.pause_reading)


BEHAVIOUR: dict[int, type[Fault]] = {
    RESET_PORT: Reset,
    STALL_PORT: Fault,
    CLOSE_PORT: Close,
    GARBAGE_PORT: Garbage,
    TRUNCATE_PORT: Truncate,
    NO_READ_PORT: NoRead,
}


def listening_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if port == NO_READ_PORT:
        # inherited by accepted sockets: the proxy's writes back up after a few KiB
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_BUFFER)
    sock.bind((address, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(address: str) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(BEHAVIOUR[port], sock=listening_socket(address, port))
        for port in PORTS
    ]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="the IPv4 address to listen on")
    args = parser.parse_args()
    asyncio.run(serve(args.address))


if __name__ == "__main__":
    main()
