"""A TLS or opaque connection between its decision and its splice (the destination being
verified, the upstream being connected to), on loopback under uvloop: a client reset then
finishes it at once, and bytes the client sends meanwhile reach the upstream in order."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from egressproxy.relay import WRITE_BUFFER_HIGH
from egressproxy.settings import VerifyDestination
from tests.unit.http_harness import ALLOW_ALL, Recording, local, loopback_proxy, proxy_to_origin
from tests.unit.test_upstream_deadline import listener_that_never_answers
from tests.unit.test_verified_flows import HELLO, HeldResolver, until

TIMEOUT = 10.0
RESET_ON_CLOSE = struct.pack("ii", 1, 0)

Result = TypeVar("Result")


def run(scenario: Coroutine[Any, Any, Result]) -> Result:
    return uvloop.run(asyncio.wait_for(scenario, TIMEOUT))


def reset(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
    writer.transport.abort()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_reset_while_the_destination_is_verified_finishes_the_flow_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not when the lookup ends (up to its 5 s timeout): until then the connection would
    be counted open, against --max-connections, for a client long gone."""

    async def scenario() -> tuple[int, list[str], list[str]]:
        resolver = HeldResolver()
        async with proxy_to_origin(
            Recording(),
            tmp_path,
            monkeypatch,
            ALLOW_ALL,
            verify_destination=VerifyDestination.ENFORCE,
        ) as proxy:
            proxy.context.resolver = resolver
            _, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(HELLO)
            await until(lambda: resolver.lookups == ["slow.test"])
            reset(writer)
            await proxy.wait_closed_flows(1, timeout=2.0)
            still_open = len(proxy.context.open_flows)
            resolver.release.set()
            await asyncio.sleep(0.05)
        return still_open, [flow.error for flow in proxy.ledger.flows], resolver.lookups

    assert run(scenario()) == (0, ["reset"], ["slow.test"])


def test_a_reset_while_the_upstream_is_connected_to_finishes_the_flow_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not at the connect timeout; the upstream socket being connected is closed too."""

    async def scenario() -> tuple[list[str], int, int, int]:
        with listener_that_never_answers() as port:
            async with loopback_proxy(tmp_path, monkeypatch, ALLOW_ALL, local(port)) as proxy:
                _, writer = await asyncio.open_connection(proxy.host, proxy.port)
                await asyncio.sleep(0.05)
                gc.collect()  # an earlier test's socket collected later would close an fd
                before = open_fds()
                writer.write(b"\x00 an opaque protocol")
                splicer = proxy.context.splicer
                await until(lambda: bool(splicer.connecting))
                reset(writer)
                await proxy.wait_closed_flows(1, timeout=2.0)
                await asyncio.sleep(0.05)
                return (
                    [flow.error for flow in proxy.ledger.flows],
                    len(splicer.connecting),
                    before - 2,
                    open_fds(),
                )

    errors, connecting, expected_fds, fds = run(scenario())
    assert (errors, connecting) == (["reset"], 0)
    assert fds == expected_fds, "both ends of the client's connection gone, no upstream socket"


@pytest.mark.parametrize("size", [100, 4 << 20], ids=["a-little", "more-than-is-buffered"])
def test_bytes_sent_while_the_destination_is_verified_follow_the_hello_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Kept (up to WRITE_BUFFER_HIGH, then reading pauses) and sent after the hello, once,
    with the client's EOF after them."""
    later = os.urandom(size)

    async def scenario() -> tuple[bytes, int]:
        resolver = HeldResolver()
        origin = Recording()
        async with proxy_to_origin(
            origin, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=VerifyDestination.ENFORCE
        ) as proxy:
            proxy.context.resolver = resolver
            _, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(HELLO)
            await until(lambda: resolver.lookups == ["slow.test"])
            (flow,) = proxy.context.open_flows.flows
            for start in range(0, size, 1 << 20):
                writer.write(later[start : start + (1 << 20)])
                await asyncio.sleep(0.05)
            writer.write_eof()
            await asyncio.sleep(0.1)
            buffered = len(flow.buffer)
            resolver.release.set()
            await proxy.wait_closed_flows(1)
            writer.close()
        return bytes(origin.received), buffered

    received, buffered = run(scenario())
    assert received == HELLO + later
    assert buffered <= 2 * WRITE_BUFFER_HIGH, "a client writing on is paused, not buffered"
