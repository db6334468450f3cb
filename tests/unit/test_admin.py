"""The admin server: a scraper reusing one connection is never cut mid-use, a client that
does not read is not answered ahead, and slow answers are made off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from egressproxy import admin, metrics
from egressproxy.policy.store import PolicyStore
from egressproxy.settings import Endpoint, Settings

IDLE_TIMEOUT = 1.0
REQUESTS = 5
GAP = 0.3
"""REQUESTS x GAP is well past IDLE_TIMEOUT; each gap is well inside it."""
CLOSE_WAIT = 10.0

LIVE = b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n"


@contextlib.asynccontextmanager
async def admin_port(handlers: admin.Handlers) -> AsyncIterator[int]:
    """An admin server on a free loopback port, closed on the way out."""
    server = await admin.start_admin(admin.bind_admin(Endpoint("127.0.0.1", 0)), handlers)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def live_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_WAIT)
    return head + await asyncio.wait_for(reader.readexactly(len(b"live\n")), CLOSE_WAIT)


def test_keep_alive_times_out_after_the_last_request_not_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin.AdminConnection, "idle_timeout", IDLE_TIMEOUT)

    async def scenario() -> None:
        async with admin_port({"/live": lambda _: admin.text(200, "live")}) as port:
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

    asyncio.run(scenario())


BIG_BODY = 256 * 1024
PIPELINED = 100
MADE_UNREAD = 40
"""Answers the kernel's socket buffers take on loopback (about 4 MiB) and one more."""
BIG = b"GET /big HTTP/1.1\r\nHost: admin\r\n\r\n"


@pytest.mark.parametrize(
    "served", [lambda handler: handler, admin.OffLoop], ids=["on-the-loop", "off-the-loop"]
)
def test_pipelined_requests_are_answered_only_as_the_client_reads(
    monkeypatch: pytest.MonkeyPatch,
    served: Callable[[admin.Handler], admin.Handler | admin.OffLoop],
) -> None:
    """A client that sends many scrapes and reads nothing gets no more answers made than
    its socket takes (they were all made at once, each body held, the loop busy); once it
    reads, every answer comes, in order; left unread past the idle timeout, the answers are
    dropped with the connection (a close kept them until the client read them)."""
    monkeypatch.setattr(admin.AdminConnection, "idle_timeout", IDLE_TIMEOUT)
    made: list[int] = []

    def big(_: dict[str, str]) -> admin.Response:
        made.append(len(made))
        return admin.Response(200, "text/plain", b"%08d" % len(made) + b"x" * (BIG_BODY - 8))

    async def scenario() -> tuple[int, int, list[bytes], int]:
        async with admin_port({"/big": served(big)}) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(BIG * PIPELINED)
            await asyncio.sleep(0.3)
            unread = len(made)
            answers = []
            for _ in range(PIPELINED):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_WAIT)
                answers.append(
                    (await asyncio.wait_for(reader.readexactly(BIG_BODY), CLOSE_WAIT))[:8]
                )
            read = len(made)
            writer.write(BIG * PIPELINED)
            await asyncio.sleep(IDLE_TIMEOUT * 2)
            after_idle = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(reader.read(1 << 20), CLOSE_WAIT):
                    after_idle += len(chunk)
            writer.close()
            return unread, read, answers, after_idle

    unread, read, answers, after_idle = asyncio.run(scenario())
    assert unread < MADE_UNREAD
    assert read == PIPELINED
    assert answers == [b"%08d" % (index + 1) for index in range(PIPELINED)]
    assert after_idle < MADE_UNREAD * BIG_BODY, "the unread answers were kept for the client"


METRICS = b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_WAIT)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), CLOSE_WAIT)


def test_a_slow_scrape_leaves_the_loop_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics is made in a thread: with one worker the admin server shares the data
    plane's loop, and a scrape of many series (150 ms at the default hostname cap) held
    it. While a scrape is held in the making, /live is answered; then the scrape comes."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\n"
        "metadata: {name: all}\nspec: {default: allow}\n"
    )
    store = PolicyStore(Settings(policy_file=policy), on_reload=lambda _: None)
    store.load_initial()
    registry = CollectorRegistry()
    Counter("scraped", "a sample to find", registry=registry).inc()
    began, release, made = threading.Event(), threading.Event(), threading.Event()
    loop_thread = threading.get_ident()
    scrape_threads: list[int] = []
    real_exposition = metrics.exposition

    def held_exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
        scrape_threads.append(threading.get_ident())
        began.set()
        release.wait(GATE)
        made.set()
        return real_exposition(registry, accept)

    monkeypatch.setattr(metrics, "exposition", held_exposition)

    async def until(event: threading.Event) -> None:
        for _ in range(int(CLOSE_WAIT / POLL)):
            if event.is_set():
                return
            await asyncio.sleep(POLL)
        raise AssertionError("the scrape never began")

    async def scenario() -> tuple[bool, bytes, bytes]:
        handlers = admin.base_handlers(admin.Health(listening=True), store, registry)
        async with admin_port(handlers) as port:
            scraper_reader, scraper = await asyncio.open_connection("127.0.0.1", port)
            prober_reader, prober = await asyncio.open_connection("127.0.0.1", port)
            try:
                scraper.write(METRICS)
                await until(began)
                prober.write(LIVE)
                live = await live_response(prober_reader)
                made_before_live = made.is_set()
                release.set()
                head, body = await read_answer(scraper_reader)
                return made_before_live, live, head + body
            finally:
                release.set()
                scraper.close()
                prober.close()

    made_before_live, live, scrape = asyncio.run(scenario())
    assert live.startswith(b"HTTP/1.1 200 ") and live.endswith(b"live\n")
    assert not made_before_live, "/live waited for the scrape"
    assert scrape_threads and scrape_threads[0] != loop_thread
    head, body = scrape.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples["scraped_total"] == 1.0


