"""The connect deadline of upstream.connect: its own expiry is connect_timeout, anyone
else's cancellation stays a cancellation (as with asyncio.timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator

import pytest
import uvloop

from egressproxy import lookups as lookups_module
from egressproxy import upstream
from egressproxy.errors import UpstreamError
from egressproxy.lookups import LookupThreads
from egressproxy.splice import Splicer
from egressproxy.timeouts import TimeoutQueue
from tests.unit.http_harness import names_never_resolve


@contextlib.contextmanager
def listener_that_never_answers() -> Iterator[int]:
    """A loopback listener whose accept queue is full: the kernel drops further SYNs,
    so a connect to it hangs until someone gives up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_a_connect_that_hangs_ends_as_connect_timeout_in_time() -> None:
    async def scenario() -> tuple[str, float, bool]:
        loop = asyncio.get_running_loop()
        with listener_that_never_answers() as port:
            started = loop.time()
            async with asyncio.timeout(5.0):  # bounds the test if the deadline never fires
                with pytest.raises(UpstreamError) as raised:
                    await upstream.connect(
                        "127.0.0.1",
                        port,
                        asyncio.Protocol,
                        timeouts=TimeoutQueue(loop, 0.3),
                        mark=None,
                        connector=loop.sock_connect,
                        lookups=LookupThreads(),
                    )
            task = asyncio.current_task()
            assert task is not None
            return raised.value.kind, loop.time() - started, task.cancelling() == 0

    kind, took, not_cancelling = uvloop.run(scenario())
    assert kind == "connect_timeout"
    assert 0.25 <= took < 2.0
    assert not_cancelling, "the deadline's own cancel is taken back"


def test_a_spliced_connect_that_hangs_ends_as_connect_timeout_and_leaves_no_waiter() -> None:
    """The same for the socket a splice opens, waited for in the splicer's epoll set."""

    async def scenario() -> tuple[str, float, int]:
        loop = asyncio.get_running_loop()
        splicer = Splicer(loop)
        try:
            with listener_that_never_answers() as port:
                started = loop.time()
                async with asyncio.timeout(5.0):
                    with pytest.raises(UpstreamError) as raised:
                        await upstream.open_socket(
                            "127.0.0.1",
                            port,
                            timeouts=TimeoutQueue(loop, 0.3),
                            mark=None,
                            connector=splicer.connect,
                            lookups=LookupThreads(),
                        )
                return raised.value.kind, loop.time() - started, len(splicer.connecting)
        finally:
            splicer.close()

    kind, took, waiting = uvloop.run(scenario())
    assert kind == "connect_timeout"
    assert 0.25 <= took < 2.0
    assert waiting == 0


def test_a_cancel_from_outside_is_not_a_timeout() -> None:
    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        with listener_that_never_answers() as port:
            attempt = loop.create_task(
                upstream.connect(
                    "127.0.0.1",
                    port,
                    asyncio.Protocol,
                    timeouts=TimeoutQueue(loop, 30.0),
                    mark=None,
                    connector=loop.sock_connect,
                    lookups=LookupThreads(),
                )
            )
            await asyncio.sleep(0.1)
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await attempt
            return attempt.cancelled()

    assert uvloop.run(scenario())


def test_a_name_that_never_resolves_ends_as_dns_timeout_within_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connect timeout covers resolving a route's backend name and connecting to it."""

    async def scenario() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        lookups = LookupThreads()
        started = loop.time()
        try:
            async with asyncio.timeout(5.0):
                with pytest.raises(UpstreamError) as raised:
                    await upstream.connect(
                        "backend.example.test",
                        80,
                        asyncio.Protocol,
                        timeouts=TimeoutQueue(loop, 0.3),
                        mark=None,
                        connector=loop.sock_connect,
                        lookups=lookups,
                    )
        finally:
            lookups.close()
        return raised.value.kind, loop.time() - started

    with names_never_resolve(monkeypatch):
        kind, took = uvloop.run(scenario())
    assert kind == "dns_timeout"
    assert 0.25 <= took < 2.0


