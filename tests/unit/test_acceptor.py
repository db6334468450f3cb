"""Accepting pauses at --max-connections without refusing anyone, and says so without
flooding the log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
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


class Accepted(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Event) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.set()
        transport.close()


@pytest.mark.asyncio
async def test_resuming_without_a_descriptor_to_spare_tries_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Resuming needs a duplicate of each listener: with every descriptor taken the
    duplicate failed, the task ended with the error, and the worker never accepted again."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = asyncio.Event()
    acceptor = server.Acceptor([listener])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        await acceptor.start(lambda: Accepted(accepted))
        acceptor.pause()
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
        with contextlib.suppress(OSError):
            for _ in range(10_000):
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        with caplog.at_level(logging.WARNING, logger="egressproxy.server"):
            acceptor.resume()
            await asyncio.sleep(server.RESUME_RETRY_INTERVAL / 2)
        assert acceptor.resuming is not None and not acceptor.resuming.done()
        assert any("cannot accept again" in record.getMessage() for record in caplog.records)
        for descriptor in fillers:
            os.close(descriptor)
        fillers.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client = socket.create_connection(listener.getsockname())
        try:
            await asyncio.wait_for(accepted.wait(), 5 * server.RESUME_RETRY_INTERVAL)
        finally:
            client.close()
    finally:
        for descriptor in fillers:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        acceptor.close()
