"""The lookup threads overloaded: every thread stuck in getaddrinfo, and the queue behind them
full. Route backends fail as a DNS failure does, verification fails closed without caching,
the proxy serves other traffic meanwhile, and lookups work again once the resolver answers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressproxy.lookups import LOOKUP_THREADS, QUEUED_LOOKUPS, LookupThreads
from egressproxy.settings import VerifyDestination
from egressproxy.verify import Resolver
from tests.e2e.http_servers import h1
from tests.unit.http_harness import (
    ALLOW_ALL,
    LoopbackProxy,
    echo,
    local,
    loopback_proxy,
    origin,
    proxy_to_origin,
)
from tests.unit.test_http1_proxy import POLICY, TCP_ROUTE_TO_A_NAME, read_response
from tests.unit.test_sniff_tls import client_hello, frame, sni_extension

TIMEOUT = 5.0
HUNG = ".hung.test"
"""Names under it hang in getaddrinfo until the test releases them."""


class StuckNames:
    """getaddrinfo for the lookup threads: a name under HUNG hangs until `release` (5 s at
    most); every name answers 127.0.0.1, the loopback origins' address."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int | None, *args: object) -> list[object]:
        with self._lock:
            self.calls.append(host)
        if host.removesuffix(".").endswith(HUNG):  # a verified name is asked absolute
            self.release.wait(TIMEOUT)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]


@contextlib.contextmanager
def stuck_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[StuckNames]:
    names = StuckNames()
    monkeypatch.setattr(socket, "getaddrinfo", names)  # the lookup threads' getaddrinfo
    try:
        yield names
    finally:
        names.release.set()


async def hold_every_thread(
    threads: LookupThreads, names: StuckNames
) -> list[asyncio.Task[list[str]]]:
    """One lookup of a hung name per thread, each inside getaddrinfo once this returns."""
    held = [
        asyncio.create_task(threads.addresses(f"held{number}{HUNG}", 80))
        for number in range(LOOKUP_THREADS)
    ]
    async with asyncio.timeout(TIMEOUT):
        while len(names.calls) < LOOKUP_THREADS:
            await asyncio.sleep(0.01)
    return held


async def fill_the_queue(
    threads: LookupThreads, names: StuckNames
) -> list[asyncio.Task[list[str]]]:
    """Every thread held and QUEUED_LOOKUPS lookups waiting: the next one is refused."""
    waiting = await hold_every_thread(threads, names)
    waiting += [
        asyncio.create_task(threads.addresses(f"queued{number}{HUNG}", 80))
        for number in range(QUEUED_LOOKUPS)
    ]
    await asyncio.sleep(0)  # each task queues its lookup in its first step
    with pytest.raises(socket.gaierror) as refused:
        await threads.addresses("probe.test", 80)
    assert refused.value.errno == socket.EAI_AGAIN
    return waiting


async def drained(waiting: list[asyncio.Task[list[str]]], names: StuckNames) -> None:
    """The resolver answers again: every held and queued lookup gets its answer."""
    names.release.set()
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*waiting)


async def get(proxy: LoopbackProxy, path: str, host: str = "example.test") -> tuple[int, bytes]:
    """One request on a connection of its own: status and body."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status, _, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    finally:
        writer.close()
    return status, body


@pytest.mark.asyncio
async def test_a_backend_lookup_refused_by_a_full_queue_is_a_dns_error_and_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the queue full a routed request gets 502 dns_error at once (not after the
    connect timeout), traffic that needs no lookup still passes, and once the resolver
    answers again the same route works."""
    loop = asyncio.get_running_loop()
    async with origin(h1) as origin_port, origin(h1) as backend_port:
        policy = POLICY.format(backend=backend_port).replace("127.0.0.1:", "backend.test:")
        with stuck_names(monkeypatch) as names:
            async with loopback_proxy(
                tmp_path, monkeypatch, policy, local(origin_port), connect_timeout=3.0
            ) as proxy:
                waiting = await fill_the_queue(proxy.context.resolver.threads, names)
                started = loop.time()
                refused = await get(proxy, "/routed")
                took = loop.time() - started
                passed = await get(proxy, "/other")
                await drained(waiting, names)
                routed = await get(proxy, "/routed")
                await proxy.wait_closed_flows(3)
    assert refused == (502, b"upstream dns_error\n")
    assert took < 1.0
    assert (passed[0], routed[0]) == (200, 200)
    requests = [(r.path, r.status, r.error) for r in proxy.ledger.requests]
    assert requests == [("/routed", 502, "dns_error"), ("/other", 200, ""), ("/routed", 200, "")]
    assert proxy.ledger.connect_failures == ["dns_error"]
    assert names.calls.count("backend.test") == 1


