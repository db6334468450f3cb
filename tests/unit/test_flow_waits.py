"""A TLS or opaque connection between its decision and its splice (the destination being
verified, the upstream being connected to), on loopback under uvloop: a client reset then
finishes it at once, and bytes the client sends meanwhile reach the upstream in order."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from egressproxy.flow import Flow
from egressproxy.relay import WRITE_BUFFER_HIGH
from egressproxy.settings import VerifyDestination
from egressproxy.splice import Splicer
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


async def until_the_reset_is_read(flow: Flow) -> None:
    """Until the loop read the client's reset (the transport is closing), and no longer:
    the flow is told (connection_lost) in the loop's next round."""
    for _ in range(100):
        if flow.transport.is_closing():
            break
        await asyncio.sleep(0)
    assert flow.transport.is_closing() and not flow.client_gone


async def until_cancelled(flow: Flow) -> None:
    """Until the flow, told of the reset, cancels the connect that was still waiting."""
    await asyncio.sleep(TIMEOUT)


@pytest.mark.parametrize(
    "after_the_connect",
    [
        pytest.param(until_the_reset_is_read, id="connect-done-reset-read"),
        pytest.param(until_cancelled, id="connect-done-then-cancelled"),
    ],
)
def test_a_client_reset_as_the_upstream_connect_completes_reaches_the_upstream_as_one(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    after_the_connect: Callable[[Flow], Awaitable[None]],
) -> None:
    """The client resets just as the upstream connect completes. The loop reads the reset
    and tells the flow only later (connection_lost, in its next round): a connect
    finishing in between saw a client still there, and spliced, the reset socket read as
    an EOF, so the upstream got the first bytes and a FIN, a cut stream that looked
    complete. A connect cancelled once made closed its socket with a FIN too."""

    async def scenario() -> tuple[bytes, str, list[str]]:
        loop = asyncio.get_running_loop()
        origin = socket.create_server(("127.0.0.1", 0))
        origin.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        async with loopback_proxy(
            tmp_path, monkeypatch, ALLOW_ALL, local(origin.getsockname()[1])
        ) as proxy:
            real_connect = Splicer.connect

            async def connect_as_the_client_resets(
                splicer: Splicer, sock: socket.socket, address: tuple[str, int]
            ) -> None:
                await real_connect(splicer, sock, address)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
                client.close()
                (flow,) = proxy.context.open_flows.flows
                await after_the_connect(flow)

            monkeypatch.setattr(Splicer, "connect", connect_as_the_client_resets)
            await loop.sock_connect(client, (proxy.host, proxy.port))
            await loop.sock_sendall(client, b"\x00 an opaque protocol")
            upstream, _ = await loop.sock_accept(origin)
            received, end = b"", "eof"
            try:
                while chunk := await loop.sock_recv(upstream, 65536):
                    received += chunk
            except ConnectionResetError:
                end = "reset"
            upstream.close()
            await proxy.wait_closed_flows(1, timeout=2.0)
        origin.close()
        return received, end, [flow.error for flow in proxy.ledger.flows]

    assert run(scenario()) == (b"", "reset", ["reset"])


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