GATE = 5.0
"""How long a held scrape waits to be released; the old code, which made it on the loop,
held /live that long."""
POLL = 0.01
CONCURRENT = 6


def test_slow_answers_are_made_one_at_a_time_and_a_failure_is_a_500() -> None:
    """A burst of scrapes holds one thread and one answer in the making, not one each, and
    every client gets its own answer, one that half-closes after its request too; a handler
    that raises answers 500 and the connection goes on serving."""
    lock = threading.Lock()
    making = [0]
    most = [0]
    served = [0]

    def slow(_: dict[str, str]) -> admin.Response:
        with lock:
            making[0] += 1
            most[0] = max(most[0], making[0])
        threading.Event().wait(0.05)
        with lock:
            making[0] -= 1
            served[0] += 1
            number = served[0]
        return admin.text(200, f"answer {number}")

    def broken(_: dict[str, str]) -> admin.Response:
        raise OSError("a multiprocess file vanished")

    handlers: admin.Handlers = {
        "/metrics": admin.OffLoop(slow),
        "/broken": admin.OffLoop(broken),
        "/live": lambda _: admin.text(200, "live"),
    }

    async def scenario() -> tuple[list[bytes], bytes, bytes, bytes]:
        async with admin_port(handlers) as port:
            clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONCURRENT)]
            for _, writer in clients:
                writer.write(METRICS)
            answers = [(await read_answer(reader))[1] for reader, _ in clients]
            half_closed_reader, half_closer = clients[1]
            half_closer.write(METRICS)
            half_closer.write_eof()
            half_closed = await asyncio.wait_for(half_closed_reader.read(), CLOSE_WAIT)
            reader, writer = clients[0]
            writer.write(b"GET /broken HTTP/1.1\r\nHost: admin\r\n\r\n")
            failed_head, _ = await read_answer(reader)
            writer.write(LIVE)
            live = await live_response(reader)
            for _, writer in clients:
                writer.close()
            return answers, half_closed, failed_head, live

    answers, half_closed, failed_head, live = asyncio.run(scenario())
    assert most[0] == 1
    assert sorted(answers) == sorted(b"answer %d\n" % n for n in range(1, CONCURRENT + 1))
    assert half_closed.startswith(b"HTTP/1.1 200 ")
    assert half_closed.endswith(b"answer %d\n" % (CONCURRENT + 1))
    assert failed_head.startswith(b"HTTP/1.1 500 ")
    assert live.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/metrics", "/metrics"),
        ("/metrics?name[]=x", "/metrics"),
        ("http://127.0.0.1:4191/ready", "/ready"),
        ("http://admin/live?x=1", "/live"),
        ("http://admin", "/"),
        ("*", "*"),
        ("http://x]/ready", ""),
        ("http://[::1/ready", ""),
    ],
)
def test_an_absolute_form_target_is_read_for_its_path(target: str, path: str) -> None:
    """RFC 9112 3.2.2: a server must accept the absolute form (a client that thinks it talks
    to a proxy sends it); it was a 404. An unbalanced bracket names no path (404): urlsplit
    raised, and the connection went unanswered, a traceback logged for each request."""
    assert admin.admin_path(target) == path


def test_a_target_with_an_unbalanced_bracket_is_answered_404() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        async with admin_port({"/live": lambda _: admin.text(200, "live")}) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET http://x]/live HTTP/1.1\r\nHost: admin\r\n\r\n")
            writer.write(b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_WAIT)
            length = int(re.search(rb"content-length: (\d+)", head.lower())[1])  # type: ignore[index]
            unknown = head + await asyncio.wait_for(reader.readexactly(length), CLOSE_WAIT)
            live = await live_response(reader)
            writer.close()
            return unknown, live

    unknown, live = asyncio.run(scenario())
    assert unknown.startswith(b"HTTP/1.1 404 "), unknown
    assert live.startswith(b"HTTP/1.1 200 "), "the connection is still served"


