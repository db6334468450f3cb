"""The spliced relay (splice.SplicedRelay) between real TCP sockets on 127.0.0.1: bytes
exact both ways, backpressure, half-close, resets, idle timeout, no pipe to be had."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop

from egressproxy import splice
from egressproxy.relay import RelayResult
from egressproxy.splice import Pipes, SplicedRelay, Splicer
from egressproxy.timeouts import IdleSweep

TIMEOUT = 10.0
LONG_IDLE = 60.0
SHORT_IDLE = 0.4
CHUNK = 64 * 1024
RESET_ON_CLOSE = struct.pack("ii", 1, 0)

Result = TypeVar("Result")


def run(scenario: Coroutine[Any, Any, Result]) -> Result:
    return uvloop.run(asyncio.wait_for(scenario, TIMEOUT))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the test's end, the relay's end) of one TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # as the proxy's
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    outer.setblocking(False)
    inner.setblocking(False)
    return outer, inner


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Spliced:
    """A relay between a client and an upstream the test plays, and what it reported."""

    relay: SplicedRelay
    splicer: Splicer
    client: socket.socket
    upstream: socket.socket
    results: list[RelayResult] = field(default_factory=list)

    def relayed(self, result: RelayResult) -> None:
        self.results.append(result)

    async def finished(self) -> RelayResult:
        while not self.results:
            await asyncio.sleep(0.01)
        return self.results[0]


@contextlib.asynccontextmanager
async def spliced(
    first_bytes: bytes = b"",
    client_eof: bool = False,
    idle_timeout: float = LONG_IDLE,
    max_pipes: int = splice.MAX_PIPES,
) -> AsyncIterator[Spliced]:
    loop = asyncio.get_running_loop()
    splicer = Splicer(loop, max_pipes)
    client, client_inner = tcp_pair()
    upstream, upstream_inner = tcp_pair()
    sweep = IdleSweep(loop, idle_timeout)
    world = Spliced(None, splicer, client, upstream)  # type: ignore[arg-type]
    world.relay = SplicedRelay(
        client_inner, upstream_inner, splicer=splicer, idle_sweep=sweep, owner=world
    )
    world.relay.start(first_bytes, client_eof)
    try:
        yield world
    finally:
        client.close()
        upstream.close()
        world.relay.abort("test over")
        splicer.close()


async def read_to_eof(sock: socket.socket, pause: float = 0.0) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(sock, CHUNK):
        chunks.append(data)
        if pause:
            await asyncio.sleep(pause)
    return b"".join(chunks)


async def send_and_end(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


def test_bytes_cross_exactly_both_ways_with_the_first_bytes_first() -> None:
    out, back = os.urandom(8 << 20), os.urandom(6 << 20)

    async def scenario() -> tuple[bytes, bytes, RelayResult]:
        async with spliced(first_bytes=b"hello") as world:
            received = await asyncio.gather(
                send_and_end(world.client, out),
                read_to_eof(world.upstream),
                send_and_end(world.upstream, back),
                read_to_eof(world.client),
            )
            return received[1], received[3], await world.finished()

    at_upstream, at_client, result = run(scenario())
    assert hashlib.sha256(at_upstream).digest() == hashlib.sha256(b"hello" + out).digest()
    assert hashlib.sha256(at_client).digest() == hashlib.sha256(back).digest()
    assert result == RelayResult(len(out) + 5, len(back), "")


def test_one_direction_ends_and_the_other_goes_on() -> None:
    """Half-close: the client's EOF reaches the upstream, whose answer still comes back."""

    async def scenario() -> tuple[bytes, bytes, RelayResult]:
        async with spliced(first_bytes=b"request", client_eof=True) as world:
            request = await read_to_eof(world.upstream)
            await send_and_end(world.upstream, b"answer" * 1000)
            return request, await read_to_eof(world.client), await world.finished()

    request, answer, result = run(scenario())
    assert (request, answer) == (b"request", b"answer" * 1000)
    assert result == RelayResult(7, 6000, "")