@pytest.mark.parametrize("spliced", [False, True])
def test_a_backend_name_with_several_addresses_connects_to_the_first_that_answers(
    monkeypatch: pytest.MonkeyPatch, spliced: bool
) -> None:
    """A route's backend may resolve to several addresses (a headless Service): one that
    refuses is skipped within the connect timeout; when all refuse, that is the error."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    answers = {
        "backend.example.test": ["127.0.0.2", "127.0.0.1"],
        "nobody.example.test": ["127.0.0.2", "127.0.0.3"],
    }
    monkeypatch.setattr(lookups_module, "stream_addresses", lambda host, _: answers[host])

    async def scenario(host: str) -> str:
        loop = asyncio.get_running_loop()
        lookups, splicer = LookupThreads(), Splicer(loop)
        options = {"timeouts": TimeoutQueue(loop, 2.0), "mark": None, "lookups": lookups}
        try:
            async with asyncio.timeout(5.0):
                if spliced:
                    sock = await upstream.open_socket(
                        host, port, connector=splicer.connect, **options
                    )
                    peer = sock.getpeername()[0]
                    sock.close()
                    return str(peer)
                transport, _ = await upstream.connect(
                    host, port, asyncio.Protocol, connector=loop.sock_connect, **options
                )
                peer = transport.get_extra_info("peername")[0]
                transport.close()
                return str(peer)
        except UpstreamError as error:
            return error.kind
        finally:
            splicer.close()
            lookups.close()

    try:
        assert uvloop.run(scenario("backend.example.test")) == "127.0.0.1"
        assert uvloop.run(scenario("nobody.example.test")) == "connect_refused"
    finally:
        server.close()


def test_an_address_no_source_port_can_reach_is_skipped_for_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where IPv6 is disabled, every source port fails alike for a backend's IPv6 address
    (EADDRNOTAVAIL): that ended the connect as no_source_port, the next address (IPv4)
    never tried. Here the first address's refusals stand for that."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    monkeypatch.setattr(
        lookups_module, "stream_addresses", lambda host, _: ["127.0.0.2", "127.0.0.1"]
    )
    monkeypatch.setattr(upstream, "SOURCE_PORT_TAKEN", (errno.ECONNREFUSED,))

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        lookups = LookupThreads()
        try:
            async with asyncio.timeout(5.0):
                transport, _ = await upstream.connect(
                    "dual.example.test", port, asyncio.Protocol, timeouts=TimeoutQueue(loop, 2.0),
                    mark=None, connector=loop.sock_connect, lookups=lookups,
                )  # fmt: skip
            peer = str(transport.get_extra_info("peername")[0])
            transport.close()
            return peer
        finally:
            lookups.close()

    try:
        assert uvloop.run(scenario()) == "127.0.0.1"
    finally:
        server.close()


def test_an_address_that_drops_packets_leaves_the_next_its_share_of_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A headless Service whose first endpoint is gone (its packets dropped): that
    address used up the whole connect timeout and the next was never tried. Each address
    but the last now gets an equal share of the time left."""
    with listener_that_never_answers() as port:
        server = socket.socket()
        server.bind(("127.0.0.2", port))
        server.listen(4)
        monkeypatch.setattr(
            lookups_module, "stream_addresses", lambda host, _: ["127.0.0.1", "127.0.0.2"]
        )

        async def scenario() -> tuple[str, float]:
            loop = asyncio.get_running_loop()
            lookups = LookupThreads()
            started = loop.time()
            try:
                async with asyncio.timeout(5.0):
                    transport, _ = await upstream.connect(
                        "headless.example.test", port, asyncio.Protocol,
                        timeouts=TimeoutQueue(loop, 1.0), mark=None,
                        connector=loop.sock_connect, lookups=lookups,
                    )  # fmt: skip
                peer = str(transport.get_extra_info("peername")[0])
                transport.close()
                return peer, loop.time() - started
            finally:
                lookups.close()

        try:
            peer, took = uvloop.run(scenario())
        finally:
            server.close()
    assert peer == "127.0.0.2"
    assert 0.4 <= took < 0.9
