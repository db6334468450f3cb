"""The tunnel relay taking over transports another protocol was using (HTTP/1's Upgrade and
CONNECT): a transport already past its high-water mark keeps its peer unread; the idle
timeout counts bytes leaving it as traffic, and its cut resets a side it drops bytes for."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from egressproxy.relay import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW, Relay, RelayResult
from egressproxy.timeouts import IdleSweep
from tests.unit.test_splice import read_slowly, read_to_eof, send_and_end, tcp_pair

CHUNK = 64 * 1024


class Paused(asyncio.Protocol):
    """The protocol before the hand-over: told to pause writing, never to resume."""

    def __init__(self) -> None:
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True


class Results(list[RelayResult]):
    def relayed(self, result: RelayResult) -> None:
        self.append(result)


def small_socketpair() -> tuple[socket.socket, socket.socket]:
    pair = socket.socketpair()
    for sock in pair:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
    return pair


def sent_until_full(sock: socket.socket, limit: int) -> int:
    """Bytes a non-blocking socket takes before its buffers fill (limit at most)."""
    sent = 0
    while sent < limit:
        try:
            sent += sock.send(b"c" * min(CHUNK, limit - sent))
        except BlockingIOError:
            break
    return sent


def received(sock: socket.socket) -> bytes:
    """What a non-blocking socket has for us now."""
    data = b""
    while True:
        try:
            chunk = sock.recv(CHUNK)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.asyncio
async def test_an_upstream_paused_at_the_hand_over_keeps_the_client_unread() -> None:
    """The upstream's transport told its old protocol to pause writing (its far end reads
    nothing): a transport tells only once, so the relay must start with the client unread,
    and read it on the resume. Read at once, every byte the client sends would pile up in
    the upstream's write buffer."""
    loop = asyncio.get_running_loop()
    client_end, client_side = small_socketpair()
    upstream_side, upstream_end = small_socketpair()
    client, _ = await loop.create_unix_connection(asyncio.Protocol, sock=client_side)
    upstream, before = await loop.create_unix_connection(Paused, sock=upstream_side)
    upstream.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
    upstream.write(b"u" * (2 * WRITE_BUFFER_HIGH))
    assert before.paused
    relay = Relay(client, idle_sweep=IdleSweep(loop, 60.0), owner=Results())
    relay.adopt(upstream, b"", client_write_paused=False, upstream_write_paused=True)
    relay.start(b"", False)
    sent = 0
    for _ in range(50):  # the relay would read the client meanwhile
        sent += sent_until_full(client_end, 16 * WRITE_BUFFER_HIGH - sent)
        await asyncio.sleep(0.01)
    held = upstream.get_write_buffer_size()
    assert sent < WRITE_BUFFER_HIGH, sent
    assert held <= 2 * WRITE_BUFFER_HIGH, held
    through = b""
    for _ in range(500):  # the far end reads: the upstream drains, and the client is read
        through += received(upstream_end)
        if b"c" in through:
            break
        await asyncio.sleep(0.01)
    assert through.lstrip(b"u").startswith(b"c")
    relay.cut("done")
    await asyncio.sleep(0.05)
    client_end.close()
    upstream_end.close()


@contextlib.asynccontextmanager
async def tcp_relay(
    idle_timeout: float,
) -> AsyncIterator[tuple[Relay, Results, socket.socket, socket.socket]]:
    """A relay between two TCP connections: (relay, its results, client end, upstream end)."""
    loop = asyncio.get_running_loop()
    client_end, client_side = tcp_pair()
    upstream_side, upstream_end = tcp_pair()
    results = Results()
    client, _ = await loop.create_connection(asyncio.Protocol, sock=client_side)
    relay = Relay(client, idle_sweep=IdleSweep(loop, idle_timeout), owner=results)
    await loop.create_connection(lambda: relay.upstream, sock=upstream_side)
    relay.start(b"", False)
    try:
        yield relay, results, client_end, upstream_end
    finally:
        client_end.close()
        upstream_end.close()
        if not results:
            relay.cut("test over")


async def finished(results: Results) -> RelayResult:
    while not results:
        await asyncio.sleep(0.01)
    return results[0]


@pytest.mark.asyncio
async def test_a_slow_steady_reader_is_no_idle_one() -> None:
    """Bytes the relay read long ago still leave it as the client takes them: that is
    traffic, and the idle timeout does not cut it (it counted only bytes read)."""
    data = bytes(4 << 20)
    async with (
        asyncio.timeout(10),
        tcp_relay(idle_timeout=0.4) as (_, results, client_end, upstream_end),
    ):
        sender = asyncio.ensure_future(send_and_end(upstream_end, data))
        assert await read_slowly(client_end, 16 * 1024, 0.01) == (len(data), False)
        client_end.shutdown(socket.SHUT_WR)
        await sender
        assert (await finished(results)).error == ""


@pytest.mark.asyncio
async def test_an_idle_cut_resets_a_reader_it_drops_bytes_for() -> None:
    """A client that stops reading is cut at the idle timeout; what the relay held for it
    is dropped, so it gets a reset, not an EOF that would make the stream look complete."""
    loop = asyncio.get_running_loop()
    async with (
        asyncio.timeout(10),
        tcp_relay(idle_timeout=0.4) as (_, results, client_end, upstream_end),
    ):
        flood = asyncio.ensure_future(loop.sock_sendall(upstream_end, bytes(32 << 20)))
        result = await finished(results)
        flood.cancel()
        received, reset = await read_slowly(client_end, 1 << 20, 0)
    assert result.error == "idle_timeout"
    assert reset, f"an EOF after {received} of {result.bytes_from_upstream} bytes"


@pytest.mark.asyncio
async def test_a_reset_after_the_side_s_own_eof_is_passed_on_but_is_no_failure() -> None:
    """As in the spliced relay: a client that sent its FIN and closed resets what comes
    after; it had finished, so the tunnel did not fail, and the upstream gets the reset."""
    loop = asyncio.get_running_loop()
    async with (
        asyncio.timeout(10),
        tcp_relay(idle_timeout=60) as (relay, results, client_end, upstream_end),
    ):
        await send_and_end(client_end, b"close frame")
        client_end.close()
        assert await read_to_eof(upstream_end) == b"close frame"
        await loop.sock_sendall(upstream_end, b"close frame too")
        await asyncio.sleep(0.1)  # the client's reset comes back; a write then fails with it
        await loop.sock_sendall(upstream_end, b"and more")
        result = await finished(results)
    assert relay.client.reset, "the client's kernel did not reset: the scenario did not happen"
    assert result.error == ""