URGENT_QUIET = 0.3
URGENT_CPU = 0.1
"""CPU the test process may use over URGENT_QUIET of waiting: a relay stuck at the urgent
mark used all of it, its epoll reporting the socket again at once."""


def test_tcp_urgent_data_crosses_in_its_place_without_spinning() -> None:
    """splice(2) stops at TCP's urgent mark; the byte there (telnet's and some database
    clients' cancel) goes on inline, and neither the relay spins nor a FIN after it cuts
    the bytes behind it off."""

    async def send_urgent(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"abc")
        await asyncio.sleep(0.05)
        sock.send(b"D", socket.MSG_OOB)
        await loop.sock_sendall(sock, b"efg")

    async def scenario() -> tuple[bytes, bytes, float, RelayResult]:
        async with spliced() as world:
            await send_urgent(world.client)
            await send_urgent(world.upstream)
            started = time.process_time()
            await asyncio.sleep(URGENT_QUIET)
            spent = time.process_time() - started
            world.client.shutdown(socket.SHUT_WR)
            world.upstream.shutdown(socket.SHUT_WR)
            at_upstream, at_client = await asyncio.gather(
                read_to_eof(world.upstream), read_to_eof(world.client)
            )
            return at_upstream, at_client, spent, await world.finished()

    at_upstream, at_client, spent, result = run(scenario())
    assert (at_upstream, at_client) == (b"abcDefg", b"abcDefg")
    assert spent < URGENT_CPU
    assert result == RelayResult(7, 7, "")


def test_a_slow_reader_holds_the_writer_back_without_buffering() -> None:
    data = os.urandom(32 << 20)

    async def scenario() -> tuple[bool, bool, bytes]:
        async with spliced() as world:
            sender = asyncio.ensure_future(send_and_end(world.upstream, data))
            await asyncio.sleep(0.5)
            holding = world.relay.upstream
            bounded = holding.in_pipe <= splice.PIPE_SIZE and not holding.pending
            blocked = not sender.done()
            received = await read_to_eof(world.client)
            await sender
            return bounded, blocked, received

    bounded, blocked, received = run(scenario())
    assert blocked, "32 MiB cannot all be in flight while the client reads nothing"
    assert bounded, "the relay holds no more than one pipe of what the client has not taken"
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


async def read_to_reset(sock: socket.socket) -> tuple[int, bool]:
    """How many bytes came, and whether they ended in a reset (else an EOF)."""
    loop = asyncio.get_running_loop()
    received = 0
    try:
        while data := await loop.sock_recv(sock, CHUNK):
            received += len(data)
    except ConnectionResetError:
        return received, True
    return received, False


@pytest.mark.parametrize("max_pipes", [splice.MAX_PIPES, 0])
@pytest.mark.parametrize("resetting", ["reader", "writer"])
def test_a_reset_while_the_relay_is_held_back_reaches_the_other_side_as_one(
    resetting: str, max_pipes: int
) -> None:
    """The client stops reading and the upstream fills every buffer (or the other way
    round), then one of them resets. The relay polls the reader's socket for room, but the
    writer's for nothing at all (its reading is paused): only our own epoll set still
    reports that one's reset, as a hang-up with an error. The other side then gets every
    byte the relay read from the one that reset (in a pipe, in its copy, in the kernel's
    queues), and after them a reset, not an EOF."""

    async def scenario() -> tuple[RelayResult, int, bool]:
        loop = asyncio.get_running_loop()
        async with spliced(max_pipes=max_pipes) as world:
            flood = asyncio.ensure_future(loop.sock_sendall(world.upstream, bytes(64 << 20)))
            await asyncio.sleep(0.5)
            gone, other = (
                (world.client, world.upstream)
                if resetting == "reader"
                else (world.upstream, world.client)
            )
            flood.cancel()
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            gone.close()
            reading = asyncio.ensure_future(read_to_reset(other))
            result = await world.finished()
            received, reset = await reading
            return result, received, reset

    result, received, reset = run(scenario())
    assert result.error == "reset"
    assert reset, "the other side saw an EOF: a cut stream would look complete"
    if resetting == "writer":
        assert received == result.bytes_from_upstream > 0
    else:
        assert received == 0