def test_repeated_header_lines_reach_a_handler_as_one_list() -> None:
    """RFC 9110 5.3: `Accept: text/plain` and `Accept: application/openmetrics-text;q=0.1`
    on two lines are one list; only the last reached the scrape, which then chose
    OpenMetrics."""

    def echo(headers: dict[str, str]) -> admin.Response:
        return admin.text(200, headers["accept"])

    async def scenario() -> bytes:
        async with admin_port({"/echo": echo}) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /echo HTTP/1.1\r\nHost: admin\r\nAccept: text/plain\r\n"
                b"Accept: application/openmetrics-text;q=0.1\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.readuntil(b"q=0.1\n"), CLOSE_WAIT)
            writer.close()
            return answer

    answer = asyncio.run(scenario())
    assert answer.endswith(b"\r\n\r\ntext/plain, application/openmetrics-text;q=0.1\n"), answer


def test_a_method_not_allowed_says_which_are() -> None:
    """RFC 9110 15.5.6: a 405 MUST carry Allow."""

    async def scenario() -> bytes:
        async with admin_port({"/live": lambda _: admin.text(200, "live")}) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /live HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_WAIT)
            writer.close()
            return head

    head = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 405 ") and b"\r\nallow: GET, HEAD\r\n" in head, head


def test_an_absolute_form_request_is_answered() -> None:
    async def scenario() -> bytes:
        async with admin_port({"/live": lambda _: admin.text(200, "live")}) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET http://admin/live HTTP/1.1\r\nHost: admin\r\n\r\n")
            answer = await live_response(reader)
            writer.close()
            return answer

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"live\n"), answer


def test_past_the_cap_a_new_admin_connection_takes_the_longest_idle_ones_place() -> None:
    """Admin connections shared the descriptor reserve with nothing to bound them: a few
    hundred idle ones (each kept up to 10 s) filled it, and the data plane's clients were
    then accepted and closed unseen. At the cap every newcomer was closed, so 32 idle
    connections, reopened as they were closed, shut the kubelet's probes out for good: now
    a newcomer takes the place of the connection that has waited longest for a request,
    and the others held stay served."""

    async def scenario() -> tuple[bytes, bytes, bytes]:
        async with admin_port({"/live": lambda _: admin.text(200, "live")}) as port:
            held = [
                await asyncio.open_connection("127.0.0.1", port)
                for _ in range(admin.MAX_ADMIN_CONNECTIONS)
            ]
            reader, writer = held[0]
            writer.write(LIVE)  # the first held now waits since its answer: not the longest
            await live_response(reader)
            probe_reader, probe_writer = await asyncio.open_connection("127.0.0.1", port)
            probe_writer.write(LIVE)
            probe = await live_response(probe_reader)
            evicted = await asyncio.wait_for(held[1][0].read(), CLOSE_WAIT)
            writer.write(LIVE)
            still_served = await live_response(reader)
            for _, held_writer in [*held, (probe_reader, probe_writer)]:
                held_writer.close()
            return probe, evicted, still_served

    probe, evicted, still_served = asyncio.run(scenario())
    assert probe.startswith(b"HTTP/1.1 200 "), probe
    assert evicted == b"", "the longest idle was closed, unanswered"
    assert still_served.startswith(b"HTTP/1.1 200 ")


def test_past_the_cap_a_new_admin_connection_is_closed_while_every_one_is_answered() -> None:
    """Connections whose answers are in the making are not closed for a newcomer."""
    release = threading.Event()

    def slow(_: dict[str, str]) -> admin.Response:
        release.wait(CLOSE_WAIT)
        return admin.text(200, "live")

    async def scenario() -> tuple[bytes, list[bytes]]:
        async with admin_port({"/metrics": admin.OffLoop(slow)}) as port:
            held = [
                await asyncio.open_connection("127.0.0.1", port)
                for _ in range(admin.MAX_ADMIN_CONNECTIONS)
            ]
            for _, writer in held:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
                await writer.drain()
            await asyncio.sleep(0.2)
            past = await asyncio.open_connection("127.0.0.1", port)
            past_read = await asyncio.wait_for(past[0].read(), CLOSE_WAIT)
            release.set()
            answers = [await live_response(reader) for reader, _ in held]
            for _, writer in [*held, past]:
                writer.close()
            return past_read, answers

    past_read, answers = asyncio.run(scenario())
    assert past_read == b"", "closed at once, unanswered"
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)


@pytest.mark.parametrize("client", ["127.0.0.1", "::1"])
def test_an_admin_on_every_ipv6_address_takes_ipv4_clients_too(client: str) -> None:
    """--admin [::]:PORT is every address of the host, as [::]:15001 is for the listeners:
    a kubelet probing a dual-stack pod's IPv4 address must reach /ready."""

    async def scenario() -> None:
        server = await admin.start_admin(
            admin.bind_admin(Endpoint("::", 0)), {"/live": lambda _: admin.text(200, "live")}
        )
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(client, port)
            try:
                writer.write(LIVE)
                assert (await live_response(reader)).endswith(b"live\n")
            finally:
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_an_admin_on_one_ipv6_address_is_on_that_address_only() -> None:
    sock = admin.bind_admin(Endpoint("::1", 0))
    with sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
