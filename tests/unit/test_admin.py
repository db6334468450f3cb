"""The admin server's keep-alive: a scraper reusing one connection is never cut mid-use."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from egressproxy import admin
from egressproxy.settings import Endpoint

IDLE_TIMEOUT = 1.0
REQUESTS = 5
GAP = 0.3
"""REQUESTS x GAP is well past IDLE_TIMEOUT; each gap is well inside it."""
CLOSE_WAIT = 10.0

LIVE = b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n"


async def live_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_WAIT)
    return head + await asyncio.wait_for(reader.readexactly(len(b"live\n")), CLOSE_WAIT)


def test_keep_alive_times_out_after_the_last_request_not_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin.AdminConnection, "idle_timeout", IDLE_TIMEOUT)

    async def scenario() -> None:
        server = await admin.start_admin(
            admin.bind_admin(Endpoint("127.0.0.1", 0)), {"/live": lambda _: admin.text(200, "live")}
        )
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                for _ in range(REQUESTS):
                    writer.write(LIVE)
                    response = await live_response(reader)
                    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"live\n")
                    await asyncio.sleep(GAP)
                assert await asyncio.wait_for(reader.read(1), CLOSE_WAIT) == b"", (
                    "an idle connection is never closed"
                )
            finally:
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


BIG_BODY = 256 * 1024
PIPELINED = 100
MADE_UNREAD = 40
"""Answers the kernel's socket buffers take on loopback (about 4 MiB) and one more."""
BIG = b"GET /big HTTP/1.1\r\nHost: admin\r\n\r\n"


def test_pipelined_requests_are_answered_only_as_the_client_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends many scrapes and reads nothing gets no more answers made than
    its socket takes (they were all made at once, each body held, the loop busy); once it
    reads, every answer comes, in order; left unread past the idle timeout, the answers are
    dropped with the connection (a close kept them until the client read them)."""
    monkeypatch.setattr(admin.AdminConnection, "idle_timeout", IDLE_TIMEOUT)
    made: list[int] = []

    def big(_: dict[str, str]) -> admin.Response:
        made.append(len(made))
        return admin.Response(200, "text/plain", b"%08d" % len(made) + b"x" * (BIG_BODY - 8))

    async def scenario() -> tuple[int, int, list[bytes], int]:
        server = await admin.start_admin(admin.bind_admin(Endpoint("127.0.0.1", 0)), {"/big": big})
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(BIG * PIPELINED)
            await asyncio.sleep(0.3)
            unread = len(made)
            answers = []
            for _ in range(PIPELINED):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_WAIT)
                answers.append(
                    (await asyncio.wait_for(reader.readexactly(BIG_BODY), CLOSE_WAIT))[:8]
                )
            read = len(made)
            writer.write(BIG * PIPELINED)
            await asyncio.sleep(IDLE_TIMEOUT * 2)
            after_idle = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(reader.read(1 << 20), CLOSE_WAIT):
                    after_idle += len(chunk)
            writer.close()
            return unread, read, answers, after_idle
        finally:
            server.close()
            await server.wait_closed()

    unread, read, answers, after_idle = asyncio.run(scenario())
    assert unread < MADE_UNREAD
    assert read == PIPELINED
    assert answers == [b"%08d" % (index + 1) for index in range(PIPELINED)]
    assert after_idle < MADE_UNREAD * BIG_BODY, "the unread answers were kept for the client"