@pytest.mark.parametrize("max_pipes", [splice.MAX_PIPES, 0])
def test_a_reset_after_the_side_s_own_eof_is_passed_on_but_is_no_failure(
    max_pipes: int,
) -> None:
    """curl ends TLS with its close_notify and FIN and a close at once: the server's
    close_notify then meets a closed socket, whose kernel resets. The client had sent all
    it meant to, so the connection did not fail (error empty); a client reset before its
    EOF is still one (the test above)."""

    async def scenario() -> tuple[bytes, RelayResult, bool]:
        loop = asyncio.get_running_loop()
        async with spliced(max_pipes=max_pipes) as world:
            await send_and_end(world.client, b"close_notify")
            world.client.close()
            came = await read_to_eof(world.upstream)
            await loop.sock_sendall(world.upstream, b"close_notify too")
            result = await world.finished()
            return came, result, world.relay.client.reset

    came, result, client_reset = run(scenario())
    assert came == b"close_notify"
    assert client_reset, "the client's kernel did not reset: the scenario did not happen"
    assert (result.error, result.bytes_from_client) == ("", len(came))


def test_pipes_are_lent_up_to_their_limit_and_pooled() -> None:
    pipes = Pipes(limit=1)
    lent = pipes.take()
    assert lent is not None
    assert pipes.take() is None, "past the limit a direction copies"
    pipes.give(lent)
    assert pipes.take() == lent, "an empty pipe given back is lent again"
    pipes.give(lent, empty=False)
    assert pipes.open == 0
    with pytest.raises(OSError):
        os.fstat(lent[0])


def test_without_a_pipe_to_be_had_bytes_are_copied() -> None:
    out, back = os.urandom(3 << 20), os.urandom(2 << 20)

    async def scenario() -> tuple[bytes, bytes, RelayResult]:
        async with spliced(max_pipes=0) as world:
            received = await asyncio.gather(
                send_and_end(world.client, out),
                read_to_eof(world.upstream, pause=0.001),
                send_and_end(world.upstream, back),
                read_to_eof(world.client),
            )
            return received[1], received[3], await world.finished()

    at_upstream, at_client, result = run(scenario())
    assert (at_upstream, at_client) == (out, back)
    assert result == RelayResult(len(out), len(back), "")


