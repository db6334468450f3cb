"""A spliced connection the proxy itself fails (the kernel refuses it a resource, or a
bug), on loopback: it is reset, counted once with error=proxy_error and out of the open
flows, its sockets closed, and the worker serves the next connection."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
from pathlib import Path

import pytest

from egressproxy.settings import VerifyDestination
from egressproxy.verify import Resolver
from tests.unit.http_harness import ALLOW_ALL, echo, proxy_to_origin
from tests.unit.test_sniff_tls import client_hello, frame, sni_extension

TIMEOUT = 5.0


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The proxy's log records that carry a traceback (not the test origin's)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("egressproxy") and record.exc_info
    ]


async def a_connection_is_echoed(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x00\x01 still served")
    assert await asyncio.wait_for(reader.readexactly(15), TIMEOUT) == b"\x00\x01 still served"
    writer.close()


class RefusingEpoll:
    """The splicer's epoll set, whose `refused`th register fails as a full one does."""

    def __init__(self, epoll: select.epoll, refused: int) -> None:
        self.epoll = epoll
        self.registers_left = refused

    def register(self, fd: int, events: int) -> None:
        self.registers_left -= 1
        if self.registers_left == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.epoll.register(fd, events)

    def __getattr__(self, name: str) -> object:
        return getattr(self.epoll, name)


@pytest.mark.asyncio
async def test_a_socket_the_epoll_set_refuses_ends_its_connection_not_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """epoll_ctl's ENOSPC (past fs.epoll.max_user_watches) for the upstream socket, once
    the client's is in the set already."""
    async with proxy_to_origin(echo, tmp_path, monkeypatch, ALLOW_ALL) as proxy:
        splicer = proxy.context.splicer
        splicer.epoll = RefusingEpoll(splicer.epoll, refused=2)  # type: ignore[assignment]
        before = open_descriptors()
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        with caplog.at_level(logging.WARNING):
            writer.write(b"\x00\x01 a binary protocol")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(100), TIMEOUT)
            writer.close()
            await proxy.wait_closed_flows(1)
        assert [flow.error for flow in proxy.ledger.flows] == ["proxy_error"]
        assert not proxy.context.open_flows.flows
        assert not proxy.context.splicer.sides
        assert open_descriptors() <= before
        assert "proxy error: [Errno 28] No space left on device" in caplog.text
        assert tracebacks(caplog) == []
        await a_connection_is_echoed(proxy.host, proxy.port)


class BrokenResolver(Resolver):
    async def matches(self, hostname: str, destination: object) -> bool | None:
        raise RuntimeError("a bug")


@pytest.mark.asyncio
async def test_a_bug_on_the_way_to_the_upstream_ends_its_connection_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything unforeseen raised while verifying or connecting a spliced connection:
    logged with its traceback (a bug to report), and the connection ends counted."""
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=VerifyDestination.ENFORCE
    ) as proxy:
        proxy.context.resolver = BrokenResolver()
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        with caplog.at_level(logging.WARNING):
            writer.write(frame(client_hello([sni_extension(b"name.test")])))
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            await proxy.wait_closed_flows(1)
        assert [flow.error for flow in proxy.ledger.flows] == ["proxy_error"]
        assert not proxy.context.open_flows.flows
        assert [message.endswith("proxy error") for message in tracebacks(caplog)] == [True]
        await a_connection_is_echoed(proxy.host, proxy.port)


@pytest.mark.asyncio
async def test_a_bug_in_a_logged_verification_leaves_the_connection_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--verify-destination log checks while the traffic goes on: a bug in the check is
    logged with its traceback, and the connection is spliced as if it had found nothing."""
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=VerifyDestination.LOG
    ) as proxy:
        proxy.context.resolver = BrokenResolver()
        hello = frame(client_hello([sni_extension(b"name.test")]))
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        with caplog.at_level(logging.WARNING):
            writer.write(hello)
            assert await asyncio.wait_for(reader.readexactly(len(hello)), TIMEOUT) == hello
            writer.close()
            await proxy.wait_closed_flows(1)
        assert [flow.error for flow in proxy.ledger.flows] == [""]
        assert proxy.ledger.unconfirmed == []
        assert [
            message.endswith("verifying name.test (log): proxy error")
            for message in tracebacks(caplog)
        ] == [True]
