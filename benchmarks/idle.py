"""Idle connections for the memory workload: a server that holds them, a client that opens them.

`idle.py serve IP PORT` answers each connection's first bytes with one byte and
then holds it open, silent. `idle.py open IP PORT HOSTNAME COUNT` sends a TLS
ClientHello for HOSTNAME on COUNT connections (so every proxy sniffs, decides
and connects upstream), waits for each one's answer byte, and talks to the
harness over stdin/stdout:

    warm                   after a few connections were opened, answered and closed
    <- go                  open COUNT connections
    ready N                N of them were answered end to end
    <- done                close them all and exit
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys

CONNECT_CONCURRENCY = 100
WARMUP_CONNECTIONS = 20
STEP_TIMEOUT = 120.0


class Holder(asyncio.Protocol):
    def __init__(self) -> None:
        self.answered = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.answered and self.transport is not None:
            self.answered = True
            self.transport.write(b"k")


async def serve(ip: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Holder, ip, port, backlog=8192, reuse_address=True)
    async with server:
        await server.serve_forever()


def client_hello(hostname: str) -> bytes:
    """The bytes a real TLS client sends first, made once and replayed on every connection."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def open_answered(ip: str, port: int, hello: bytes, count: int) -> list[asyncio.StreamWriter]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(ip, port)
            writer.write(hello)
            if await reader.read(1) == b"k":
                writers.append(writer)
            else:
                writer.close()

    results = await asyncio.wait_for(
        asyncio.gather(*(one() for _ in range(count)), return_exceptions=True), STEP_TIMEOUT
    )
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        print(f"{len(failures)} connections failed, first: {failures[0]!r}", file=sys.stderr)
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)


async def open_idle(ip: str, port: int, hostname: str, count: int) -> None:
    loop = asyncio.get_running_loop()
    hello = client_hello(hostname)

    async def command() -> str:
        line: str = await loop.run_in_executor(None, sys.stdin.readline)
        return line.strip()

    await close_all(await open_answered(ip, port, hello, WARMUP_CONNECTIONS))
    await asyncio.sleep(0.5)
    print("warm", flush=True)
    if await command() != "go":
        return
    writers = await open_answered(ip, port, hello, count)
    await asyncio.sleep(0.5)
    print(f"ready {len(writers)}", flush=True)
    await command()
    await close_all(writers)


def main(argv: list[str]) -> None:
    if argv[0] == "serve":
        asyncio.run(serve(argv[1], int(argv[2])))
    else:
        asyncio.run(open_idle(argv[1], int(argv[2]), argv[3], int(argv[4])))


if __name__ == "__main__":
    main(sys.argv[1:])