def test_a_side_that_hung_up_is_not_polled_while_the_other_drains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP/1.0 style: the client ends its request, the upstream answers and closes, and
    the client reads slowly. The upstream's socket hangs up (both directions over) while
    its bytes still wait for the client: polling it would wake the loop without end."""
    events = 0
    ready = SplicedRelay.ready

    def counted(relay: SplicedRelay, side: Any, mask: int) -> None:
        nonlocal events
        events += 1
        ready(relay, side, mask)

    monkeypatch.setattr(SplicedRelay, "ready", counted)
    answer = os.urandom(32 << 20)

    async def scenario() -> tuple[bytes, RelayResult]:
        async with spliced(first_bytes=b"GET / HTTP/1.0\r\n\r\n", client_eof=True) as world:
            await read_to_eof(world.upstream)

            async def answer_and_close() -> None:
                await asyncio.get_running_loop().sock_sendall(world.upstream, answer)
                world.upstream.close()

            closing = asyncio.ensure_future(answer_and_close())
            received = await read_to_eof(world.client, pause=0.002)
            await closing
            return received, await world.finished()

    received, result = run(scenario())
    assert received == answer
    assert result.error == ""
    assert events < 5000, f"{events} events for {len(answer) // CHUNK} reads: the loop spun"


def test_a_pipe_is_lent_only_while_bytes_are_in_flight() -> None:
    """After a transfer, and after a wake-up that brought nothing, no pipe stays lent."""

    async def scenario() -> tuple[bool, bool, bytes]:
        loop = asyncio.get_running_loop()
        async with spliced() as world:
            relay = world.relay
            await loop.sock_sendall(world.client, b"x" * 100_000)
            echoed = b""
            while len(echoed) < 100_000:
                echoed += await loop.sock_recv(world.upstream, CHUNK)
            after_bytes = relay.client.pipe is None and relay.upstream.pipe is None
            relay.ready(relay.client, select.EPOLLIN)
            after_nothing = relay.client.pipe is None
            await loop.sock_sendall(world.client, b"still here")
            return after_bytes, after_nothing, await loop.sock_recv(world.upstream, CHUNK)

    after_bytes, after_nothing, still = run(scenario())
    assert after_bytes
    assert after_nothing, "a wake-up with nothing to read returns the pipe it took"
    assert still == b"still here"


def test_an_idle_relay_closes_both_sides() -> None:
    async def scenario() -> tuple[RelayResult, bytes, bytes]:
        async with spliced(idle_timeout=SHORT_IDLE) as world:
            result = await world.finished()
            return result, await read_to_eof(world.client), await read_to_eof(world.upstream)

    result, client_rest, upstream_rest = run(scenario())
    assert result == RelayResult(0, 0, "idle_timeout")
    assert client_rest == upstream_rest == b""


def test_the_last_relay_to_close_takes_the_pooled_pipes_along() -> None:
    async def scenario() -> tuple[int, int, int]:
        before = open_fds()
        async with spliced() as world:
            await asyncio.gather(
                send_and_end(world.client, bytes(1 << 20)),
                read_to_eof(world.upstream),
                send_and_end(world.upstream, bytes(1 << 20)),
                read_to_eof(world.client),
            )
            await world.finished()
            pooled = len(world.splicer.pipes.idle)
        return before, open_fds(), pooled

    before, after, pooled = run(scenario())
    assert pooled == 0
    assert after == before


async def read_slowly(sock: socket.socket, size: int, every: float) -> tuple[int, bool]:
    """Read at most `size` bytes every `every` seconds: how many came, and whether they
    ended in a reset (else an EOF)."""
    received = 0
    while True:
        try:
            data = sock.recv(size)
        except BlockingIOError:
            data = None
        except ConnectionResetError:
            return received, True
        if data == b"":
            return received, False
        received += len(data or b"")
        await asyncio.sleep(every)


def test_a_slow_steady_reader_is_no_idle_one() -> None:
    """Bytes the relay read long ago still leave it as the client takes them: that is
    traffic, and the idle timeout does not cut it (it counted only bytes read, and cut a
    reader slower than a pipe per timeout)."""
    data = os.urandom(4 << 20)

    async def scenario() -> tuple[RelayResult, int, bool]:
        async with spliced(idle_timeout=SHORT_IDLE) as world:
            sender = asyncio.ensure_future(send_and_end(world.upstream, data))
            received, reset = await read_slowly(world.client, 16 * 1024, 0.01)
            world.client.shutdown(socket.SHUT_WR)
            await sender
            return await world.finished(), received, reset

    result, received, reset = run(scenario())
    assert (received, reset) == (len(data), False)
    assert result.error == ""


def test_an_idle_cut_resets_a_reader_it_drops_bytes_for() -> None:
    """A client that stops reading is cut at the idle timeout; what the relay held for it
    is dropped, so it gets a reset, not an EOF that would make the stream look complete."""

    async def scenario() -> tuple[RelayResult, int, bool]:
        loop = asyncio.get_running_loop()
        async with spliced(idle_timeout=SHORT_IDLE) as world:
            flood = asyncio.ensure_future(loop.sock_sendall(world.upstream, bytes(32 << 20)))
            result = await world.finished()
            flood.cancel()
            return result, *await read_to_reset(world.client)

    result, received, reset = run(scenario())
    assert result.error == "idle_timeout"
    assert reset, f"an EOF after {received} of {result.bytes_from_upstream} bytes"
