"""The admin server's keep-alive: a scraper reusing one connection is never cut mid-use."""

from __future__ import annotations

import asyncio

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
