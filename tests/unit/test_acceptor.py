"""Accepting pauses at --max-connections without refusing anyone, and says so without
flooding the log."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from egressproxy import server


@pytest.mark.asyncio
async def test_pauses_at_the_limit_are_logged_once_in_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At the limit, a pause and a resume come with every connection that ends: a line
    for each flooded the log (20,000 pairs in 8 s in a reviewer's run)."""
    listener = socket.create_server(("127.0.0.1", 0))
    acceptor = server.Acceptor([listener])
    try:
        await acceptor.start(asyncio.Protocol)
        with caplog.at_level(logging.INFO, logger="egressproxy.server"):
            for _ in range(100):
                acceptor.pause()
                acceptor.resume()
                assert acceptor.resuming is not None
                await acceptor.resuming
        said = [record.getMessage() for record in caplog.records]
        assert said == [
            "connection limit reached: accepting paused",
            "below the connection limit: accepting again",
        ]
        acceptor.pause_said_at -= server.PAUSE_LOG_INTERVAL  # as if that long had passed
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="egressproxy.server"):
            acceptor.pause()
        assert [record.getMessage() for record in caplog.records] == [
            "connection limit reached: accepting paused (100 times since the last line)"
        ]
    finally:
        acceptor.close()