@pytest.mark.asyncio
async def test_a_spliced_route_to_a_name_refused_by_a_full_queue_is_closed_as_dns_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS connection on a TCPRoute whose backend is a Service name: closed, dns_error."""
    async with origin(echo) as port:
        with stuck_names(monkeypatch) as names:
            async with loopback_proxy(
                tmp_path, monkeypatch, TCP_ROUTE_TO_A_NAME.format(port=port), local(port)
            ) as proxy:
                waiting = await fill_the_queue(proxy.context.resolver.threads, names)
                reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                writer.write(frame(client_hello([sni_extension(b"example.test")])))
                answer = await asyncio.wait_for(reader.read(), TIMEOUT)
                writer.close()
                await proxy.wait_closed_flows(1)
                await drained(waiting, names)
    assert answer == b""
    assert [flow.error for flow in proxy.ledger.flows] == ["dns_error"]
    assert proxy.ledger.connect_failures == ["dns_error"]


@pytest.mark.asyncio
async def test_a_tls_connection_is_not_spliced_when_its_name_could_not_be_looked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under enforce, a hello whose SNI could not even be queued for lookup is closed
    unspliced, as the resolver's failure (no answer is no mismatch); the same hello once
    lookups work is spliced. (HTTP/1 and the metrics: test_verify_no_answer.py.)"""
    hello = frame(client_hello([sni_extension(b"name.test")]))
    async with proxy_to_origin(
        echo, tmp_path, monkeypatch, ALLOW_ALL, verify_destination=VerifyDestination.ENFORCE
    ) as proxy:
        with stuck_names(monkeypatch) as names:
            waiting = await fill_the_queue(proxy.context.resolver.threads, names)
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(hello)
            refused = await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
            await drained(waiting, names)
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(hello)
            spliced = await asyncio.wait_for(reader.readexactly(len(hello)), TIMEOUT)
            writer.close()
            await proxy.wait_closed_flows(2)
    assert (refused, spliced) == (b"", hello)
    assert [flow.error for flow in proxy.ledger.flows] == ["dns_error", ""]
    assert proxy.ledger.unconfirmed == [("dns_error", "name.test", "enforce", 1)]


@pytest.mark.asyncio
async def test_names_behind_hung_lookups_get_their_timeouts_then_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every thread stuck on other names: a routed request gets its 504 dns_timeout within
    --connect-timeout, and a verified one fails closed within the resolver's timeout. Once
    the threads are free, the abandoned lookup is skipped and both names resolve."""
    loop = asyncio.get_running_loop()
    async with origin(h1) as origin_port, origin(h1) as backend_port:
        policy = POLICY.format(backend=backend_port).replace("127.0.0.1:", "backend.test:")
        with stuck_names(monkeypatch) as names:
            async with loopback_proxy(
                tmp_path,
                monkeypatch,
                policy,
                local(origin_port),
                connect_timeout=0.3,
                verify_destination=VerifyDestination.ENFORCE,
            ) as proxy:
                proxy.context.resolver = Resolver(timeout=0.3)
                held = await hold_every_thread(proxy.context.resolver.threads, names)
                started = loop.time()
                routed = await get(proxy, "/routed")
                verified = await get(proxy, "/", host="name.test")
                took = loop.time() - started
                await drained(held, names)
                answers = [await get(proxy, "/routed"), await get(proxy, "/", host="name.test")]
                await proxy.wait_closed_flows(4)
    assert (routed, verified[0]) == ((504, b"upstream dns_timeout\n"), 421)
    assert verified[1] == b"destination could not be verified: no answer from the resolver\n"
    assert 0.5 <= took < 3.0
    assert [status for status, _ in answers] == [200, 200]
    assert (names.calls.count("backend.test"), names.calls.count("name.test.")) == (1, 1)


def test_close_with_a_full_queue_tells_the_waiters_and_ends_the_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() with a full queue: each dropped lookup's waiter gets EAI_AGAIN instead of
    waiting forever, and every thread ends once getaddrinfo lets it go."""

    def lookup_threads() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name.startswith("lookup-")}

    async def scenario(names: StuckNames) -> tuple[list[int | None], set[threading.Thread]]:
        before = lookup_threads()
        threads = LookupThreads()
        waiting = await fill_the_queue(threads, names)
        started = lookup_threads() - before
        threads.close()
        async with asyncio.timeout(TIMEOUT):
            dropped = await asyncio.gather(*waiting[LOOKUP_THREADS:], return_exceptions=True)
        names.release.set()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*waiting[:LOOKUP_THREADS])
        errors = [error.errno for error in dropped if isinstance(error, socket.gaierror)]
        return errors, started

    with stuck_names(monkeypatch) as names:
        errors, started = asyncio.run(scenario(names))
    assert errors == [socket.EAI_AGAIN] * QUEUED_LOOKUPS
    assert len(started) == LOOKUP_THREADS
    for thread in started:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in started)
